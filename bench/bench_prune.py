"""Latency of physically pruned bert-base vs unpruned, beside the MACs ratio (EfficientVLM Tab. 2).

Command (from the repository root)::

    python -m bench.bench_prune                  # CPU (2 threads, batch 1), and CUDA if present
    python -m bench.bench_prune --device cpu --rounds 5 --repeats 5

What it does: builds ``bert-base`` (random weights: latency does not depend on them), prunes
25 / 50 / 75 % of the heads *and* of the FFN units of every layer uniformly (keeping the first
ones; :func:`vlkit.methods.evlm.prune`), and times one forward pass at sequence length 128,
fp32, under ``torch.inference_mode()`` -- CPU batch 1 with ``torch.set_num_threads(2)``, GPU
batch 32. The models are timed **interleaved** (round-robin, the order rotated each round)
so that load from other processes on a shared machine hits every model alike: the latency is
the median over all timed calls (:func:`vlkit.efficiency.latency` per round, after warm-up)
and the speed-up the median over rounds of the paired ratio unpruned / pruned. On the CPU
the process CPU time per call is recorded too (a diagnostic that load from other processes
distorts less than wall time); the payload carries the 1-minute load average.
MACs per sequence come from :func:`vlkit.efficiency.macs` (FlopCounter / 2, math attention).

Writes ``results/bench/prune_bert.<device_tag>.json`` (+ ``.md``) via :func:`vlkit.bench_io.write_bench`.

Expected (issue #8): the 50 %-pruned model >= 1.8x faster than the unpruned one at CPU
batch 1 (ideal ~2x: the MACs ratio is 1.98x; embeddings and pooler are not pruned).
Runtime: about 1-3 minutes on 2 CPU cores (building bert-base and counting MACs take ~40 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from bench._common import contended, loadavg, rotated
from vlkit.bench_io import write_bench
from vlkit.efficiency import device_name, device_tag, latency, macs, params
from vlkit.methods.evlm import prune, uniform_masks
from vlkit.models import build

BENCH = "prune_bert"
PRESET = "bert-base"
SPARSITIES = (0.0, 0.25, 0.5, 0.75)
TARGET_SPEEDUP_50 = 1.8


def build_models(sparsities=SPARSITIES, seed: int = 0) -> dict[float, torch.nn.Module]:
    """``{sparsity: model}``: the unpruned bert-base and its uniformly pruned copies (eval mode)."""
    full = build(PRESET, seed=seed).eval()
    return {s: full if s == 0 else prune(full, uniform_masks(full, s)).eval() for s in sparsities}


def time_models(models: dict, inputs: dict, device: str, rounds: int, repeats: int, warmup: int) -> dict:
    """Interleaved timing on a possibly shared machine.

    After ``warmup`` calls of every model, ``rounds`` rounds each time every model for
    ``repeats`` calls (:func:`vlkit.efficiency.latency`, order rotated per round). Per model:
    median / p10 / p90 / min over all calls, and ``ratio_to_first``: the median over rounds of
    (first model's round median / this model's round median) -- a *paired* speed-up that
    cancels load changes slower than one round (other processes on the same cores).
    """
    keys = list(models)
    times = {k: [] for k in keys}
    per_round = {k: [] for k in keys}
    cpu = {k: [] for k in keys}  # process CPU seconds per call (diagnostic, see below)
    info = {}

    def caller(model, sink=None):
        def fn():
            p0 = time.process_time()
            with torch.inference_mode():
                model(**inputs)
            if sink is not None:
                sink.append(time.process_time() - p0)
        return fn

    batch = inputs["input_ids"].shape[0]
    for k in keys:
        latency(caller(models[k]), warmup=warmup, repeats=1, device=device)
    for r in range(rounds):
        order = rotated(keys, r)
        for k in order:
            res = latency(caller(models[k], cpu[k]), warmup=0, repeats=repeats, device=device,
                          dtype=torch.float32, batch_size=batch)
            times[k] += res["times_s"]
            per_round[k].append(res["median_s"])
            info[k] = res
    out = {}
    for k in keys:
        t = sorted(times[k])
        out[k] = {"median_s": statistics.median(t), "min_s": t[0], "p10_s": t[int(0.1 * (len(t) - 1))],
                  "p90_s": t[int(0.9 * (len(t) - 1))], "n": len(t), "threads": info[k]["threads"],
                  "device_name": info[k]["device_name"], "cpu_s": statistics.median(cpu[k]),
                  "ratio_to_first": statistics.median(a / b for a, b in zip(per_round[keys[0]], per_round[k]))}
    return out


def run_device(device: str, models: dict, seq_len: int, batch: int, rounds: int, repeats: int, warmup: int,
               macs_per_seq: dict, results_dir=None) -> dict:
    load_before = loadavg()
    moved = {k: m.to(device) for k, m in models.items()}
    inputs = {k: v.to(device) for k, v in models[0.0].dummy_inputs(batch, seq_len=seq_len).items()}
    timing = time_models(moved, inputs, device, rounds, repeats, warmup)
    base = timing[0.0]["median_s"]
    rows = []
    for s, m in moved.items():
        layer = m.unit("En0")
        rows.append({
            "sparsity": s,
            "heads_per_layer": layer.attn.num_heads,
            "ffn_per_layer": layer.ffn.fc1.out_features,
            "params_M": round(params(m) / 1e6, 3),
            "gmacs_per_seq": round(macs_per_seq[s] / 1e9, 3),
            "macs_ratio": round(macs_per_seq[0.0] / macs_per_seq[s], 3),
            "latency_ms": round(1e3 * timing[s]["median_s"], 3),
            "p10_ms": round(1e3 * timing[s]["p10_s"], 3),
            "p90_ms": round(1e3 * timing[s]["p90_s"], 3),
            "min_ms": round(1e3 * timing[s]["min_s"], 3),
            "speedup": round(timing[s]["ratio_to_first"], 3),
            "speedup_of_medians": round(base / timing[s]["median_s"], 3),
            "speedup_of_mins": round(timing[0.0]["min_s"] / timing[s]["min_s"], 3),
            "process_cpu_ms": round(1e3 * timing[s]["cpu_s"], 3) if device == "cpu" else None,
            "speedup_process_cpu": round(timing[0.0]["cpu_s"] / timing[s]["cpu_s"], 3) if device == "cpu" else None,
        })
    tag = device_tag(device)
    payload = {
        "bench": BENCH, "preset": PRESET, "device": tag, "device_name": device_name(device),
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "batch_size": batch, "seq_len": seq_len, "dtype": "float32", "torch": torch.__version__,
        "pruning": "uniform per layer: first (1-s)*12 heads and (1-s)*3072 FFN units kept, physically removed",
        "timing": f"{rounds} interleaved rounds x {repeats} calls per model after {warmup} warm-up calls, "
                  f"torch.inference_mode(); latency_ms = median of all calls; speedup = median over rounds "
                  f"of the paired ratio (unpruned round median / pruned round median)",
        "process_cpu_note": "CPU only, diagnostic: median process CPU time per call (all threads); less "
                            "sensitive than wall time to other processes on the same cores",
        "macs_note": "MACs per sequence = torch FlopCounterMode / 2 under the math attention backend",
        "loadavg_1m": {"before": load_before, "after": loadavg()},
        "contended": contended(load_before) if device == "cpu" else None,
        "rows": rows,
        "speedup_50": next(r["speedup"] for r in rows if r["sparsity"] == 0.5) if 0.5 in moved else None,
        "target_speedup_50_cpu_batch1": TARGET_SPEEDUP_50,
    }
    for m in moved.values():
        m.to("cpu")
    path = write_bench(BENCH, tag, payload, results_dir)
    payload["_path"] = str(path)
    return payload


def print_table(payload: dict) -> None:
    print(f"\n{BENCH} on {payload['device']} ({payload['device_name']}), batch {payload['batch_size']}, "
          f"seq {payload['seq_len']}, fp32")
    print(f"{'sparsity':>8} {'heads':>5} {'ffn':>5} {'params M':>9} {'GMACs':>7} {'MACs x':>7} "
          f"{'median ms':>10} {'min ms':>9} {'speed-up':>8}")
    for r in payload["rows"]:
        print(f"{r['sparsity']:>8.2f} {r['heads_per_layer']:>5} {r['ffn_per_layer']:>5} {r['params_M']:>9.2f} "
              f"{r['gmacs_per_seq']:>7.2f} {r['macs_ratio']:>7.2f} {r['latency_ms']:>10.2f} {r['min_ms']:>9.2f} "
              f"{r['speedup']:>7.2f}x")
    print(f"load average (1 min) before / after: {payload['loadavg_1m']['before']:.1f} / "
          f"{payload['loadavg_1m']['after']:.1f}" if payload["loadavg_1m"]["before"] is not None else "")
    if payload.get("contended"):
        print(f"WARNING: load average above the {os.cpu_count()} CPUs: other processes share the cores, "
              f"wall-clock speed-ups are unreliable; rerun on an idle machine")
    if payload["rows"][0].get("process_cpu_ms") is not None:
        print("process CPU time speed-up: " + ", ".join(f"{r['sparsity']:.2f}: {r['speedup_process_cpu']:.2f}x"
                                                         for r in payload["rows"]))
    print(f"-> {payload['_path']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_prune", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto = the CPU, then CUDA when available")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--cpu-batch", type=int, default=1)
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 if the CPU 50%% speed-up is below {TARGET_SPEEDUP_50}x")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = build_models()
    cpu_inputs = models[0.0].dummy_inputs(1, seq_len=args.seq_len)
    macs_per_seq = {s: macs(m, cpu_inputs) for s, m in models.items()}
    status = 0
    for dev in devices:
        batch = args.cpu_batch if dev == "cpu" else args.gpu_batch
        payload = run_device(dev, models, args.seq_len, batch, args.rounds, args.repeats, args.warmup,
                             macs_per_seq, args.results_dir)
        print_table(payload)
        s50 = payload["speedup_50"]
        if dev == "cpu" and s50 is not None:
            ok = s50 >= TARGET_SPEEDUP_50
            print(f"50%-pruned speed-up at CPU batch {batch}, {payload['threads']} threads: {s50:.2f}x "
                  f"(target >= {TARGET_SPEEDUP_50}x: {'met' if ok else 'NOT met'}; MACs ratio "
                  f"{next(r['macs_ratio'] for r in payload['rows'] if r['sparsity'] == 0.5):.2f}x)")
            if args.check and not ok:
                status = 1
    print(f"total {time.perf_counter() - t0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
