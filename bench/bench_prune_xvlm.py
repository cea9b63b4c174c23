"""Per-module latency of the X-VLM teachers, students and the pruned student (EfficientVLM Tab. 2).

Command (from the repository root)::

    python -m bench.bench_prune_xvlm                    # CPU (2 threads, batch 1), and CUDA if present
    python -m bench.bench_prune_xvlm --device cpu --rounds 5 --repeats 2
    python -m bench.bench_prune_xvlm --device cpu --models xvlm-mini-half --rounds 1 --repeats 1
    python -m bench.bench_prune_xvlm --profile ci --rounds 1 --repeats 1   # tiny models: a smoke run

What it times: the models of EfficientVLM's Tab. 2 (Wang et al. 2023), named exactly as
:func:`vlkit.methods.evlm.study.table_2` looks them up (params.yaml ``evlm`` of ``--profile``,
default ``default``: ``teacher``, ``student``, ``paper_presets``, ``paper_sparsity``):

* ``xvlm-mini`` (the mini teacher, 6/6/6 layers) and ``xvlm-mini-half`` (its 3/3/3 student,
  built with ``teacher=`` the former), at their ``dummy_inputs``: 16 cached EfficientNet cells
  + [CLS] as image tokens, 40 text tokens;
* ``xvlm-clip`` (12/6/6) and ``xvlm-clip-small`` (EfficientVLM's 6/3/3 student) at the paper's
  input: 196 patches + [CLS] (224 px), 35 text tokens;
* ``xvlm-clip-small pruned 50%``: the latter with the first half of the self- and
  cross-attention heads and FFN units of every unit kept and the rest physically removed
  (:func:`vlkit.methods.evlm.uniform_masks`, :func:`vlkit.methods.evlm.prune`).

Random weights (latency does not depend on them); the profile's builder ``overrides`` apply
(``--profile ci``: the tiny test models, written under ``runs/results-ci/bench/``). Each model
runs one forward pass split by module -- the pieces ``Backbone.forward`` runs, with device
synchronisation between them, under ``torch.inference_mode()``:

* ``vision`` -- ``backbone.embed`` minus its text embedding (the image embedding), then the
  vision units (``run_units`` over the contiguous run of units tagged ``vision``; CLIP's
  post-layernorm runs after the last of them);
* ``text`` -- the text embedding (timed inside ``embed`` by hooks on the text part's non-unit
  modules of :meth:`XVLM.parts <vlkit.models.xvlm.XVLM.parts>`), then the text units;
* ``fusion`` -- the fusion units, then ``finalize`` (the pooler);
* ``total`` -- the sum of the three parts of the same call.

Module boundaries follow the units' modality tags (``backbone.units[i].modality``), not fixed
indices; the split pass returns exactly what ``backbone(**x)`` does (the tests check it). The
plain ``backbone(**x)`` is timed too, as a check (``plain_ms`` on the ``total`` row). CPU: batch
1, ``torch.set_num_threads(2)``, fp32; GPU: batch 32, bf16. The models -- and the split and
plain calls of each -- are timed **interleaved** (round-robin, the order rotated each round,
:func:`vlkit.efficiency.latency` per turn, after warm-up calls of every entry) so that load from
other processes hits every model alike; each latency is the median over all timed calls (p10,
p90 and min beside it); on the CPU the process CPU time per part too (a diagnostic less
sensitive to other processes); the payload records the 1-minute load average. ``params_M`` and
``gmacs`` per module (one batch-1 pass) come from :func:`~vlkit.methods.evlm.study.module_params`
/ :func:`~vlkit.methods.evlm.study.module_macs`, as in Tab. 2.

Writes ``results/bench/prune_xvlm.<device_tag>.json`` (+ ``.md``) via
:func:`vlkit.bench_io.write_bench` -- rows ``{"model", "module", "latency_ms", ...}`` that
:func:`~vlkit.methods.evlm.study.latency_cell` reads; only this device's files. With
``--models``, this device's rows of the other models are kept (same profile; ``--no-merge``
drops them).

Runtime: about 1-2 minutes on 2 idle CPU cores with the defaults (building the five models and
counting their MACs ~15-30 s; one split + one plain pass of all five ~0.7 s, 20 rounds x 2: GMACs
per pass xvlm-clip 22.3, xvlm-clip-small 11.2, pruned 5.7, xvlm-mini 1.16, xvlm-mini-half 0.58);
well under a minute on a GPU. ``--profile ci``: a few seconds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from typing import Callable, Mapping

import torch
from torch import nn

from bench._common import BATCH, DTYPE, contended, loadavg, model_inputs, rotated, sync
from vlkit import config
from vlkit.bench_io import read_bench, rows_to_markdown, write_bench
from vlkit.efficiency import device_name, device_tag, latency
from vlkit.methods.evlm import prune, uniform_masks
from vlkit.methods.evlm.study import ENCODERS, module_macs, module_params, pruned_label
from vlkit.models import build
from vlkit.models.protocol import BackboneOutput, UnknownNameError
from vlkit.results import results_dir as profile_results_dir

BENCH = "prune_xvlm"
MODULES = (*ENCODERS, "total")
# where embed's time outside the hooked embeddings goes, and finalize's (as module_macs counts them)
EMBED_REST, FINALIZE = "vision", "fusion"

Clock = Callable[[], tuple[float, float]]


# ---------------------------------------------------------------------------- models
def model_names(cfg) -> list[str]:
    """The Tab. 2 keys of ``cfg`` (an :class:`~vlkit.methods.evlm.study.EVLMConfig`): teacher,
    student, the paper presets and the last of them pruned at ``paper_sparsity``."""
    names = [cfg.teacher, cfg.student, *cfg.paper_presets]
    if cfg.paper_presets:
        names.append(pruned_label(cfg.paper_presets[-1], cfg.paper_sparsity))
    return names


def build_models(cfg, names=None) -> dict[str, nn.Module]:
    """``{Tab. 2 key: backbone}`` for ``names`` (default all of :func:`model_names`), fp32, eval,
    on the CPU, with ``cfg.overrides``; random weights. The student is built from the teacher
    (``teacher=``) as :func:`~vlkit.tasks.baselines.load_backbone` does."""
    valid = model_names(cfg)
    names = list(valid if names is None else names)
    for n in names:
        if n not in valid:
            raise UnknownNameError("model", n, valid)
    kw = lambda p: dict(cfg.overrides.get(p) or {})  # noqa: E731
    out: dict[str, nn.Module] = {}
    teacher = None
    if cfg.teacher in names or cfg.student in names:
        teacher = build(cfg.teacher, **kw(cfg.teacher)).eval()
        if cfg.teacher in names:
            out[cfg.teacher] = teacher
    if cfg.student in names:
        extra = {"teacher": teacher} if cfg.student == "xvlm-mini-half" else {}
        out[cfg.student] = build(cfg.student, **extra, **kw(cfg.student)).eval()
    pruned = pruned_label(cfg.paper_presets[-1], cfg.paper_sparsity) if cfg.paper_presets else None
    for p in cfg.paper_presets:
        if p in names or (p == cfg.paper_presets[-1] and pruned in names):
            m = build(p, **kw(p)).eval()
            if p in names:
                out[p] = m
            if p == cfg.paper_presets[-1] and pruned in names:
                out[pruned] = prune(m, uniform_masks(m, cfg.paper_sparsity)).eval()
    return {n: out[n] for n in names}


def accounting(backbone) -> dict[str, dict[str, float]]:
    """``params_M`` and ``gmacs`` per module (:data:`MODULES`) of one batch-1 pass at the model's
    ``dummy_inputs``, rounded as :func:`~vlkit.methods.evlm.study.table_2` rounds them."""
    mp, mm = module_params(backbone), module_macs(backbone, backbone.dummy_inputs(1))
    return {m: {"params_M": round(mp[m] / 1e6, 3), "gmacs": round(mm[m] / 1e9, 4)} for m in MODULES}


def input_tokens(backbone) -> dict[str, int]:
    """Image and text tokens of the model's ``dummy_inputs``."""
    return {"image_tokens": int(backbone.vision_embeddings.num_tokens), "text_tokens": int(backbone.config.text_len)}


# ---------------------------------------------------------------------------- the split pass
def segments(backbone) -> list[tuple[str, int, int]]:
    """``(module, start, stop)``: the contiguous runs of units with one modality tag, in
    execution order (X-VLM: ``[("vision", 0, V), ("text", V, V + T), ("fusion", V + T, n)]``).
    A tag outside :data:`~vlkit.methods.evlm.study.ENCODERS` is an error naming it."""
    out: list[tuple[str, int, int]] = []
    for i, u in enumerate(backbone.units):
        if u.modality not in ENCODERS:
            raise UnknownNameError(f"modality (unit {u.name!r}) for the per-module split", u.modality, ENCODERS)
        if out and out[-1][0] == u.modality:
            out[-1] = (u.modality, out[-1][1], i + 1)
        else:
            out.append((u.modality, i, i + 1))
    return out


def embedding_modules(backbone) -> dict[str, list[nn.Module]]:
    """Per module other than :data:`EMBED_REST`: its modules in ``backbone.parts()`` that are not
    units (X-VLM: ``text`` -> the text embeddings; ``fusion`` -> the pooler, which ``embed``
    never calls). Those that run inside ``embed`` are timed there by hooks."""
    if not hasattr(backbone, "parts"):
        raise TypeError(f"the per-module split needs a backbone with parts() (X-VLM); got {type(backbone).__name__}")
    parts = backbone.parts()
    blocks = {id(u.module) for u in backbone.units}
    return {m: [mod for mod in parts.get(m, []) if id(mod) not in blocks] for m in ENCODERS if m != EMBED_REST}


def clock(device: str) -> Clock:
    """``now()`` -> ``(wall, process CPU)`` seconds, after waiting for ``device``'s queued work."""
    def now() -> tuple[float, float]:
        sync(device)
        return time.perf_counter(), time.process_time()
    return now


def split_forward(backbone, inputs: Mapping, now: Clock | None = None
                  ) -> tuple[BackboneOutput, dict[str, float], dict[str, float]]:
    """``backbone(**inputs)`` run as ``embed`` / ``run_units`` over each run of :func:`segments` /
    ``finalize`` (what ``Backbone.forward`` runs, so the output is the same), timed per module
    (module docstring). Returns ``(output, wall seconds per module, process CPU seconds per
    module)`` over :data:`~vlkit.methods.evlm.study.ENCODERS`. ``now``: :func:`clock` (default
    the CPU's); the caller sets the grad mode."""
    now = now or clock("cpu")
    wall = dict.fromkeys(ENCODERS, 0.0)
    cpu = dict.fromkeys(ENCODERS, 0.0)

    def add(module: str, t0: tuple[float, float], t1: tuple[float, float]) -> None:
        wall[module] += t1[0] - t0[0]
        cpu[module] += t1[1] - t0[1]

    def hooks(module: str, mod: nn.Module) -> list:
        start: list = []

        def before(*_):
            start.append(now())

        def after(*_):
            add(module, start.pop(), now())

        return [mod.register_forward_pre_hook(before), mod.register_forward_hook(after)]

    handles = [h for m, mods in embedding_modules(backbone).items() for mod in mods for h in hooks(m, mod)]
    try:
        t0 = now()
        state = backbone.embed(**inputs)
        t1 = now()
    finally:
        for h in handles:
            h.remove()
    inner = (sum(wall.values()), sum(cpu.values()))  # only the hooked embeddings so far
    add(EMBED_REST, t0, (t1[0] - inner[0], t1[1] - inner[1]))
    t = t1
    for module, start, stop in segments(backbone):
        state = backbone.run_units(state, start, stop)
        t, prev = now(), t
        add(module, prev, t)
    out = backbone.finalize(state)
    add(FINALIZE, t, now())
    return out, wall, cpu


# ---------------------------------------------------------------------------- timing
def _summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median": statistics.median(s), "p10": s[int(0.1 * (len(s) - 1))], "p90": s[int(0.9 * (len(s) - 1))],
            "min": s[0]}


def time_models(models: dict, inputs: dict, device: str, rounds: int, repeats: int, warmup: int) -> dict:
    """Interleaved timing of ``(model, "split")`` and ``(model, "plain")`` entries: ``warmup``
    untimed calls of each, then ``rounds`` rounds in which every entry (order rotated per
    round) runs ``repeats`` timed calls. Returns per model ``{"wall": {module: [s...]},
    "cpu": {module: [s...]}, "plain": [s...], "plain_cpu": [s...]}`` (``total`` = the sum of
    the parts of each split call)."""
    now = clock(device)
    rec = {lb: {"wall": {m: [] for m in MODULES}, "cpu": {m: [] for m in MODULES}, "plain": [], "plain_cpu": []}
           for lb in models}

    def caller(label: str, kind: str, timed: bool) -> Callable[[], None]:
        model, x, r = models[label], inputs[label], rec[label]

        def split():
            with torch.inference_mode():
                _, wall, cpu = split_forward(model, x, now)
            if timed:
                for key, parts in (("wall", wall), ("cpu", cpu)):
                    for m in ENCODERS:
                        r[key][m].append(parts[m])
                    r[key]["total"].append(sum(parts.values()))

        def plain():
            c0 = time.process_time()
            with torch.inference_mode():
                model(**x)
            if timed:
                r["plain_cpu"].append(time.process_time() - c0)

        return split if kind == "split" else plain

    entries = [(lb, kind) for lb in models for kind in ("split", "plain")]
    for lb, kind in entries:
        fn = caller(lb, kind, timed=False)
        for _ in range(warmup):
            fn()
    for r in range(rounds):
        for lb, kind in rotated(entries, r):
            batch = next(iter(inputs[lb].values())).shape[0]
            res = latency(caller(lb, kind, timed=True), warmup=0, repeats=repeats, device=device,
                          dtype=DTYPE[device], batch_size=batch)
            if kind == "plain":
                rec[lb]["plain"] += res["times_s"]
    return rec


def rows_for(label: str, rec: dict, acct: dict, device: str) -> list[dict]:
    """The rows of one model: one per module of :data:`MODULES` (milliseconds)."""
    ms = lambda s: round(1e3 * s, 4)  # noqa: E731
    total = _summary(rec["wall"]["total"])["median"]
    plain = _summary(rec["plain"])
    rows = []
    for m in MODULES:
        w = _summary(rec["wall"][m])
        rows.append({
            "model": label, "module": m, **acct[m],
            "latency_ms": ms(w["median"]), "p10_ms": ms(w["p10"]), "p90_ms": ms(w["p90"]), "min_ms": ms(w["min"]),
            "share": round(w["median"] / total, 4) if total > 0 else None,
            "process_cpu_ms": ms(statistics.median(rec["cpu"][m])) if device == "cpu" else None,
            "plain_ms": ms(plain["median"]) if m == "total" else None,
            "plain_min_ms": ms(plain["min"]) if m == "total" else None,
            "split_vs_plain": round(w["median"] / plain["median"], 4) if m == "total" else None,
            "calls": len(rec["wall"][m]),
        })
    return rows


def run_device(device: str, models: dict, acct: dict, *, profile: str, rounds: int, repeats: int, warmup: int,
               threads: int = 2, results_dir=None, merge: bool = True, order=None) -> dict:
    """Time ``models`` (``{Tab. 2 key: CPU fp32 backbone}``) on ``device`` and write
    ``prune_xvlm.<device_tag>.json``; ``acct``: :func:`accounting` per model. With ``merge``,
    rows of models not timed now are kept from this device's file when it holds the same
    ``profile``. ``order``: the row order (default :func:`model_names` order as given)."""
    if device == "cpu":
        torch.set_num_threads(threads)
    tag = device_tag(device)
    dtype, batch = DTYPE[device], BATCH[device]
    load_before = loadavg()
    t0 = time.perf_counter()
    for m in models.values():
        m.to(device=device, dtype=dtype)
    try:
        inputs = {lb: model_inputs(m, batch, device, dtype) for lb, m in models.items()}
        rec = time_models(models, inputs, device, rounds, repeats, warmup)
    finally:
        for m in models.values():
            m.to(device="cpu", dtype=torch.float32)
    load_after = loadavg()
    measured_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = [r for lb in models for r in rows_for(lb, rec[lb], acct[lb], device)]
    per_model = {lb: {"measured_at": measured_at, "seconds_all_models": round(time.perf_counter() - t0, 1),
                      "batch_size": batch, "dtype": str(dtype).removeprefix("torch."), "rounds": rounds,
                      "repeats": repeats, "warmup": warmup, **input_tokens(m),
                      "loadavg_1m_before": load_before, "loadavg_1m_after": load_after}
                 for lb, m in models.items()}
    old = read_bench(BENCH, tag, results_dir) if merge else None
    if old is not None and old.get("profile") == profile:
        rows = [r for r in old.get("rows", []) if r.get("model") not in models] + rows
        per_model = {**{k: v for k, v in old.get("per_model", {}).items() if k not in models}, **per_model}
    rank = {lb: i for i, lb in enumerate(order or list(models))}
    rows.sort(key=lambda r: (rank.get(r["model"], len(rank)), MODULES.index(r["module"])))
    payload = {
        "bench": BENCH, "profile": profile, "device": tag, "device_name": device_name(device),
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "batch_size": batch, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "python": platform.python_version(),
        "modules": {"vision": "embed minus the hooked text embedding (image embedding) + the vision units "
                              "(CLIP post-layernorm after the last)",
                    "text": "text embedding (hooks inside embed) + the text units",
                    "fusion": "the fusion units + finalize (pooler)",
                    "total": "vision + text + fusion of the same call; plain_ms: backbone(**x) timed alone"},
        "timing": f"{rounds} interleaved rounds x {repeats} calls per (model, split|plain) after {warmup} warm-up "
                  f"calls each, torch.inference_mode(), device sync between parts; latency_ms = median of all "
                  f"calls; params_M / gmacs: module_params / module_macs of one batch-1 pass",
        "pruning": "uniform_masks: the first (1 - s) of the heads (self and cross) and FFN units of every unit "
                   "kept, the rest physically removed (vlkit.methods.evlm.prune)",
        "loadavg_1m": {"before": load_before, "after": load_after},
        "contended": contended(load_before) if device == "cpu" else None,
        "per_model": per_model, "rows": rows,
    }
    path = write_bench(BENCH, tag, payload, results_dir)
    payload["_path"] = str(path)
    return payload


def print_table(payload: dict) -> None:
    cols = ("model", "module", "params_M", "gmacs", "latency_ms", "min_ms", "share", "plain_ms", "split_vs_plain")
    print(rows_to_markdown([{c: r.get(c) for c in cols} for r in payload["rows"]],
                           title=f"{BENCH} -- {payload['device']} ({payload['device_name']}), batch "
                                 f"{payload['batch_size']}, {payload['dtype']}"))
    load = payload["loadavg_1m"]
    if load["before"] is not None:
        print(f"load average (1 min) before / after: {load['before']:.1f} / {load['after']:.1f}")
    if payload.get("contended"):
        print("WARNING: load average above the CPU count: other processes share the cores, wall-clock "
              "latencies are unreliable; rerun on an idle machine")
    print(f"-> {payload['_path']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_prune_xvlm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto = the CPU, then CUDA when available")
    ap.add_argument("--profile", default="default", choices=config.PROFILES,
                    help="params.yaml evlm profile: model names and builder overrides (ci: tiny models)")
    ap.add_argument("--models", nargs="+", default=None, help="a subset of the Tab. 2 keys (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--results-dir", default=None,
                    help="default: <results of the profile>/bench (results/bench; ci: runs/results-ci/bench)")
    ap.add_argument("--no-merge", action="store_true", help="drop this device's rows of models not timed now")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if args.rounds < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        ap.error(f"need --rounds >= 1, --repeats >= 1, --warmup >= 0, --threads >= 1; got {args.rounds}, "
                 f"{args.repeats}, {args.warmup}, {args.threads}")
    cfg = config.resolve("evlm", args.profile)
    names = model_names(cfg)
    if args.models is not None:
        bad = [m for m in args.models if m not in names]
        if bad:
            ap.error(f"unknown --models {bad}; valid: {names} (quote keys with spaces)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
    out_dir = args.results_dir or profile_results_dir(args.profile) / "bench"

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    models = build_models(cfg, args.models)
    acct = {lb: accounting(m) for lb, m in models.items()}
    print(f"built and counted {list(models)} in {time.perf_counter() - t0:.0f} s", flush=True)
    for dev in devices:
        payload = run_device(dev, models, acct, profile=args.profile, rounds=args.rounds, repeats=args.repeats,
                             warmup=args.warmup, threads=args.threads, results_dir=out_dir,
                             merge=not args.no_merge, order=names)
        print_table(payload)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
