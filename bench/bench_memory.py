"""Peak training memory and step time of full fine-tuning, LST, UniPT and SHERL (the "Memory"
columns of SHERL's Tab. 1-3), and the epoch-time gain of SHERL's frozen-prefix cache.

Commands (from the repository root)::

    python -m bench.bench_memory                      # CPU (2 threads, batch 8); CUDA too if present
    python -m bench.bench_memory --device cuda        # GPU only (batch 100)
    python -m bench.bench_memory --device cpu --skip-cache
    python -m bench.bench_memory --only-cache --cache-examples 256 --cache-threads 1

**Memory** (``results/bench/memory.<device>.json`` + ``.md``): for ``bert-base`` and ``t5-base``
(random weights: memory and time do not depend on them), each method applied with its defaults
through :func:`vlkit.methods.petl.apply` (``full``; ``lst`` r = 8; ``unipt`` r = 8; ``sherl``
r = 8, MTSA aggregator, last unit only; T5: encoder *and* decoder regulated, the official
design -- see :mod:`vlkit.methods.sherl`), plus a linear task head on the pooled output; one
training step = forward + cross-entropy + backward + ``AdamW.step``, fp32, sequence length 128
(T5: 128 encoder + 128 decoder tokens), batch 8 on the CPU (2 threads), batch 100 on CUDA.
Each configuration runs in a **fresh subprocess** (:func:`vlkit.efficiency.peak_memory`) that
first warms the libraries up (one tiny step of every method, *before* the baseline is taken, so
library code and lazily imported modules are not counted as model memory), then builds the
model, runs 1 warm-up + 2 timed steps (:func:`vlkit.efficiency.latency`, median), and reports
the peak -- CUDA: ``max_memory_allocated``; CPU: peak RSS. Weights are included on both devices.
On the CPU the peak RSS counter is reset once more *after the model is built* (building a preset
copies the library model's weights once, a transient that is not training memory; on CUDA the
build happens on the CPU and is not seen either). Beside the peak, ``saved_gib`` is the
deterministic part, measured in the parent process: the bytes of the distinct tensors autograd
saves for backward during one training forward (``torch.autograd.graph.saved_tensors_hooks``;
weights excluded, the frozen features that a method's trainable down-projections read included).
Ratios are to full fine-tuning. ``test_peak_gib`` is SHERL Tab. 1's *test* memory: the same
model, head and batch in a second fresh subprocess, eval mode under ``torch.inference_mode``
(:func:`test_steps`); every method then runs its whole backbone, so the test peaks are the
weights plus one forward's live activations, and differ between methods only by their extra
modules (LST's side network, UniPT's and SHERL's adapters).

**Cache** (``results/bench/sherl_cache.<device>.json``): a SHERL epoch on ``--cache-examples``
random examples (length 128, batch 32) for ``bert-base`` and ``minilm``, recomputing the frozen
prefix every step vs reading it from a :class:`vlkit.methods.feature_cache.PrefixCache` built
once (build time reported separately). The two runs start from the same initialisation,
alternate step by step (so a shared machine's load hits both alike) and must see the same
losses. ``macs_ratio`` is the deterministic compute ratio of the two training steps (forward +
backward, FlopCounter / 2 under the math attention backend).

Targets (issue #8): SHERL's peak <= 0.25x full fine-tuning on bert-base and below LST's and
UniPT's; T5-base vs the paper's 2.9 GB / 17.6 GB; a cached bert-base SHERL epoch >= 3x faster.

Measured here (session 4, 2 CPU cores, an NLVR calibration job beside it: load average 0.9 at
the start, 3.8 at the end -- memory is unaffected, step times are not reliable): bert-base
batch 8 -- full 2.72 GiB, LST 0.63, UniPT 0.59, SHERL 0.59 GiB training peak (SHERL 0.215x full;
the three METL peaks lie within the +-0.04 GiB run-to-run spread of peak RSS, all dominated by
the 0.41 GiB of frozen weights; session 3 measured 0.58 / 0.59 / 0.62 for SHERL / LST / UniPT);
autograd-saved activations: full 0.85, LST 0.12, SHERL 0.082, UniPT 0.065 GiB. Test peaks:
full 0.48 GiB, the three METL methods 0.52-0.53 (1.08-1.09x full: their extra modules run on
top of the whole backbone at test time). T5-base batch 8: full 6.81 GiB, SHERL 1.19 GiB
(0.17x; the paper: 2.9 / 17.6 GB = 0.16x), UniPT 0.98, LST 1.40; test peaks 0.90 (full) to
0.99 (SHERL). Why SHERL sits above UniPT on T5 (and not on BERT): with the official
encoder-decoder design (:mod:`vlkit.methods.sherl`, ``regulate_context``) SHERL trains two MTSAs
(encoder and decoder) and backpropagates through the last pre-trained decoder block, whose
self- *and* cross-attention over 128 encoder tokens keep full-width activations; UniPT only
rebuilds the decoder's final feature from frozen ones, with no pre-trained block in the graph.
The SHERL paper's 0.16x is the same design; ``regulate_context=False`` (decoder only) is the
cheaper variant. Cache: MACs ratio
5.6x (bert-base) and 3.3x (MiniLM); wall-clock with 2 threads 2.6-3.2x over four runs -- on an
oversubscribed machine every 2-thread OpenMP region waits for a scheduler slice, which costs the
cached step's many small ops far more than the prefix's large matmuls (an AdamW step over the
MTSA took 1 s with 2 threads and 10 ms with 1) -- and 4.7x (bert-base) / 2.9x (MiniLM) with 1
thread (``sherl_cache.cpu-1t``). The cache costs 4.33 MB per bert-base example (0.98 for MiniLM).
Runtime: ~10-20 min for the memory part, ~5-8 min for the cache part.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
import time

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vlkit.bench_io import write_bench
from vlkit.efficiency import autograd_saved_bytes, device_name, device_tag, latency, params, peak_memory
from vlkit.methods.feature_cache import PrefixCache
from vlkit.methods.petl import apply
from vlkit.models import build
from vlkit.paths import CACHE_DIR

MEMORY_BENCH = "memory"
CACHE_BENCH = "sherl_cache"
PRESETS = ("bert-base", "t5-base")
METHODS = ("full", "lst", "unipt", "sherl")
CACHE_PRESETS = ("bert-base", "minilm")
SEQ_LEN = 128
BATCH = {"cpu": 8, "cuda": 100}
CPU_THREADS = 2
TARGET_SHERL_RATIO = 0.25
TARGET_CACHE_GAIN = 3.0
PAPER = {"t5-base": {"sherl_gb": 2.9, "full_gb": 17.6, "note": "SHERL paper, T5-base, GPU, GB as reported"}}
WARMUP_ENV = "VLKIT_BENCH_MEMORY_WARMUP"
TINY = {"bert-base": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48,
                          vocab_size=101, max_position_embeddings=32),
        "t5-base": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48, head_dim=8,
                        vocab_size=101)}


def _warm_up() -> None:
    """One tiny training step of every (preset, method): imports the lazily loaded library code
    (HF model classes, PEFT, ...) and pages in the CPU kernels, so that the peak-memory child's
    baseline (RSS after importing this module) holds the library and the measured peak holds the
    model only. Measured on bert-base: without it the built model costs 0.55 GiB of RSS above the
    baseline for 0.41 GiB of weights; with it, exactly the weights."""
    for preset, cfg in TINY.items():
        for method in METHODS:
            bb = build(preset, **cfg)
            model, head = apply(method, bb), nn.Linear(cfg["hidden_size"], 2)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()))
            model.train()
            head(model(**_inputs(bb, 2, 16, "cpu")).pooled).sum().backward()
            opt.step()
    gc.collect()


def _reset_cpu_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _inputs(backbone, batch_size: int, seq_len: int, device) -> dict:
    if backbone.preset.startswith("t5"):
        x = backbone.dummy_inputs(batch_size, enc_len=seq_len, dec_len=seq_len)
    else:
        x = backbone.dummy_inputs(batch_size, seq_len=seq_len)
    return {k: v.to(device) for k, v in x.items()}


if os.environ.get(WARMUP_ENV) == "1":  # set by memory_rows for its peak-memory children
    _warm_up()


def saved_bytes(preset: str, method: str, batch_size: int, seq_len: int = SEQ_LEN, device: str = "cpu",
                seed: int = 0) -> int:
    """Autograd-saved bytes of one training forward of ``method`` on ``preset`` (see
    :func:`vlkit.efficiency.autograd_saved_bytes`). Run in the parent, not in the peak-memory child:
    an extra forward there would change the child's allocation history and so its CPU peak."""
    torch.manual_seed(seed)
    backbone = build(preset)
    model = apply(method, backbone).to(device).train()
    inputs = _inputs(backbone, batch_size, seq_len, device)
    with torch.no_grad():
        width = model(**{k: v[:1] for k, v in inputs.items()}).pooled.shape[-1]
    head = nn.Linear(width, 2).to(device)
    labels = torch.zeros(batch_size, dtype=torch.long, device=device)
    n = autograd_saved_bytes(lambda: nn.functional.cross_entropy(head(model(**inputs).pooled), labels), model)
    del model, backbone
    gc.collect()
    return n


def _build_with_head(preset: str, method: str, batch_size: int, seq_len: int, dev: str, seed: int):
    """``preset`` with ``method`` applied (its defaults), a linear 2-way head on the pooled output,
    a seeded input batch and labels, all on ``dev`` (the model and head are built on the CPU)."""
    torch.manual_seed(seed)
    backbone = build(preset)
    model = apply(method, backbone)
    inputs = _inputs(backbone, batch_size, seq_len, "cpu")
    with torch.no_grad():
        width = backbone(**{k: v[:1] for k, v in inputs.items()}).pooled.shape[-1]
    head = nn.Linear(width, 2)
    model.to(dev)
    head.to(dev)
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    labels = torch.randint(0, 2, (batch_size,), generator=torch.Generator().manual_seed(seed)).to(dev)
    return model, head, inputs, labels


def train_steps(preset: str, method: str, batch_size: int, seq_len: int = SEQ_LEN, dev: str = "cpu",
                warmup: int = 1, repeats: int = 2, seed: int = 0) -> dict:
    """Build ``preset``, apply ``method`` (defaults), add a linear head and run ``warmup + repeats``
    AdamW training steps on ``dev``; return the timing and parameter counts (the peak-memory target)."""
    model, head, inputs, labels = _build_with_head(preset, method, batch_size, seq_len, dev, seed)
    trainable = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    head.train()
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(head(model(**inputs).pooled), labels)
        loss.backward()
        opt.step()

    gc.collect()
    reset = _reset_cpu_peak() if dev == "cpu" else False
    t = latency(step, warmup=warmup, repeats=repeats, device=dev, dtype=torch.float32, batch_size=batch_size)
    return {"step_median_s": t["median_s"], "step_times_s": t["times_s"], "trainable_params": params(model, True),
            "total_params": params(model), "head_params": params(head), "cpu_peak_reset_after_build": reset}


def test_steps(preset: str, method: str, batch_size: int, seq_len: int = SEQ_LEN, dev: str = "cpu",
               warmup: int = 1, repeats: int = 2, seed: int = 0) -> dict:
    """The test-time twin of :func:`train_steps` (SHERL Tab. 1's "test memory"): the same model,
    head and batch, in eval mode under ``torch.inference_mode`` -- a forward and the head's
    logits, no optimiser state, no saved activations. Every method runs its whole backbone here
    (SHERL's frozen prefix cannot be cached for unseen inputs), so the test peaks differ only by
    each method's extra modules and their activations."""
    model, head, inputs, _ = _build_with_head(preset, method, batch_size, seq_len, dev, seed)
    model.eval()
    head.eval()

    def step():
        with torch.inference_mode():
            head(model(**inputs).pooled)

    gc.collect()
    reset = _reset_cpu_peak() if dev == "cpu" else False
    t = latency(step, warmup=warmup, repeats=repeats, device=dev, dtype=torch.float32, batch_size=batch_size)
    return {"step_median_s": t["median_s"], "step_times_s": t["times_s"], "cpu_peak_reset_after_build": reset}


def memory_rows(device: str, batch_size: int, presets=PRESETS, methods=METHODS) -> list[dict]:
    rows = []
    os.environ[WARMUP_ENV] = "1"  # inherited by the peak_memory subprocesses
    threads = CPU_THREADS if device == "cpu" else None
    for preset in presets:
        base = None
        for method in methods:
            t0 = time.time()
            config = dict(preset=preset, method=method, batch_size=batch_size, seq_len=SEQ_LEN, dev=device)
            r = peak_memory("bench.bench_memory:train_steps", device, threads=threads, **config)
            res = r["result"]
            test = peak_memory("bench.bench_memory:test_steps", device, threads=threads, **config)
            saved = saved_bytes(preset, method, batch_size, SEQ_LEN, device)
            row = {"preset": preset, "method": method, "batch": batch_size, "seq_len": SEQ_LEN, "dtype": "float32",
                   "peak_gib": round(r["gib"], 4), "saved_gib": round(saved / 2**30, 4),
                   "step_s": round(res["step_median_s"], 4), "test_peak_gib": round(test["gib"], 4),
                   "test_s": round(test["result"]["step_median_s"], 4),
                   "trainable_params": res["trainable_params"], "total_params": res["total_params"]}
            if method == "full":
                base = row
            if base is not None:
                row["mem_vs_full"] = round(row["peak_gib"] / base["peak_gib"], 4)
                row["saved_vs_full"] = round(row["saved_gib"] / base["saved_gib"], 4)
                row["time_vs_full"] = round(row["step_s"] / base["step_s"], 4)
                row["test_mem_vs_full"] = round(row["test_peak_gib"] / base["test_peak_gib"], 4)
            rows.append(row)
            print(f"{preset:10s} {method:6s} peak {row['peak_gib']:.3f} GiB  saved {row['saved_gib']:.3f} GiB  "
                  f"step {row['step_s']:.2f} s  test peak {row['test_peak_gib']:.3f} GiB  "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return rows


def memory_checks(rows: list[dict]) -> dict:
    get = {(r["preset"], r["method"]): r for r in rows}
    out = {}
    if ("bert-base", "sherl") in get and ("bert-base", "full") in get:
        s = get[("bert-base", "sherl")]
        out["bert_sherl_mem_vs_full"] = s["mem_vs_full"]
        out["bert_sherl_le_0.25_full"] = s["mem_vs_full"] <= TARGET_SHERL_RATIO
        for other in ("lst", "unipt"):
            if ("bert-base", other) in get:
                out[f"bert_sherl_peak_below_{other}"] = s["peak_gib"] < get[("bert-base", other)]["peak_gib"]
                out[f"bert_sherl_saved_below_{other}"] = s["saved_gib"] < get[("bert-base", other)]["saved_gib"]
        if "test_mem_vs_full" in s:
            out["bert_sherl_test_mem_vs_full"] = s["test_mem_vs_full"]
    if ("t5-base", "sherl") in get and ("t5-base", "full") in get:
        out["t5_sherl_mem_vs_full"] = get[("t5-base", "sherl")]["mem_vs_full"]
        out["t5_paper_ratio"] = round(PAPER["t5-base"]["sherl_gb"] / PAPER["t5-base"]["full_gb"], 4)
    return out


# ------------------------------------------------------------------------------- cache
def _trainer(model, head, labels, forward, lr: float = 1e-4):
    """One training step ``step(idx) -> (loss, seconds)`` of ``model`` + ``head`` on examples ``idx``."""
    opt = torch.optim.AdamW(list(model.trainable.values()) + list(head.parameters()), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step(idx):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(head(forward(idx).pooled), labels[idx])
        loss.backward()
        opt.step()
        return loss.item(), time.perf_counter() - t0
    return step


def _step_macs(fn) -> int:
    """MACs (FLOPs / 2) of ``fn()`` -- here a forward *and* backward pass -- under the math
    attention backend, so attention matmuls are counted on the CPU (DESIGN.md)."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops() // 2


def cache_row(preset: str, n_examples: int, batch_size: int = 32, seq_len: int = SEQ_LEN, seed: int = 0) -> dict:
    """Time one SHERL epoch recomputing the frozen prefix vs reading it from a PrefixCache.

    Two SHERL wrappers around the *same* frozen backbone (same seed: identical MTSA and head
    initialisation) train side by side, one step each in turn over the same batches, so load
    from other processes on a shared machine hits both alike; each epoch time is the sum of its
    own steps (the cached step includes reading its batch from the memory-mapped cache)."""
    torch.manual_seed(seed)
    backbone = build(preset)
    direct_model, cached_model = apply("sherl", backbone, seed=seed), apply("sherl", backbone, seed=seed)
    inputs = _inputs(backbone, n_examples, seq_len, "cpu")
    labels = torch.randint(0, 2, (n_examples,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        width = direct_model(**{k: v[:1] for k, v in inputs.items()}).pooled.shape[-1]
    head_a = nn.Linear(width, 2)
    head_b = copy.deepcopy(head_a)
    order = [torch.arange(i, min(i + batch_size, n_examples)) for i in range(0, n_examples, batch_size)]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix="bench-sherl-cache-") as tmp:
        t0 = time.perf_counter()
        cache = PrefixCache(cached_model, f"{tmp}/cache").build(inputs, batch_size=batch_size,
                                                                subset=f"bench[:{n_examples}]")
        build_s = time.perf_counter() - t0
        direct = _trainer(direct_model, head_a, labels,
                          lambda idx: direct_model(**{k: v[idx] for k, v in inputs.items()}))
        cached = _trainer(cached_model, head_b, labels, lambda idx: cached_model.from_prefix(*cache.batch(idx)))
        runs = [(direct(idx), cached(idx)) for idx in order]
        bpe, total = cache.bytes_per_example, cache.nbytes
        idx = order[0]
        batch = {k: v[idx] for k, v in inputs.items()}
        macs_direct = _step_macs(lambda: head_a(direct_model(**batch).pooled).sum().backward())
        macs_cached = _step_macs(lambda: head_b(cached_model.from_prefix(*cache.batch(idx)).pooled).sum().backward())
        del cache
    direct_s, cached_s = sum(d[1] for d, _ in runs), sum(c[1] for _, c in runs)
    rel = max(abs(d[0] - c[0]) / max(abs(d[0]), 1e-12) for d, c in runs)
    print(f"{preset:10s} epoch direct {direct_s:.1f} s, cached {cached_s:.1f} s (build {build_s:.1f} s), "
          f"gain {direct_s / cached_s:.2f}x", file=sys.stderr, flush=True)
    return {"preset": preset, "examples": n_examples, "batch": batch_size, "seq_len": seq_len,
            "epoch_direct_s": round(direct_s, 3), "epoch_cached_s": round(cached_s, 3), "build_s": round(build_s, 3),
            "gain": round(direct_s / cached_s, 3), "mb_per_example": round(bpe / 1e6, 3),
            "cache_gib": round(total / 2**30, 4), "max_rel_loss_diff": rel,
            "step_gmacs_direct": round(macs_direct / 1e9, 2), "step_gmacs_cached": round(macs_cached / 1e9, 2),
            "macs_ratio": round(macs_direct / macs_cached, 3),
            "features": len(cached_model.feature_keys)}


def run(device: str, *, skip_cache: bool = False, only_cache: bool = False, cache_examples: int = 256,
        cache_threads: int = CPU_THREADS) -> list:
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    tag = device_tag(dev)
    written = []
    meta = {"device": tag, "device_name": device_name(dev), "torch": torch.__version__,
            "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}  # a shared machine's contention
    if not only_cache:
        rows = memory_rows(dev.type if dev.type == "cpu" else str(dev), BATCH[dev.type])
        payload = {**meta, "rows": rows, "checks": memory_checks(rows), "paper": PAPER,
                   "method": ("fresh subprocess per config (vlkit.efficiency.peak_memory); 1 warm-up + 2 timed AdamW "
                              "steps; CPU: peak RSS reset after the model build; CUDA: max_memory_allocated; "
                              "test_*: the same model, head and batch in a second fresh subprocess, eval mode "
                              "under torch.inference_mode (forward + head, 1 warm-up + 2 timed)"),
                   "sherl_t5_design": ("encoder and decoder regulated (official T5 code): all Enc units and Dec0..L-2 "
                                       "run without a graph; an encoder MTSA (+LayerNorm) replaces the context and a "
                                       "decoder MTSA feeds the last decoder unit")}
        payload["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
        written.append(write_bench(MEMORY_BENCH, tag, payload))
    if not skip_cache and dev.type == "cpu":
        torch.set_num_threads(cache_threads)
        tag = device_tag(dev)
        meta.update(device=tag, threads=cache_threads, load_avg_1m_at_start=round(os.getloadavg()[0], 2))
        rows = [cache_row(p, cache_examples) for p in CACHE_PRESETS]
        checks = {"bert_gain_ge_3x": rows[0]["gain"] >= TARGET_CACHE_GAIN,
                  "losses_agree_rtol_1e-5": all(r["max_rel_loss_diff"] <= 1e-5 for r in rows)}
        written.append(write_bench(CACHE_BENCH, tag, {**meta, "rows": rows, "checks": checks,
                                                      "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}))
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: the CPU, and CUDA too when available")
    ap.add_argument("--skip-cache", action="store_true", help="skip the cache epoch-time part")
    ap.add_argument("--only-cache", action="store_true", help="only the cache epoch-time part (CPU)")
    ap.add_argument("--cache-examples", type=int, default=256)
    ap.add_argument("--cache-threads", type=int, default=CPU_THREADS,
                    help="CPU threads of the cache part (its result file is sherl_cache.cpu-<n>t)")
    a = ap.parse_args(argv)
    devices = [a.device] if a.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    for d in devices:
        for path in run(d, skip_cache=a.skip_cache, only_cache=a.only_cache, cache_examples=a.cache_examples,
                        cache_threads=a.cache_threads):
            print(path)


if __name__ == "__main__":
    main()
