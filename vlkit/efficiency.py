"""The efficiency meter: parameters, MACs, latency and peak memory, with the accounting written out.

Every number the DAS / EfficientVLM / SHERL tables report comes from here.

MACs, not FLOPs
---------------
The papers' "FLOPs" are multiply-accumulates (one MAC = one multiply + one add). We count
them with ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per MAC for
every matmul / conv it knows (``aten.mm``, ``addmm``, ``bmm``, ``baddbmm``, convolutions, the
fused CUDA attention kernels), so::

    MACs = FlopCounterMode total / 2                          (exact: every entry is 2*m*n*k)

Only matrix products are counted: biases, LayerNorm, softmax, GELU, residual sums and
embedding lookups cost nothing here (they are O(N*D), against the O(N*D^2) of the matmuls).

A Transformer layer (:class:`vlkit.models.layers.TransformerLayer`) on N tokens of width D
with FFN width D_ff (and, for fusion layers, cross-attention to M context tokens of width D)
costs, per sequence::

    q, k, v, o projections     4 * N * D^2
    Q K^T  and  P V            2 * N^2 * D            (summed over heads: H * N^2 * D/H each)
    FFN fc1, fc2               2 * N * D * D_ff
    [cross-attention           2 * N * D^2 + 2 * M * D^2 + 2 * N * M * D]
    -------------------------------------------------
    D_ff = 4D, no cross:       12 * N * D^2 + 2 * N^2 * D

This is the forward half of Kaplan et al. 2020 ("Scaling Laws for Neural Language Models",
Table 1: C_forward = 2N + 2 n_layer n_ctx d_attn FLOPs per token) and of the ``6N + 12LHQT``
count in nanoGPT's ``estimate_mfu`` (from PaLM, Chowdhery et al. 2022, App. B), in MACs.
Anchor (DESIGN.md): a ViLT-B/32 layer at N = 241 (200 patches + image CLS + 40 text tokens),
D = 768 costs 12*241*768^2 + 2*241^2*768 = 1,794,983,424 MACs = 1.795 GMACs.
:func:`transformer_layer_macs` writes this formula out; the tests check it against the
counter on the real presets.

The attention backend matters: on the CPU, ``F.scaled_dot_product_attention`` dispatches to
a flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) that the counter
has no formula for, so it silently drops the 2*N^2*D of every layer (measured: bert-base
loses exactly that). :func:`macs` therefore counts inside
``sdpa_kernel(SDPBackend.MATH)``, where attention decomposes into counted ``bmm`` calls.

Memory and time
---------------
Latency is the median of repeated calls after warm-up, with ``torch.cuda.synchronize()``
around every call on CUDA. Peak memory is in GiB (2^30 bytes), weights included, measured in
a fresh subprocess (see :func:`peak_memory`). G means 10^9 in compute.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

GIB = 2**30  # bytes in a GiB (memory)
GIGA = 10**9  # MACs in a GMAC (compute)

__all__ = [
    "GIB", "GIGA", "params", "macs", "unit_macs", "transformer_layer_macs", "gmacs", "efficiency_table",
    "latency", "peak_memory", "PeakMemoryError", "autograd_saved_bytes", "device_tag", "device_name",
]


# ----------------------------------------------------------------------------- parameters
def params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (``requires_grad`` ones only if ``trainable_only``).

    ``model.parameters()`` yields each tensor once, so tied weights (e.g. a decoder sharing
    the word embeddings) count once, as in the papers' parameter columns.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"params() needs an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------- MACs
@contextlib.contextmanager
def _eval_mode(model: nn.Module | None) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own ``training`` flag after."""
    if model is None:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training


@contextlib.contextmanager
def _counting_env(model: nn.Module | None) -> Iterator[None]:
    """eval mode + no_grad + the math attention backend (so attention matmuls are seen)."""
    with _eval_mode(model), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        yield


def _count(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(MACs, result) of one call of ``fn``; the caller sets up :func:`_counting_env`."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return counter.get_total_flops() // 2, out


def _call(model_or_fn: Callable, inputs: Mapping | tuple | list | None) -> Callable[[], Any]:
    if inputs is None:
        return lambda: model_or_fn()
    if isinstance(inputs, Mapping):
        return lambda: model_or_fn(**inputs)
    if isinstance(inputs, (tuple, list)):
        return lambda: model_or_fn(*inputs)
    raise TypeError(f"inputs must be a dict of kwargs, a tuple of args or None, got {type(inputs).__name__}")


def _default_inputs(model: Any, inputs: Any) -> Any:
    if inputs is None and hasattr(model, "dummy_inputs") and callable(model.dummy_inputs):
        return model.dummy_inputs()
    return inputs


def macs(model_or_fn: nn.Module | Callable, inputs: Mapping | tuple | list | None = None) -> int:
    """Multiply-accumulates of one call ``model_or_fn(**inputs)`` (or ``(*inputs)``).

    Counted with ``FlopCounterMode`` (total FLOPs / 2, see the module docstring) under
    ``torch.no_grad()``, inside ``sdpa_kernel(SDPBackend.MATH)`` and, for a module, in eval
    mode (dropout off); every submodule's ``training`` flag is restored afterwards.
    ``inputs=None`` on a backbone uses its ``dummy_inputs()`` (the preset's paper size).

    >>> macs(nn.Linear(8, 4), (torch.zeros(2, 3, 8),))   # B*N*in*out = 2*3*8*4
    192
    """
    inputs = _default_inputs(model_or_fn, inputs)
    call = _call(model_or_fn, inputs)
    with _counting_env(model_or_fn if isinstance(model_or_fn, nn.Module) else None):
        return _count(call)[0]


NON_UNIT_KEYS = ("embed", "finalize")


def unit_macs(backbone, inputs: Mapping | None = None) -> dict[str, int]:
    """MACs per part of one forward pass of a protocol backbone, in execution order.

    Keys: ``"embed"`` (``backbone.embed(**inputs)``), then every unit name (that unit's
    ``run_units(state, i, i + 1)`` call alone), then ``"finalize"`` (final norm, pooler).
    These are exactly the pieces ``Backbone.forward`` runs, so the values sum to
    ``macs(backbone, inputs)`` (the tests check the equality). A replaced unit (DAS skip
    adapter) is counted as whatever module now serves it.
    """
    for attr in ("units", "unit_names", "embed", "run_units", "finalize"):
        if not hasattr(backbone, attr):
            raise TypeError(f"unit_macs() needs a protocol Backbone (missing {attr!r}); "
                            f"got {type(backbone).__name__}")
    inputs = _default_inputs(backbone, inputs)
    if not isinstance(inputs, Mapping):
        raise TypeError(f"unit_macs() needs inputs as a dict of kwargs for embed(), got {type(inputs).__name__}")
    names = list(backbone.unit_names)
    clash = [n for n in names if n in NON_UNIT_KEYS]
    if clash:
        raise ValueError(f"unit names {clash} clash with the reserved keys {NON_UNIT_KEYS}")
    out: dict[str, int] = {}
    with _counting_env(backbone):
        out["embed"], state = _count(lambda: backbone.embed(**inputs))
        for i, name in enumerate(names):
            out[name], state = _count(lambda: backbone.run_units(state, i, i + 1))
        out["finalize"], _ = _count(lambda: backbone.finalize(state))
    return out


def transformer_layer_macs(n: int, dim: int, ffn_dim: int | None = None, *, context_tokens: int | None = None,
                           context_dim: int | None = None, batch_size: int = 1) -> int:
    """Analytic MACs of one :class:`~vlkit.models.layers.TransformerLayer` (matmuls only).

    Self-attention + FFN on ``n`` tokens of width ``dim`` (``ffn_dim`` defaults to 4*dim)::

        4*n*dim^2  (q, k, v, o)  +  2*n^2*dim  (QK^T, PV)  +  2*n*dim*ffn_dim  (fc1, fc2)

    plus, with ``context_tokens = m`` (cross-attention to an m-token stream of width
    ``context_dim``, default ``dim``)::

        2*n*dim^2  (q, o)  +  2*m*context_dim*dim  (k, v)  +  2*n*m*dim  (QK^T, PV)

    With ``ffn_dim = 4*dim`` and no context this is the familiar 12*N*D^2 + 2*N^2*D
    (Kaplan et al. 2020, Table 1, in MACs). ``n=241, dim=768`` gives 1,794,983,424.
    """
    for name, v in (("n", n), ("dim", dim), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    f = 4 * dim if ffn_dim is None else ffn_dim
    total = 4 * n * dim**2 + 2 * n**2 * dim + 2 * n * dim * f
    if context_tokens is not None:
        m, dc = context_tokens, context_dim or dim
        total += 2 * n * dim**2 + 2 * m * dc * dim + 2 * n * m * dim
    return batch_size * total


def gmacs(n: int | float, digits: int | None = 3) -> float:
    """MACs -> GMACs (G = 10^9, not 2^30), rounded to ``digits`` (None: not rounded).

    >>> gmacs(1_794_983_424)
    1.795
    """
    g = n / GIGA
    return g if digits is None else round(g, digits)


def efficiency_table(backbone, inputs: Mapping | None = None, digits: int | None = None) -> list[dict]:
    """One row per part of a forward pass: ``unit``, ``modality``, ``params``, ``macs``, ``gmacs``.

    Rows follow :func:`unit_macs` -- ``embed``, every unit (modality from the protocol), then
    ``finalize`` -- so every MAC sits in exactly one row and ``sum(macs)`` equals
    ``macs(backbone, inputs)``. ``embed`` and ``finalize`` have ``params=None`` (the protocol
    does not say which non-unit parameters each uses; ``params(backbone)`` minus the unit
    rows gives them together). ``gmacs`` is unrounded unless ``digits`` is given, so sums of
    the column stay exact; round when displaying.
    """
    per = unit_macs(backbone, inputs)
    modality = {u.name: u.modality for u in backbone.units}
    rows = []
    for name, m in per.items():
        unit = name not in NON_UNIT_KEYS
        rows.append({
            "unit": name,
            "modality": modality[name] if unit else "-",
            "params": params(backbone.unit(name)) if unit else None,
            "macs": m,
            "gmacs": gmacs(m, digits),
        })
    return rows


# ----------------------------------------------------------------------------- devices
def _parse_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; valid devices: 'cpu', 'cuda', 'cuda:<index>'") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; valid devices: 'cpu', 'cuda', 'cuda:<index>'")
    return dev


_GPU_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "amd", "radeon", "instinct"}


def _gpu_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA GeForce RTX 4090' -> 'rtx-4090'."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t and t not in _GPU_VENDOR_WORDS]
    if tokens and re.fullmatch(r"[a-z]{1,2}\d{1,3}[a-z]?", tokens[0]):  # h100, a100, a10g, t4, l40s
        return tokens[0]
    return "-".join(tokens) or "gpu"


def device_tag(device: str | torch.device | None = None) -> str:
    """Short, file-name-safe tag of where a measurement ran.

    CPU: ``"cpu-<torch threads>t"`` (e.g. ``"cpu-2t"``); CUDA: the GPU's family from its
    name (``"h100"``, ``"h200"``, ``"a100"``, else the sanitized name). ``None`` means CUDA
    if it is available, else the CPU. Benchmarks name their result files with it.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = _parse_device(device)
    if dev.type == "cpu":
        return f"cpu-{torch.get_num_threads()}t"
    return _gpu_tag(torch.cuda.get_device_name(dev))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str | torch.device | None = None) -> str:
    """Human-readable name of the CPU model or GPU."""
    dev = _parse_device(device)
    return _cpu_name() if dev.type == "cpu" else torch.cuda.get_device_name(dev)


# ----------------------------------------------------------------------------- latency
def _percentile(sorted_xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of an ascending list."""
    pos = (len(sorted_xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def latency(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 10, device: str | torch.device | None = None,
            dtype: torch.dtype | str | None = None, batch_size: int | None = None) -> dict:
    """Wall-clock seconds of ``fn()``: median (p10, p90, mean, min, max) over ``repeats`` calls
    after ``warmup`` unmeasured ones.

    On CUDA (``device="cuda"``, or whenever CUDA is initialised) ``torch.cuda.synchronize()``
    runs before the clock starts and before it stops, so queued kernels are timed, not just
    launched. ``fn`` sets its own grad mode (wrap it in ``torch.no_grad()`` for inference).
    ``dtype`` and ``batch_size`` are only reported, as DESIGN.md asks every latency to be.
    ``device=None`` means the CPU.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    dev = _parse_device(device)
    sync = dev.type == "cuda" or (torch.cuda.is_available() and torch.cuda.is_initialized())

    def _sync():
        if sync:
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    s = sorted(times)
    return {
        "median_s": statistics.median(s),
        "p10_s": _percentile(s, 10),
        "p90_s": _percentile(s, 90),
        "mean_s": statistics.fmean(s),
        "min_s": s[0],
        "max_s": s[-1],
        "times_s": times,
        "warmup": warmup,
        "repeats": repeats,
        "device": device_tag(dev),
        "device_name": device_name(dev),
        "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- saved activations
def autograd_saved_bytes(fn: Callable[[], Any], model: nn.Module) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs, the
    parameters of ``model`` excluded: the activation memory a method keeps between forward and
    backward (deterministic, unlike a process's peak; a storage shared by several saved
    tensors counts once; the graph is freed when ``fn``'s result is dropped)."""
    sizes: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in sizes.items() if ptr not in weights)


# ----------------------------------------------------------------------------- peak memory
class PeakMemoryError(RuntimeError):
    """The measured function failed in its subprocess; the message carries its error."""


# Runs in a fresh interpreter: argv = [result_path, json spec]. Writes a JSON result.
_CHILD = r"""
import importlib, json, os, resource, sys, traceback
out_path, spec = sys.argv[1], json.loads(sys.argv[2])

def _status_kib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None

res = {"rss_before_torch": (_status_kib("VmRSS") or 0) * 1024}
try:
    import torch
    res["rss_after_torch"] = (_status_kib("VmRSS") or 0) * 1024
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    mod_name, fn_name = spec["target"].split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    if spec["device"] == "cpu":
        hwm_ok = False
        try:  # reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            hwm_ok = _status_kib("VmHWM") is not None
        except OSError:
            pass
        if hwm_ok:
            res["baseline"] = _status_kib("VmRSS") * 1024
            out = fn(**spec["kwargs"])
            res["peak"] = _status_kib("VmHWM") * 1024
            res["method"] = ("CPU: fresh subprocess; peak RSS (VmHWM, reset via /proc/self/clear_refs after "
                             "importing torch and the target module) minus RSS at that point")
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            res["baseline"] = (_status_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
            out = fn(**spec["kwargs"])
            res["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            res["method"] = ("CPU: fresh subprocess; getrusage ru_maxrss minus RSS after importing torch and "
                             "the target module (ru_maxrss also covers the pre-exec parent: an upper bound)")
    else:
        dev = torch.device(spec["device"])
        torch.cuda.set_device(dev)
        torch.cuda.init()
        torch.cuda.synchronize(dev)
        res["baseline"] = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn(**spec["kwargs"])
        torch.cuda.synchronize(dev)
        res["peak"] = torch.cuda.max_memory_allocated(dev)
        res["peak_reserved"] = torch.cuda.max_memory_reserved(dev)
        res["device_name"] = torch.cuda.get_device_name(dev)
        res["method"] = ("CUDA: fresh subprocess; torch.cuda.max_memory_allocated after "
                         "reset_peak_memory_stats (before the target ran) minus memory_allocated then")
    try:
        json.dumps(out)
        res["result"] = out
    except (TypeError, ValueError):
        res["result"] = repr(out)[:200]
except BaseException as e:
    res["error"] = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
with open(out_path, "w") as f:
    json.dump(res, f)
sys.exit(1 if "error" in res else 0)
"""


def peak_memory(target: str, device: str | torch.device = "cpu", *, seed: int = 0, threads: int | None = None,
                timeout_s: float | None = None, **kwargs) -> dict:
    """Peak memory, in GiB (2^30 bytes), of ``target(**kwargs)`` -- weights included.

    ``target`` is an importable ``"module:function"``; the function builds its model and runs
    its training step(s) itself (``kwargs`` must be JSON-serialisable). It runs in a **fresh
    subprocess** (``sys.executable``, the caller's ``sys.path``, ``torch.manual_seed(seed)``):

    * CPU: ``baseline`` = RSS after ``import torch`` and importing the target's module
      (library code, not model memory); the peak RSS counter (``VmHWM``) is reset there
      through ``/proc/self/clear_refs`` and read after the call; ``gib = (peak - baseline) /
      2^30``. Why not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the *parent's*
      RSS high-water mark across ``exec`` (measured: a child of a 2 GiB process reports
      ru_maxrss >= 2 GiB), so it overstates any child smaller than its parent; it is only
      the fallback where ``/proc`` is missing, and ``method`` says which was used.
    * CUDA: ``torch.cuda.reset_peak_memory_stats()`` before the call,
      ``gib = (max_memory_allocated - memory_allocated before) / 2^30`` (tensors only; the
      caching allocator's peak reserve is reported as ``peak_reserved_gib``).

    Returns ``{"gib", "peak_bytes", "baseline_bytes", "baseline_gib", "device", "device_name", "method",
    "torch_import_bytes", "result", "target", "kwargs"}``. An exception in the target is
    raised here as :class:`PeakMemoryError` carrying its type, message and traceback.
    """
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise ValueError(f"target must be 'module:function', got {target!r}")
    dev = _parse_device(device)
    dev_str = "cpu" if dev.type == "cpu" else f"cuda:{dev.index or 0}"
    try:
        spec = json.dumps({"target": target, "kwargs": kwargs, "device": dev_str, "seed": seed,
                           "threads": threads or torch.get_num_threads()})
    except TypeError as e:
        raise TypeError(f"peak_memory kwargs must be JSON-serialisable: {e}") from e
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p or os.getcwd() for p in sys.path])
    with tempfile.TemporaryDirectory(prefix="vlkit-mem-") as tmp:
        out_path = os.path.join(tmp, "result.json")
        proc = subprocess.run([sys.executable, "-c", _CHILD, out_path, spec], env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        res = None
        if os.path.exists(out_path):
            with open(out_path) as f:
                res = json.load(f)
    stderr_tail = proc.stderr[-4000:]
    if res is None or "error" in res or proc.returncode != 0:
        if res is not None and "error" in res:
            err = res["error"]
            raise PeakMemoryError(f"peak_memory target {target} raised {err['type']}: {err['message']}\n"
                                  f"--- subprocess traceback ---\n{err['traceback']}"
                                  f"--- subprocess stderr ---\n{stderr_tail}")
        raise PeakMemoryError(f"peak_memory subprocess for {target} exited with code {proc.returncode}\n"
                              f"--- subprocess stderr ---\n{stderr_tail}")
    out = {
        "gib": (res["peak"] - res["baseline"]) / GIB,
        "peak_bytes": res["peak"],
        "baseline_bytes": res["baseline"],
        "baseline_gib": res["baseline"] / GIB,
        "device": f"cpu-{threads or torch.get_num_threads()}t" if dev.type == "cpu" else _gpu_tag(res["device_name"]),
        "device_name": _cpu_name() if dev.type == "cpu" else res["device_name"],
        "method": res["method"],
        "torch_import_bytes": res["rss_after_torch"] - res["rss_before_torch"],
        "result": res.get("result"),
        "target": target,
        "kwargs": kwargs,
    }
    if "peak_reserved" in res:
        out["peak_reserved_gib"] = res["peak_reserved"] / GIB
    return out
