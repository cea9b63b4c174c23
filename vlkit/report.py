"""The results report (DVC stage ``report``, notebook ``notebooks/90_report.py``): every study's
tables in the papers' layouts, the papers' reported numbers beside them, the benchmark
summaries and the stage times against the pipeline's budgets.

Each function reads the tables of one results folder (``results/``, or ``runs/results-ci/``
under the ``ci`` profile: :func:`vlkit.results.results_dir`) and returns a DataFrame. A table
the stages have not written yet comes back as one row per missing file with ``status`` "not
produced: run `dvc repro <stage>`" (:func:`not_produced`), so a partial pipeline still gives
a report and says what to run.

What is assembled
-----------------
* DAS (Wu et al., NeurIPS 2023): Tab. A (skipped layers, score, additional GMACs, and the
  score change against the adapters-only k = 0 model), Tab. B (DAS vs random skip sets,
  verdicts), Tab. C (MiniLM vs the PETL baselines); the GMACs anchors of the paper-size ViLT /
  METER beside the paper's; skip k against score drop, ours and the official repository's.
* EfficientVLM (Wang et al., ACL Findings 2023): Tab. 3 with each row's share of the teacher's
  score / parameters and its MACs ratio; the sparsity sweep (Fig. 3); the per-encoder sparsity
  of the global budget; Tab. 2 (params / GMACs / latency per module, a GPU column always).
* SHERL (Diao et al., ECCV 2024): Tab. 1 (params %, accounted and measured training memory and
  their ratio to full fine-tuning, score per method), Fig. 7 (reduction factor r), the CNN
  table; the training-memory ratio beside the paper's T5-base figure.
* Benchmarks: each ``results/bench/<bench>.<device>.json`` summarised, one column per device,
  "not measured" for a device without a file (:mod:`vlkit.bench_io`).
* Stage times (``timings/*.json``) against the issue's budgets (minutes on 2 CPU cores).

Paper numbers (``vlkit/paper_numbers.yaml``) each carry the source they were read from. They
are full-scale results on real datasets; the tables here are mini backbones on generated or
small data, so they are shown for orientation (relative effects), never as a comparison.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import yaml

from .bench_io import NOT_MEASURED, bench_devices, read_bench
from .models.protocol import UnknownNameError

__all__ = ["PAPER_NUMBERS_FILE", "NOT_PRODUCED", "STAGE_BUDGETS", "load_paper_numbers", "paper_value",
           "paper_numbers_table", "read_result", "not_produced", "is_missing", "das_table_a", "das_table_b",
           "das_table_c", "das_points", "das_paper_gmacs", "das_skip_effect", "evlm_table3", "evlm_orientation",
           "evlm_sweep", "evlm_encoder_sparsity", "evlm_ablation", "evlm_table2", "sherl_tab1", "sherl_headline",
           "sherl_fig7", "sherl_cnn", "sherl_orientation", "bench_summary", "stage_times", "write_index"]

PAPER_NUMBERS_FILE = Path(__file__).with_name("paper_numbers.yaml")
NOT_PRODUCED = "not produced: run `dvc repro {stage}`"
STATUS_COLUMNS = ["table", "status"]
PAPER_KEYS = ("id", "paper", "quantity", "value", "unit", "kind", "source")
PAPER_KINDS = ("paper", "derived", "issue")
# tables whose stage is not their folder's name
_STAGE_OF = {"pretrain/helps": "helps", "baselines": "baselines"}


# ============================================================================ paper numbers
def load_paper_numbers(path: str | Path = PAPER_NUMBERS_FILE) -> dict[str, dict]:
    """The paper numbers by id. Every entry must have :data:`PAPER_KEYS` (a non-empty
    ``source``: where the number was read), a numeric ``value``, a ``kind`` of
    :data:`PAPER_KINDS`, and a unique ``id``; anything else is an error naming the entry."""
    entries = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of entries, got {type(entries).__name__}")
    out: dict[str, dict] = {}
    for i, e in enumerate(entries):
        name = e.get("id", f"entry {i}") if isinstance(e, dict) else f"entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{path}: {name} is not a mapping")
        missing = [k for k in PAPER_KEYS if e.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{path}: paper number {name!r} lacks {', '.join(missing)} (every number needs "
                             f"{', '.join(PAPER_KEYS)})")
        if isinstance(e["value"], bool) or not isinstance(e["value"], (int, float)):
            raise ValueError(f"{path}: paper number {name!r} has a non-numeric value {e['value']!r}")
        if e["kind"] not in PAPER_KINDS:
            raise UnknownNameError("paper-number kind", e["kind"], PAPER_KINDS)
        if e["id"] in out:
            raise ValueError(f"{path}: duplicate paper-number id {e['id']!r}")
        out[e["id"]] = e
    return out


def paper_value(paper: dict[str, dict], pid: str) -> float:
    """``paper[pid]["value"]``; an unknown id is an error listing the valid ones (a typo must
    not read as "no paper number")."""
    if pid not in paper:
        raise UnknownNameError("paper-number id", pid, list(paper))
    return float(paper[pid]["value"])


def paper_numbers_table(paper: dict[str, dict]) -> pd.DataFrame:
    """Every paper number with its source, as a table."""
    return pd.DataFrame([{k: e[k] for k in PAPER_KEYS} for e in paper.values()], columns=list(PAPER_KEYS))


# ============================================================================ reading
def stage_of(name: str) -> str:
    """The DVC stage that writes the table ``name`` (``"das/table_a"`` -> ``"das"``)."""
    return _STAGE_OF.get(name, name.split("/")[0])


def read_result(results: str | Path, name: str) -> pd.DataFrame | None:
    """``<results>/<name>.csv`` as written by :func:`vlkit.results.write_table`, or ``None``."""
    path = Path(results) / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() else None


def not_produced(*names: str) -> pd.DataFrame:
    """One row per missing table: its name and "not produced: run `dvc repro <stage>`"."""
    return pd.DataFrame({"table": list(names), "status": [NOT_PRODUCED.format(stage=stage_of(n)) for n in names]},
                        columns=STATUS_COLUMNS)


def is_missing(df: pd.DataFrame) -> bool:
    """Whether ``df`` is a :func:`not_produced` frame rather than a table."""
    return list(df.columns) == STATUS_COLUMNS


def _one(results, name: str) -> pd.DataFrame:
    """The table ``name`` of ``results``, or its :func:`not_produced` row."""
    t = read_result(results, name)
    return not_produced(name) if t is None else t


def _pick(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """``df`` restricted to ``columns`` it has, in that order, with a fresh index."""
    return df[[c for c in columns if c in df]].reset_index(drop=True)


def _ratio(a: pd.Series, b: pd.Series, digits: int = 4) -> pd.Series:
    """``a / b`` rounded to ``digits``, NaN where ``b`` is missing or zero."""
    return (a / b.where(b != 0)).round(digits)


# ============================================================================ DAS
def das_table_a(results) -> pd.DataFrame:
    """DAS Tab. A: per backbone x task x scope x k the skipped layers, the test score, the
    additional GMACs against the un-adapted backbone (and in % of it), the trainable parameters,
    and ``score_vs_k0``: the score minus the adapters-only (k = 0) model's of the same cell."""
    a = _one(results, "das/table_a")
    if is_missing(a):
        return a
    a = a.assign(gmacs_change_pct=(100 * a.add_gmacs / a.gmacs).round(2))
    das = a.method == "das"
    k0 = a[das & (a.k == 0)].groupby(["backbone", "task", "scope"]).test.mean()
    ref = [k0.get((b, t, s), math.nan) for b, t, s in zip(a.backbone, a.task, a.scope)]
    a["score_vs_k0"] = (a.test - pd.Series(ref, index=a.index)).where(das).round(2)
    return _pick(a, ["task", "backbone", "method", "scope", "k", "skipped", "test", "test_se", "score_vs_k0",
                     "add_gmacs", "gmacs", "gmacs_change_pct", "trainable"])


def das_table_b(results) -> pd.DataFrame:
    """DAS Tab. B: DAS over seeds against random skip sets of the same k, with the difference
    of the means and the study's verdict (a tie when it is within the spreads)."""
    b = _one(results, "das/table_b")
    if is_missing(b):
        return b
    b = b.assign(diff=(b["DAS mean"] - b["random mean"]).round(2))
    return _pick(b, ["backbone", "task", "scope", "k", "DAS mean", "DAS sd", "DAS runs", "DAS sets", "random mean",
                     "random sd", "random runs", "random sets", "diff", "test SE", "verdict"])


def das_table_c(results) -> pd.DataFrame:
    """DAS Tab. C (a language model): each method's score, its difference to full fine-tuning
    (``vs_full``), trainable parameters and GMACs change per example."""
    c = _one(results, "das/table_c")
    if is_missing(c):
        return c
    full = c.loc[c.method == "full", "test"]
    c = c.assign(vs_full=(c.test - full.mean()).round(2) if len(full) else math.nan,
                 gmacs_change_pct=(100 * c.add_gmacs / c.gmacs).round(2))
    return _pick(c, ["backbone", "task", "method", "k", "skipped", "test", "test_se", "vs_full", "macro_f1",
                     "trainable", "add_gmacs", "gmacs_change_pct"])


def das_points(results) -> pd.DataFrame:
    """Score against GMACs change (%) of every DAS / baseline row of Tabs. A and C, for the
    score-vs-GMACs figure (``label``: the method, with k for DAS)."""
    parts = [t for t in (das_table_a(results), das_table_c(results)) if not is_missing(t)]
    if not parts:
        return not_produced("das/table_a", "das/table_c")
    p = pd.concat(parts, ignore_index=True)
    label = [f"DAS k={int(k)}" if m == "das" else m for m, k in zip(p.method, p.k.fillna(0))]
    return _pick(p.assign(label=label), ["backbone", "task", "method", "k", "label", "test", "gmacs_change_pct"])


def das_paper_gmacs(results, paper: dict[str, dict]) -> pd.DataFrame:
    """The GMACs anchors of the paper-size backbones beside the DAS paper's: one ViLT-B/32 layer
    (``add_gmacs(k=0) - add_gmacs(k=1)``), the net change of skipping one layer, the adapters
    beside it (net + layer), and METER's GMACs change per k against the abstract's -11.97 %."""
    pg = _one(results, "das/paper_gmacs")
    if is_missing(pg):
        return pg
    rows = []
    vilt = pg[(pg.preset == "vilt-b32") & (pg.scope == "global")].set_index("k").add_gmacs
    if {0, 1} <= set(vilt.index):
        layer = round(vilt[0] - vilt[1], 4)
        for q, ours, pid, how in (
                ("GMACs of one ViLT-B/32 layer", layer, "das_vilt_layer_gmacs", "add_gmacs k=0 minus k=1"),
                ("net GMACs of skipping one ViLT-B/32 layer", round(vilt[1], 4), "das_vilt_skip1_net_gmacs",
                 "add_gmacs k=1"),
                ("GMACs of the adapters beside one skipped layer", round(vilt[1] + layer, 4),
                 "das_vilt_skip1_adapter_gmacs", "add_gmacs k=1 plus one layer")):
            rows.append({"quantity": q, "ours": ours, "paper": paper_value(paper, pid), "ours: from": how,
                         "paper: source": f"{pid} ({paper[pid]['kind']})"})
    meter = pg[(pg.preset == "meter-clip16-roberta") & (pg.k > 0)]
    for _, r in meter.iterrows():
        rows.append({"quantity": f"METER GMACs change, {r['scope']} k={int(r['k'])} ({r['skipped']}) (%)",
                     "ours": round(100 * r["add_gmacs"] / r["gmacs"], 2),
                     "paper": paper_value(paper, "das_meter_vqa_flops_pct"),
                     "ours: from": "100 add_gmacs / gmacs", "paper: source": "das_meter_vqa_flops_pct (paper; searched "
                     "k on VQAv2, not stated in the abstract)"})
    return pd.DataFrame(rows, columns=["quantity", "ours", "paper", "ours: from", "paper: source"])


def das_skip_effect(results, paper: dict[str, dict], profile: str = "") -> pd.DataFrame:
    """Skip k layers: the score change and the cost change against the k = 0 adapter model --
    ours (Tab. A: GMACs per example) beside the official repository's LLaMA-7B / ScienceQA rows
    (inference time). Relative effects only: the settings share nothing else."""
    a = das_table_a(results)
    rows = []
    if not is_missing(a):
        for (b, t, s), g in a[a.method == "das"].groupby(["backbone", "task", "scope"], sort=False):
            base = g[g.k == 0]
            if base.empty:
                continue
            t0, add0, total0 = base.test.iloc[0], base.add_gmacs.iloc[0], base.gmacs.iloc[0] + base.add_gmacs.iloc[0]
            for _, r in g.sort_values("k").iterrows():
                rows.append({"source": f"ours ({profile})" if profile else "ours", "model": f"{b} ({s})", "task": t,
                             "k": int(r["k"]), "score": r["test"], "score_change": round(r["test"] - t0, 2),
                             "cost_change_pct": round(100 * (r["add_gmacs"] - add0) / total0, 2),
                             "cost": "GMACs per example"})
    else:
        rows.append({"source": "ours", "model": a.status.iloc[0], "task": None, "k": None, "score": None,
                     "score_change": None, "cost_change_pct": None, "cost": None})
    ks = sorted({int(e["k"]) for pid, e in paper.items() if pid.startswith("das_lavin_k")})
    if 0 in ks:
        avg0, time0 = paper_value(paper, "das_lavin_k0_avg"), paper_value(paper, "das_lavin_k0_time")
        for k in ks:
            avg, tm = paper_value(paper, f"das_lavin_k{k}_avg"), paper_value(paper, f"das_lavin_k{k}_time")
            rows.append({"source": "paper (official repo)", "model": "LLaMA-7B (LaVIN)", "task": "ScienceQA", "k": k,
                         "score": avg, "score_change": round(avg - avg0, 2),
                         "cost_change_pct": round(100 * (tm - time0) / time0, 2), "cost": "inference time"})
    return pd.DataFrame(rows, columns=["source", "model", "task", "k", "score", "score_change", "cost_change_pct",
                                       "cost"])


# ============================================================================ EfficientVLM
def evlm_table3(results) -> pd.DataFrame:
    """EfficientVLM Tab. 3 (teacher / student / modal-adaptive / uniform) with each row's
    ``score_vs_teacher_pct`` (100 test / teacher test), ``params_vs_teacher_pct`` and
    ``macs_ratio_vs_teacher`` (teacher GMACs / row GMACs), all against the same task's teacher row."""
    t = _one(results, "evlm/table3")
    if is_missing(t):
        return t
    teacher = t[t.method == "teacher"].groupby("task")[["test", "params_M", "gmacs"]].first()
    ref = teacher.reindex(t.task).set_index(t.index)
    t = t.assign(score_vs_teacher_pct=(100 * t.test / ref.test).round(1),
                 params_vs_teacher_pct=(100 * t.params_M / ref.params_M).round(1),
                 macs_ratio_vs_teacher=_ratio(ref.gmacs, t.gmacs, 2))
    return _pick(t, ["task", "method", "scope", "target", "test", "test_sd", "seeds", "params_M", "gmacs",
                     "sparsity", "sparsity_vision", "sparsity_text", "sparsity_fusion", "score_vs_teacher_pct",
                     "params_vs_teacher_pct", "macs_ratio_vs_teacher"])


def evlm_orientation(results, paper: dict[str, dict], method: str = "EfficientVLM modal-adaptive") -> pd.DataFrame:
    """Per task: the pruned student's share of the teacher's parameters and score, and its MACs
    ratio, beside the paper's 44.3 % / 98.4 % / 2.2x (the paper's speed-up is measured time)."""
    t3 = evlm_table3(results)
    if is_missing(t3):
        return t3
    rows = []
    for _, r in t3[t3.method == method].iterrows():
        for q, col, pid in (("parameters / teacher (%)", "params_vs_teacher_pct", "evlm_params_share_pct"),
                            ("score / teacher (%)", "score_vs_teacher_pct", "evlm_score_retained_pct"),
                            ("teacher / student cost (x)", "macs_ratio_vs_teacher", "evlm_speedup")):
            rows.append({"task": r["task"], "quantity": q, "ours": r[col], "paper": paper_value(paper, pid),
                         "ours: from": f"Tab. 3, {method} vs teacher" + (" (GMACs)" if pid == "evlm_speedup" else ""),
                         "paper: source": f"{pid} ({paper[pid]['kind']})" + (
                             "; inference time, not MACs" if pid == "evlm_speedup" else "")})
    return pd.DataFrame(rows, columns=["task", "quantity", "ours", "paper", "ours: from", "paper: source"])


def evlm_sweep(results) -> pd.DataFrame:
    """EfficientVLM Fig. 3 as a table: score, achieved (and per-encoder) sparsity and GMACs at
    each target under each budget (modal-adaptive = one global budget, uniform = one per encoder)."""
    s = _one(results, "evlm/sweep")
    if is_missing(s):
        return s
    s = s.assign(budget=s.scope.map({"global": "modal-adaptive", "per_group": "uniform"}).fillna(s.scope))
    return _pick(s, ["task", "target", "budget", "sparsity", "sparsity_vision", "sparsity_text", "sparsity_fusion",
                     "test", "test_se", "params_M", "gmacs"])


def evlm_encoder_sparsity(results) -> pd.DataFrame:
    """The share of each encoder's prunable parameters the global budget removed, per task."""
    return _one(results, "evlm/encoder_sparsity")


def evlm_ablation(results, which: str = "table4") -> pd.DataFrame:
    """EfficientVLM Tab. 1 (``table1``: manual per-encoder sparsities beside the global budget)
    or Tab. 4 (``table4``: KD only / pruning only / fine-tune only / both): score, sparsity
    (overall and per encoder), parameters and GMACs per row."""
    if which not in ("table1", "table4"):
        raise UnknownNameError("EfficientVLM ablation table", which, ["table1", "table4"])
    t = _one(results, f"evlm/{which}")
    if is_missing(t):
        return t
    return _pick(t, ["task", "method", "kd", "scope", "target", "target_all", "test", "test_se", "sparsity",
                     "sparsity_vision", "sparsity_text", "sparsity_fusion", "params_M", "gmacs"])


def evlm_table2(results) -> pd.DataFrame:
    """EfficientVLM Tab. 2: params, GMACs and latency per module; a ``latency_ms gpu`` column of
    "not measured" is added when no GPU benchmark file fed the table."""
    t = _one(results, "evlm/table2")
    if is_missing(t):
        return t
    lat = [c for c in t if c.startswith("latency_ms ")]
    if not any(not c.removeprefix("latency_ms ").startswith("cpu") for c in lat):
        t = t.assign(**{"latency_ms gpu": NOT_MEASURED})
    return t


# ============================================================================ SHERL
def _with_memory(results, t: pd.DataFrame) -> pd.DataFrame:
    """``t`` with the measured ``peak_mib`` of ``sherl/memory`` (NaN where not measured) and
    ``est_vs_full`` / ``peak_vs_full``: each row's memory over full fine-tuning's of the same
    task and backbone."""
    mem = read_result(results, "sherl/memory")
    if mem is not None and "peak_mib" in mem:
        on = [c for c in ("task", "backbone", "method", "options") if c in t and c in mem]
        t = t.merge(mem[on + ["peak_mib"]].drop_duplicates(on), on=on, how="left")
    else:
        t = t.assign(peak_mib=math.nan)
    full = t[t.method == "full"].groupby(["task", "backbone"])[["est_mib", "peak_mib"]].first()
    ref = full.reindex(pd.MultiIndex.from_arrays([t.task, t.backbone])).set_axis(t.index)
    return t.assign(est_vs_full=_ratio(t.est_mib, ref.est_mib, 3), peak_vs_full=_ratio(t.peak_mib, ref.peak_mib, 3))


def sherl_tab1(results, which: str = "text") -> pd.DataFrame:
    """SHERL Tab. 1 (``which``: ``text`` or ``vl``): per method the trainable parameters in % of
    the backbone's, the accounted (``est_mib``) and measured (``peak_mib``) training memory and
    their ratios to full fine-tuning, and the test score."""
    if which not in ("text", "vl"):
        raise UnknownNameError("SHERL Tab. 1 part", which, ["text", "vl"])
    name = f"sherl/tab1_{which}"
    t = read_result(results, name)
    if t is None:
        return not_produced(name)
    return _pick(_with_memory(results, t), ["task", "backbone", "method", "params_pct", "trainable", "est_mib",
                                            "est_vs_full", "peak_mib", "peak_vs_full", "test", "test_se"])


def sherl_headline(results) -> pd.DataFrame:
    """SHERL against full fine-tuning over seeds: mean, SD, the difference and the verdict."""
    t = _one(results, "sherl/headline")
    if is_missing(t):
        return t
    return _pick(t, ["task", "backbone", "method", "runs", "mean", "sd", "test SE", "sherl - full", "verdict"])


def sherl_fig7(results) -> pd.DataFrame:
    """SHERL Fig. 7: the MTSA reduction factor r against score, parameters and memory (the full
    fine-tuning row, r empty, gives ``est_vs_full``)."""
    t = read_result(results, "sherl/fig7_reduction")
    if t is None:
        return not_produced("sherl/fig7_reduction")
    return _pick(_with_memory(results, t), ["r", "method", "params_pct", "est_mib", "est_vs_full", "test", "test_se"])


def sherl_cnn(results) -> pd.DataFrame:
    """SHERL on a CNN (EfficientNet-Lite0 on generated counting): the Tab. 1 columns."""
    t = read_result(results, "sherl/cnn")
    if t is None:
        return not_produced("sherl/cnn")
    return _pick(_with_memory(results, t), ["task", "backbone", "method", "params_pct", "est_mib", "est_vs_full",
                                            "peak_mib", "peak_vs_full", "test", "test_se"])


def sherl_orientation(results, bench_dir, paper: dict[str, dict]) -> pd.DataFrame:
    """SHERL's training memory over full fine-tuning's: the benchmark's T5-base / bert-base
    ratios per device ("not measured" without a file) and MiniLM's from Tab. 1, beside the
    paper's T5-base 2.9 GB / 17.6 GB (the only paper figure available offline)."""
    paper_t5 = round(paper_value(paper, "sherl_t5_sherl_gb") / paper_value(paper, "sherl_t5_full_gb"), 3)
    rows = []
    for dev in _devices(["memory"], bench_dir):
        payload = read_bench("memory", dev, bench_dir)
        for preset in ("t5-base", "bert-base"):
            ours = NOT_MEASURED if payload is None else _row_value(payload, "mem_vs_full", preset=preset,
                                                                   method="sherl")
            rows.append({"quantity": f"SHERL / full FT peak memory, {preset}", "device": dev, "ours": ours,
                         "paper": paper_t5 if preset == "t5-base" else math.nan,
                         "ours: from": f"bench/memory.{dev}.json" if payload is not None else "no memory bench file "
                                       "for this device",
                         "paper: source": "sherl_t5_sherl_gb / sherl_t5_full_gb (paper, quoted in issue #6)"
                         if preset == "t5-base" else "paper number not available offline"})
    t1 = sherl_tab1(results, "text")
    if is_missing(t1):
        rows.append({"quantity": "SHERL / full FT memory, Tab. 1 (text)", "device": None, "ours": t1.status.iloc[0],
                     "paper": math.nan, "ours: from": "sherl/tab1_text", "paper: source": None})
    else:
        for _, r in t1[t1.method == "sherl"].iterrows():
            for col in ("peak_vs_full", "est_vs_full"):
                rows.append({"quantity": f"SHERL / full FT {col.split('_')[0]} memory, {r['backbone']} "
                             f"{r['task']}", "device": "cpu" if col == "peak_vs_full" else "accounted",
                             "ours": r[col], "paper": math.nan, "ours: from": "sherl/tab1_text (+ sherl/memory)",
                             "paper: source": "paper number not available offline"})
    return pd.DataFrame(rows, columns=["quantity", "device", "ours", "paper", "ours: from", "paper: source"])


# ============================================================================ benchmarks
def _devices(benches: Iterable[str], bench_dir) -> list[str]:
    """Every device with a file of one of ``benches``: CPU tags first, then GPUs -- ``gpu``
    when there is none, so a GPU column always shows (as "not measured")."""
    found = sorted({d for b in benches for d in bench_devices(b, bench_dir)})
    gpus = [d for d in found if not d.startswith("cpu")]
    return [d for d in found if d.startswith("cpu")] + (gpus or ["gpu"])


def _row_value(payload: dict, key: str, **match):
    """``key`` of the first row of ``payload["rows"]`` matching ``match``; None when no row does."""
    for r in payload.get("rows", []):
        if all(r.get(k) == v for k, v in match.items()):
            return r.get(key)
    return None


def _q_prune_bert(p: dict) -> dict:
    return {f"speed-up at sparsity {r['sparsity']:g}, bert-base batch {p.get('batch_size', 1)} (x)": r.get("speedup")
            for r in p.get("rows", []) if r.get("sparsity")}


def _q_prune_xvlm(p: dict) -> dict:
    return {f"latency of {r['model']} (ms)": r.get("latency_ms") for r in p.get("rows", [])
            if r.get("module") == "total"}


def _q_memory(p: dict) -> dict:
    return {f"{r['method']} / full FT peak memory, {r['preset']}": r.get("mem_vs_full") for r in p.get("rows", [])
            if r.get("method") != "full"}


def _q_skip(p: dict) -> dict:
    out = {}
    for name, c in p.get("criterion", {}).items():
        if isinstance(c, dict) and "speedup" in c:
            out[f"vilt-b32 {name}: speed-up (x)"] = round(c["speedup"], 3)
            out[f"vilt-b32 {name}: MACs ratio (x)"] = round(c["macs_ratio"], 3)
            if "required_speedup" in c:  # the bar: speed-up - 1 >= 0.9 (MACs ratio - 1)
                out[f"vilt-b32 {name}: required speed-up (x)"] = round(c["required_speedup"], 3)
    return out


def _q_sherl_cache(p: dict) -> dict:
    return {f"cached-prefix epoch speed-up, {r['preset']} (x)": r.get("gain") for r in p.get("rows", [])}


BENCH_QUANTITIES = {"prune_bert": _q_prune_bert, "prune_xvlm": _q_prune_xvlm, "memory": _q_memory,
                    "skip": _q_skip, "sherl_cache": _q_sherl_cache}
# acceptance bars / paper figures shown beside a quantity: quantity -> paper-number id
BENCH_REFERENCES = {"speed-up at sparsity 0.5, bert-base batch 1 (x)": "issue5_prune50_bar",
                    "sherl / full FT peak memory, bert-base": "issue6_sherl_mem_bar",
                    "cached-prefix epoch speed-up, bert-base (x)": "issue6_cache_gain_bar"}


def _load_avg(p: dict):
    if "load_avg_1m_at_start" in p:
        return p["load_avg_1m_at_start"]
    if isinstance(p.get("loadavg_1m"), dict):
        return round(p["loadavg_1m"].get("before"), 2)
    runs = [v.get("load_average_1_5_15min_before") for v in p.get("per_preset", {}).values() if isinstance(v, dict)]
    return round(runs[0][0], 2) if runs and runs[0] else None


def bench_summary(bench_dir, paper: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per benchmark quantity, one column per device (CPU tags, then GPUs, or ``gpu``):
    the value from ``<bench>.<device>.json``, "not measured" where the device has no file, "–"
    where its file has no such row; ``reference``: an acceptance bar or paper figure, if any.
    The 1-minute load average at the start tells whether the machine was quiet."""
    benches = sorted({p.name.split(".")[0] for p in Path(bench_dir).glob("*.json")}) if Path(bench_dir).is_dir() else []
    if not benches:
        return not_produced("bench")
    devices = _devices(benches, bench_dir)
    rows = []
    for bench in benches:
        payloads = {d: read_bench(bench, d, bench_dir) for d in devices}
        per_dev = {d: ({**BENCH_QUANTITIES.get(bench, lambda p: {"file present": "yes"})(p),
                        "1-min load average at start": _load_avg(p)} if p is not None else None)
                   for d, p in payloads.items()}
        quantities = list(dict.fromkeys(q for v in per_dev.values() if v for q in v))
        for q in quantities:
            row = {"bench": bench, "quantity": q}
            for d in devices:
                row[d] = NOT_MEASURED if per_dev[d] is None else per_dev[d].get(q)
            pid = BENCH_REFERENCES.get(q)
            row["reference"] = (f"{paper[pid]['value']:g} ({pid})" if paper and pid in (paper or {}) else None)
            rows.append(row)
    return pd.DataFrame(rows, columns=["bench", "quantity", *devices, "reference"])


# ============================================================================ stage times
# (stage, budget in minutes on 2 CPU cores (issue #7; None: no budget of its own), timing-file
# alternatives: each a tuple of files summed, the first alternative found wins -- the notebook
# runner's wall time before the stage's own per-section seconds)
STAGE_BUDGETS = (
    ("data + features", 15, (("data", "features"),)),
    ("pretrain", 45, (("pretrain",),)),
    ("helps", None, (("pretrain-helps",),)),
    ("baselines", 10, (("01_data",), ("baselines",))),
    ("das", 25, (("20_das",), ("das",))),
    ("evlm", 30, (("21_evlm",), ("evlm",))),
    ("sherl", 20, (("30_sherl",), ("sherl",))),
    ("report", 5, (("90_report",),)),
    ("tour", None, (("00_tour",),)),
)
PIPELINE_BUDGET_MIN = 150  # the whole default-profile `dvc repro` on 2 CPU cores (issue #7)


def _wall_seconds(rec: dict) -> tuple[float, str] | None:
    """A timing record's seconds and what they are: ``wall_s`` (the whole stage),
    ``total_seconds``, or the sum of the per-section ``seconds`` (excludes set-up)."""
    if isinstance(rec.get("wall_s"), (int, float)):
        return float(rec["wall_s"]), "wall_s"
    if isinstance(rec.get("total_seconds"), (int, float)):
        return float(rec["total_seconds"]), "total_seconds"
    if isinstance(rec.get("seconds"), dict):
        return float(sum(v for v in rec["seconds"].values() if isinstance(v, (int, float)))), "sum of sections"
    return None


def _find_timing(dirs: Sequence[Path], name: str, profile: str) -> dict | None:
    for d in dirs:
        f = Path(d) / f"{name}.{profile}.json"
        if f.is_file():
            return json.loads(f.read_text(encoding="utf-8"))
    return None


def stage_times(timing_dirs: str | Path | Sequence[str | Path], profile: str) -> pd.DataFrame:
    """Each stage's measured minutes (from ``<dir>/<name>.<profile>.json``, the first directory
    holding it) against its budget: ``within_budget`` yes / no, or "–" without a budget or a
    timing (``source`` "not timed"); a last ``total`` row sums every stage against the
    pipeline's :data:`PIPELINE_BUDGET_MIN` ("–" while a stage is not timed)."""
    dirs = [Path(timing_dirs)] if isinstance(timing_dirs, (str, Path)) else [Path(d) for d in timing_dirs]
    rows = []
    for stage, budget, alternatives in STAGE_BUDGETS:
        found = None
        for names in alternatives:
            recs = [_find_timing(dirs, n, profile) for n in names]
            secs = [_wall_seconds(r) if r else None for r in recs]
            if all(secs):
                found = (sum(s for s, _ in secs), ", ".join(f"{n}.{profile}.json ({how})"
                                                           for n, (_, how) in zip(names, secs)))
                break
        minutes = round(found[0] / 60, 1) if found else math.nan
        within = "–" if (budget is None or not found) else ("yes" if minutes <= budget else "no")
        rows.append({"stage": stage, "budget_min": budget, "measured_min": minutes, "within_budget": within,
                     "source": found[1] if found else "not timed"})
    missing = [r["stage"] for r in rows if r["source"] == "not timed"]
    total = round(sum(r["measured_min"] for r in rows if r["source"] != "not timed"), 1)
    rows.append({"stage": "total", "budget_min": PIPELINE_BUDGET_MIN, "measured_min": total,
                 "within_budget": "–" if missing else ("yes" if total <= PIPELINE_BUDGET_MIN else "no"),
                 "source": f"sum; not timed: {', '.join(missing)}" if missing else "sum of the stages above"})
    return pd.DataFrame(rows)


# ============================================================================ index
def write_index(out: str | Path, sections: Sequence[tuple[str, str]], intro: str = "") -> Path:
    """``<out>/index.md``: ``intro``, then for each ``(title, name)`` a heading and the
    Markdown table ``<out>/<name>.md`` already written (or a "not written" line)."""
    from .results import atomic_write_text

    out = Path(out)
    parts = [intro.strip() + "\n"] if intro else []
    for title, name in sections:
        md = out / f"{name}.md"
        body = md.read_text(encoding="utf-8") if md.is_file() else f"({name}.md not written)\n"
        parts.append(f"## {title}\n\n{body}")
    return atomic_write_text(out / "index.md", "\n".join(parts))
