"""Latency of DAS-skipped models vs unskipped ones, beside the MACs ratio (DAS, Wu et al. 2023).

Command (from the repository root)::

    python -m bench.bench_skip                      # CPU (2 threads, batch 1), and CUDA if present
    python -m bench.bench_skip --device cpu --presets vilt-b32 --rounds 3 --repeats 3
    python -m bench.bench_skip --device cpu --max-load 1.5   # shared machine: wait for a calm minute

What it measures, per preset (``vilt-b32`` at 241 tokens, ``meter-clip16-roberta`` at 384 px
+ 40 text tokens; random weights -- latency does not depend on them):

* ``plain``  -- the pre-trained backbone as built: no adapter, no skip (**the baseline**);
* ``k=0``    -- :func:`vlkit.methods.das.apply_skips` with no skip: parallel adapters (96) on
  every candidate unit -- the adapted model DAS would have without skipping;
* ``k=1, 2, 4`` -- the DAS final model: the **last k candidates** skipped (skip adapters 192 /
  288), adapters on the other candidates. Which units are skipped does not change the MACs
  of ViLT (all layers cost the same) but does for METER, whose fusion scope mixes text-side
  ``FL*`` (40 tokens) and image-side ``FV*`` (577 tokens) units: the last k in execution order
  are ``FV5``, ``FL5 FV5``, ``FL4 FV4 FL5 FV5``. Candidates: ViLT all ``En*``; METER the
  fusion scope;
* ``skip-only k=4`` -- ``plain`` with the same 4 units replaced by skip adapters and no other
  adapter: a plain model "with 4 layers swapped for adapters", the layout of the reference
  measurement quoted in the DAS issue (HF ViltModel: 1.52x at 2 CPU threads, MACs ratio 1.47x).

Each model is timed as one forward pass split into its protocol parts -- ``embed``,
``run_units`` (all units), ``finalize`` (final norm, poolers) -- with device synchronisation
between parts, under ``torch.inference_mode()``: CPU batch 1 with ``torch.set_num_threads(2)``
in fp32; GPU batch 32 in bf16 (weights and float inputs cast to bfloat16). Models are timed
**interleaved** (round-robin, order rotated each round, :func:`vlkit.efficiency.latency` per
round) so that load from other processes on a shared machine hits every model alike; each
number is the median over all timed calls. The variants share the backbone's weight tensors
(only the module objects are copied), so all fit in memory at once.

Reported per model: median total / embed / units / finalize time (and the fastest call's
total, a robust figure on a shared machine: the run also records the load average), GMACs (batch 1, from
:func:`vlkit.efficiency.unit_macs`: FlopCounter / 2 under the math attention backend) split the
same way, and the speed-up against ``plain`` and against ``k=0`` beside the matching MACs
ratio. Criterion (DAS issue): skipping 4 of 12 ViLT layers, ``speed-up - 1 >= 0.9 x (MACs
ratio - 1)``. Writes ``results/bench/skip.<device_tag>.json`` (+ ``.md``) via
:func:`vlkit.bench_io.write_bench`; the printed summary says "not measured" for a device
whose file is absent.

Runtime: about 3-5 minutes on 2 CPU cores with the defaults (METER-CLIP16 is ~97 GMACs a pass).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import platform
import statistics
import time

import torch

from bench._common import BATCH, DTYPE, model_inputs, rotated, sync
from vlkit.bench_io import NOT_MEASURED, bench_cell, bench_devices, read_bench, rows_to_markdown, write_bench
from vlkit.efficiency import GIGA, device_name, device_tag, latency, unit_macs
from vlkit.methods.das import apply_skips, candidates, skip_bottleneck_for
from vlkit.models import build
from vlkit.nn.adapters import SkipAdapter

BENCH = "skip"
PRESETS = ("vilt-b32", "meter-clip16-roberta")
SCOPE = {"vilt-b32": "fusion", "meter-clip16-roberta": "fusion"}
KS = (1, 2, 4)
CRITERION_PRESET, CRITERION_K, CRITERION_FRACTION = "vilt-b32", 4, 0.9


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with new module objects but the *same* parameter and buffer tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def skip_set(backbone, k: int, scope: str) -> list[str]:
    """The last ``k`` candidates of ``scope`` in execution order (empty for k = 0)."""
    return candidates(backbone, scope)[len(candidates(backbone, scope)) - k:] if k else []


def skip_only(base, names: list[str]):
    """``base`` with ``names`` replaced by skip adapters and no other adapter (the layout of a
    plain model "with k layers swapped for adapters")."""
    model = shared_copy(base)
    for n in names:
        layer = model.unit(n)
        ref = next(layer.parameters())
        skip = SkipAdapter(layer.dim, skip_bottleneck_for(layer), act="relu", init="bert")
        model.replace_unit(n, skip.to(device=ref.device, dtype=ref.dtype))
    return model.eval()


def build_variants(preset: str, ks=KS, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """``{label: (model, skipped names)}``: ``plain``, ``k=0``, ``k=<k>`` and ``skip-only k=<max k>``
    (see the module docstring)."""
    base = build(preset).eval().to(device=device, dtype=dtype)
    scope = SCOPE[preset]
    out = {"plain": (base, [])}
    for k in (0, *ks):
        names = skip_set(base, k, scope)
        out[f"k={k}"] = (apply_skips(shared_copy(base), names, scope=scope).eval(), names)
    if ks and max(ks) > 0:
        names = skip_set(base, max(ks), scope)
        out[f"skip-only k={max(ks)}"] = (skip_only(base, names), names)
    return out


def part_macs(model, inputs: dict) -> dict:
    """MACs of one pass split like the timings: embed / units / finalize / total."""
    per = unit_macs(model, inputs)
    units = sum(v for k, v in per.items() if k not in ("embed", "finalize"))
    return {"embed": per["embed"], "units": units, "finalize": per["finalize"],
            "total": per["embed"] + units + per["finalize"]}


def time_variants(variants: dict, inputs: dict, device: str, rounds: int, repeats: int, warmup: int) -> dict:
    """Interleaved timing of every variant; returns ``{label: {part: [seconds...]}}`` (timed calls only)."""
    labels = list(variants)
    times = {lb: {"total": [], "embed": [], "units": [], "finalize": []} for lb in labels}

    def caller(model, sink):
        def fn():
            with torch.inference_mode():
                t0 = time.perf_counter()
                state = model.embed(**inputs)
                sync(device)
                t1 = time.perf_counter()
                state = model.run_units(state)
                sync(device)
                t2 = time.perf_counter()
                model.finalize(state)
                sync(device)
                t3 = time.perf_counter()
            sink.append((t1 - t0, t2 - t1, t3 - t2))
        return fn

    batch = next(iter(inputs.values())).shape[0]
    for r in range(rounds):
        order = rotated(labels, r)
        for lb in order:
            sink: list = []
            res = latency(caller(variants[lb][0], sink), warmup=warmup, repeats=repeats, device=device,
                          dtype=DTYPE[device], batch_size=batch)
            parts = sink[warmup:]
            times[lb]["total"] += res["times_s"]
            for i, key in enumerate(("embed", "units", "finalize")):
                times[lb][key] += [p[i] for p in parts]
    return times


def bench_preset(preset: str, device: str, ks, rounds: int, repeats: int, warmup: int) -> list[dict]:
    dtype = DTYPE[device]
    variants = build_variants(preset, ks, device, dtype)
    base = variants["plain"][0]
    inputs = model_inputs(base, BATCH[device], device, dtype)
    # MACs at batch 1 in fp32 on the CPU-side models would need copies; count on the timed models
    # at batch 1 (MACs are linear in the batch, and dtype does not change them).
    inputs1 = model_inputs(base, 1, device, dtype)
    m = {lb: part_macs(v[0], inputs1) for lb, v in variants.items()}
    t = time_variants(variants, inputs, device, rounds, repeats, warmup)
    med = {lb: {k: statistics.median(v) for k, v in d.items()} for lb, d in t.items()}
    low = {lb: min(d["total"]) for lb, d in t.items()}
    rows = []
    for lb, (model, names) in variants.items():
        row = {
            "preset": preset, "model": lb, "skipped": " ".join(names) or "-",
            "total_ms": 1e3 * med[lb]["total"], "embed_ms": 1e3 * med[lb]["embed"],
            "units_ms": 1e3 * med[lb]["units"], "finalize_ms": 1e3 * med[lb]["finalize"],
            "min_total_ms": 1e3 * low[lb],
            "gmacs": m[lb]["total"] / GIGA, "gmacs_embed": m[lb]["embed"] / GIGA,
            "gmacs_units": m[lb]["units"] / GIGA, "gmacs_finalize": m[lb]["finalize"] / GIGA,
        }
        for ref in ("plain", "k=0"):
            tag = "plain" if ref == "plain" else "k0"
            row[f"speedup_vs_{tag}"] = med[ref]["total"] / med[lb]["total"]
            row[f"macs_ratio_vs_{tag}"] = m[ref]["total"] / m[lb]["total"]
            # speed-up - 1 as a share of MACs ratio - 1 (1 = the time shrinks exactly as the MACs)
            gap = row[f"macs_ratio_vs_{tag}"] - 1
            row[f"efficiency_vs_{tag}"] = (row[f"speedup_vs_{tag}"] - 1) / gap if abs(gap) > 1e-9 else None
            row[f"min_speedup_vs_{tag}"] = low[ref] / low[lb]
        row["calls"] = len(t[lb]["total"])
        rows.append(row)
    del variants
    return rows


def criterion(rows: list[dict]) -> dict:
    """``speed-up - 1 >= 0.9 (MACs ratio - 1)`` for vilt-b32 at k = 4: the DAS model against
    ``plain`` and against ``k=0``, and ``skip-only k=4`` against ``plain``."""
    out = {"rule": f"{CRITERION_PRESET} k={CRITERION_K}: speedup - 1 >= {CRITERION_FRACTION} * (MACs ratio - 1)"}
    found = False
    for model, tag in ((f"k={CRITERION_K}", "plain"), (f"k={CRITERION_K}", "k0"),
                       (f"skip-only k={CRITERION_K}", "plain")):
        row = next((r for r in rows if r["preset"] == CRITERION_PRESET and r["model"] == model), None)
        if row is None:
            continue
        found = True
        s, q, lo = row[f"speedup_vs_{tag}"], row[f"macs_ratio_vs_{tag}"], row[f"min_speedup_vs_{tag}"]
        need = 1 + CRITERION_FRACTION * (q - 1)
        out[f"{model} vs {tag}"] = {"speedup": s, "macs_ratio": q, "required_speedup": need,
                                    "passed": bool(s >= need), "min_time_speedup": lo,
                                    "passed_on_min_times": bool(lo >= need)}
    if not found:
        out["status"] = NOT_MEASURED
    return out


def wait_for_calm(max_load: float | None, max_wait_s: float) -> list[float]:
    """On the CPU of a shared machine: wait (up to ``max_wait_s``) until the 1-minute load
    average is below ``max_load``; returns the load average when measuring starts."""
    t0 = time.monotonic()
    while max_load is not None and os.getloadavg()[0] >= max_load and time.monotonic() - t0 < max_wait_s:
        time.sleep(15)
    return list(os.getloadavg())


def run(device: str, presets, ks, rounds: int, repeats: int, warmup: int, threads: int, results_dir=None,
        max_load: float | None = None, max_wait_s: float = 0.0, merge: bool = True) -> dict:
    """Measure ``presets`` on ``device`` and write ``skip.<device_tag>.json``. With ``merge``,
    rows of presets not measured now are kept from this device's existing file (so presets
    can be measured in separate calm windows of a shared machine); each preset records the
    load average before and after its own measurement."""
    if device == "cpu":
        torch.set_num_threads(threads)
    tag = device_tag(device)
    old = read_bench(BENCH, tag, results_dir) if merge else None
    rows = [r for r in (old or {}).get("rows", []) if r["preset"] not in presets]
    per_preset = {k: v for k, v in (old or {}).get("per_preset", {}).items() if k not in presets}
    for preset in presets:
        load_before = wait_for_calm(max_load if device == "cpu" else None, max_wait_s)
        t0 = time.perf_counter()
        rows += bench_preset(preset, device, ks, rounds, repeats, warmup)
        per_preset[preset] = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": time.perf_counter() - t0,
                              "rounds": rounds, "repeats": repeats, "warmup": warmup, "ks": list(ks),
                              "load_average_1_5_15min_before": load_before,
                              "load_average_1_5_15min_after": list(os.getloadavg())}
        print(f"[{tag}] {preset}: {per_preset[preset]['seconds']:.0f} s, load {load_before[0]:.2f} -> "
              f"{per_preset[preset]['load_average_1_5_15min_after'][0]:.2f}", flush=True)
    order = {p: i for i, p in enumerate(PRESETS)}
    rows.sort(key=lambda r: order.get(r["preset"], len(order)))  # stable: model order kept within a preset
    payload = {
        "bench": BENCH, "device": tag, "device_name": device_name(device),
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "batch_size": BATCH[device], "dtype": str(DTYPE[device]).removeprefix("torch."),
        "torch": torch.__version__, "python": platform.python_version(),
        "baselines": {"plain": "the backbone as built: no adapters, no skips",
                      "k=0": "apply_skips(backbone, []): parallel adapters on every candidate, no skip",
                      "skip-only": "plain with the same units replaced by skip adapters, no other adapter"},
        "skip_sets": "the last k candidates of the scope (ViLT: En*, METER: the fusion FL*/FV* units)",
        "per_preset": per_preset, "criterion": criterion(rows), "rows": rows,
    }
    path = write_bench(BENCH, tag, payload, results_dir)
    print(rows_to_markdown(rows, title=f"{BENCH} -- {tag}"))
    print(f"wrote {path}")
    return payload


def summary(results_dir=None, devices=("cpu-2t", "h100")) -> str:
    """k = 4 speed-up vs MACs ratio per device and preset; 'not measured' where a device has no file."""
    rows = []
    for dev in sorted(set(devices) | set(bench_devices(BENCH, results_dir))):
        for preset in PRESETS:
            cell = bench_cell(BENCH, dev, "rows", results_dir)
            row = None if cell == NOT_MEASURED else next(
                (r for r in cell if r["preset"] == preset and r["model"] == "k=4"), None)
            rows.append({"device": dev, "preset": preset,
                         "speedup_vs_plain (k=4)": row["speedup_vs_plain"] if row else NOT_MEASURED,
                         "MACs ratio": row["macs_ratio_vs_plain"] if row else NOT_MEASURED,
                         "speedup_vs_k0 (k=4)": row["speedup_vs_k0"] if row else NOT_MEASURED,
                         "MACs ratio vs k0": row["macs_ratio_vs_k0"] if row else NOT_MEASURED})
    return rows_to_markdown(rows, title="DAS skip: k = 4 speed-up vs MACs ratio")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the CPU, then CUDA if available")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--ks", nargs="+", type=int, default=list(KS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--max-load", type=float, default=None,
                   help="CPU: before each preset, wait until the 1-min load average is below this")
    p.add_argument("--max-wait", type=float, default=1800, help="seconds to wait for --max-load at most")
    p.add_argument("--no-merge", action="store_true", help="drop rows of presets not measured in this run")
    a = p.parse_args(argv)
    devices = ["cpu", "cuda"] if a.device == "auto" else [a.device]
    if a.device == "auto" and not torch.cuda.is_available():
        devices = ["cpu"]
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    for dev in devices:
        run(dev, a.presets, a.ks, a.rounds, a.repeats, a.warmup, a.threads, a.results_dir, a.max_load, a.max_wait,
            not a.no_merge)
    print(summary(a.results_dir))


if __name__ == "__main__":
    main()
