"""The baselines table: every backbone x task with full fine-tuning, a linear probe on the
frozen backbone, chance and a text-only baseline -- each with its test-set size and
standard error.

    python -m vlkit.tasks.baselines --profile default     # -> results/baselines.{csv,md}

Settings come from params.yaml's ``baselines`` section (:class:`BaselinesConfig`). What the
table is for: the generated tasks must *separate* methods, so on ``val`` full fine-tuning
should land well above chance and below saturation (70-97%) and the linear probe clearly
below it; easy-VQA is nearly saturated and stays as the real-data sanity check. Train sets
are fixed random subsets (``task_settings``: ``train``/``val``/``test`` rows, stated in the
table) so that the whole stage fits its CPU budget; evaluation subsets are the same for
every backbone and method. Nothing is tuned on ``test``.

Weights: ``weights`` maps a preset to a checkpoint folder of the in-repo vision-language
pre-training (``runs/pretrain/<preset>/final``) or ``None``; the table's ``pretrained``
column says which rows used one. ``xvlm-mini-half`` without weights of its own is derived
from ``xvlm-mini`` (EfficientVLM's layer-halved student, initialised from the teacher's odd
layers) and counts as pre-trained when that teacher was. The text side (MiniLM) and the
image cells (EfficientNet-Lite0) are pre-trained in every row.

Reuse: full fine-tuning of a pre-trained preset is also one arm of the pre-training-helps
comparison (:mod:`vlkit.tasks.helps`, which runs before this table with the same settings).
Every row carries a ``fingerprint`` (:func:`run_fingerprint`: the task's settings, gallery,
feature mode, the preset's overrides and the *content* of its weights' ``meta.json``, seed,
profile); :func:`run_baselines` given ``reuse`` rows copies a row whose fingerprint matches
instead of training it again -- the same run, measured once (the row's timing says
``reused``). Any difference in those inputs means a new fingerprint and a fresh run.

Timings (seconds per row, and the stage total) go to ``results/timings/baselines.<profile>.json``,
apart from the table, which is identical across runs of one profile and seed on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from vlkit.models.protocol import UnknownNameError

from .runner import TASKS, RetrievalTask, finetune, get_task

__all__ = ["BaselinesConfig", "TASK_SETTING_KEYS", "run_baselines", "run_fingerprint", "load_backbone", "load_task_data",
           "task_spec", "train_config_for", "table_row", "chance_rows", "cached_backbone", "cached_task_data", "main"]

TASK_SETTING_KEYS = ("train", "val", "test", "epochs", "steps", "lr", "probe_lr", "probe_epochs", "batch_size",
                     "text_len", "head_lr_mult", "warmup")
METHODS = ("full", "linear_probe")
VL_PRESETS = ("vilt-mini", "meter-mini", "xvlm-mini", "xvlm-mini-half")
TEXT_PRESETS = ("minilm",)


@dataclasses.dataclass(frozen=True)
class BaselinesConfig:
    """The ``baselines`` section of params.yaml.

    ``backbones`` x ``tasks`` (vision-language) and ``text_backbones`` x ``text_tasks`` are
    run with each of ``methods``. ``task_settings[task]``: ``train`` / ``val`` / ``test``
    rows (a fixed random subset; ``None`` = all; ``val: 0`` = no val pass; for retrieval
    ``train`` counts images and ``val`` / ``test`` the two-tower gallery's images),
    ``epochs`` (or ``steps``), ``lr``,
    ``batch_size``, ``text_len``, and for the linear probe ``probe_lr`` / ``probe_epochs``;
    ``head_lr_mult``: the head's lr multiple under full fine-tuning (ViLT: 10);
    ``warmup``: warm-up fraction of the linear schedule. ``train``: defaults of those keys
    for every task. ``gallery``: retrieval protocol (``images_single`` for single-stream
    presets, ``captions_per_image``, ``rerank_k``). ``weights``: ``{preset: checkpoint or
    null}``. ``overrides``: ``{preset: builder overrides}`` (tiny models in ``ci``).
    ``features``: ``cache`` (the on-disk cell cache of the ``features`` stage) or
    ``compute`` (cells of the subset rows only, computed on the spot: ``ci``).
    ``probe_splits``: where the linear probe is evaluated (``test`` always; ``val`` costs a
    pass over it per backbone -- the calibration only needs full fine-tuning on ``val``).
    ``threads``: torch threads (the stage's budget is 2 cores).
    """

    backbones: list[str] = dataclasses.field(default_factory=lambda: list(VL_PRESETS))
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["easyvqa", "shapes_nlvr", "shapes_retrieval"])
    text_backbones: list[str] = dataclasses.field(default_factory=lambda: ["minilm"])
    text_tasks: list[str] = dataclasses.field(default_factory=lambda: ["movie_reviews", "bbc_news"])
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    train: dict = dataclasses.field(default_factory=dict)
    task_settings: dict = dataclasses.field(default_factory=dict)
    gallery: dict = dataclasses.field(default_factory=dict)
    weights: dict = dataclasses.field(default_factory=dict)
    overrides: dict = dataclasses.field(default_factory=dict)
    features: str = "cache"
    threads: int | None = 2
    probe_splits: list[str] = dataclasses.field(default_factory=lambda: ["test"])

    def __post_init__(self):
        from vlkit.models import PRESETS

        for b in list(self.backbones) + list(self.text_backbones) + list(self.weights) + list(self.overrides):
            if b not in PRESETS:
                raise UnknownNameError("preset in params.yaml baselines", b, sorted(PRESETS))
        for t in list(self.tasks) + list(self.text_tasks) + list(self.task_settings):
            if t not in TASKS:
                raise UnknownNameError("task in params.yaml baselines", t, TASKS)
        for t in self.tasks:
            if get_task(t).modality != "vl":
                raise ValueError(f"baselines.tasks holds vision-language tasks; {t!r} is a text task (text_tasks)")
        for t in self.text_tasks:
            if get_task(t).modality != "text":
                raise ValueError(f"baselines.text_tasks holds text tasks; {t!r} is vision-language (tasks)")
        for m in self.methods:
            if m not in METHODS:
                raise UnknownNameError("baseline method", m, METHODS)
        blocks = [("train", self.train)] + [(f"task_settings.{t}", s or {}) for t, s in self.task_settings.items()]
        for where, d in blocks:
            for k in d:
                if k not in TASK_SETTING_KEYS:
                    raise UnknownNameError(f"key in params.yaml baselines.{where}", k, TASK_SETTING_KEYS)
        for k in self.gallery:
            if k not in ("images_single", "captions_per_image", "rerank_k"):
                raise UnknownNameError("key in params.yaml baselines.gallery", k,
                                       ["images_single", "captions_per_image", "rerank_k"])
        for split in self.probe_splits:
            if split not in ("val", "test"):
                raise UnknownNameError("baselines.probe_splits split", split, ["val", "test"])
        if "test" not in self.probe_splits:
            raise ValueError("baselines.probe_splits must include test (the table reports it)")
        if self.features not in ("cache", "compute"):
            raise UnknownNameError("features mode", self.features, ["cache", "compute"])
        for p, w in self.weights.items():
            if w is not None and not isinstance(w, str):
                raise ValueError(f"baselines.weights.{p} = {w!r}: a checkpoint path or null")

    def settings(self, task: str) -> dict:
        """Training/eval settings of ``task``: built-in defaults < ``train`` < ``task_settings``."""
        base = {"train": None, "val": None, "test": None, "epochs": 1, "steps": None, "lr": 1e-4, "probe_lr": 1e-3,
                "probe_epochs": 5, "batch_size": 32, "text_len": None, "head_lr_mult": 10.0, "warmup": 0.1}
        return {**base, **self.train, **(self.task_settings.get(task) or {})}


# ---------------------------------------------------------------------------- backbones
def _weights_path(w: str) -> Path:
    """A ``weights`` entry as a path: params.yaml paths are relative to the repository."""
    from vlkit.paths import ROOT

    return Path(w) if Path(w).is_absolute() else ROOT / w


def load_backbone(preset: str, cfg: BaselinesConfig, built: dict | None = None) -> tuple[torch.nn.Module, str]:
    """``(backbone, pretrained)``: ``preset`` built with its ``weights`` and ``overrides``.
    ``pretrained`` is ``"yes"`` when an in-repo VL pre-training checkpoint was loaded (for
    ``xvlm-mini-half``: its own, or its teacher's), ``"no"`` otherwise (text presets: their
    real MiniLM weights count as ``"yes"``). ``built``: already built backbones to reuse
    (the ``xvlm-mini`` teacher)."""
    from vlkit.models import build

    built = built if built is not None else {}
    kw = dict(cfg.overrides.get(preset) or {})
    w = cfg.weights.get(preset)
    if preset in TEXT_PRESETS:
        return build(preset, **kw), "yes"
    if w is not None:
        path = _weights_path(w)
        if not path.exists():
            raise FileNotFoundError(f"baselines.weights.{preset} = {w!r} does not exist; run the pretrain stage or "
                                    f"set it to null")
        return build(preset, weights=str(path), **kw), "yes"
    if preset == "xvlm-mini-half":
        teacher_w = cfg.weights.get("xvlm-mini")
        teacher = built.get("xvlm-mini")
        if teacher is None:  # the teacher as the table builds it (its weights and overrides)
            teacher, _ = load_backbone("xvlm-mini", cfg, built)
        return build(preset, teacher=teacher, **kw), "yes" if teacher_w is not None else "no"
    return build(preset, **kw), "no"


def cached_backbone(name: str, cfg: BaselinesConfig, cache: dict) -> tuple[torch.nn.Module, str]:
    """:func:`load_backbone` once per ``name`` per ``cache`` (a dict the caller keeps across
    tables; the ``xvlm-mini`` teacher built there is reused for ``xvlm-mini-half``). Callers
    fine-tune deep copies, so the cached backbone stays the pre-trained one."""
    key = ("backbone", name)
    if key not in cache:
        built = {k[1]: v[0] for k, v in cache.items() if isinstance(k, tuple) and k[0] == "backbone"}
        cache[key] = load_backbone(name, cfg, built)
    return cache[key]


def cached_task_data(task: str, cfg: BaselinesConfig, profile: str | None, cache: dict) -> dict:
    """:func:`load_task_data` once per ``task`` per ``cache``."""
    key = ("data", task)
    if key not in cache:
        cache[key] = load_task_data(task, cfg, profile)
    return cache[key]


# ---------------------------------------------------------------------------- rows
def _weights_identity(preset: str, cfg: BaselinesConfig) -> str | None:
    """The weights a row of ``preset`` starts from, by content: the sha256 of the checkpoint's
    ``meta.json`` (it records the pre-training's params hash, steps and history), the
    teacher's for a derived ``xvlm-mini-half``; ``None`` without in-repo weights."""
    import hashlib

    w = cfg.weights.get(preset)
    if w is None and preset == "xvlm-mini-half":
        w = cfg.weights.get("xvlm-mini")
    if w is None:
        return None
    meta = _weights_path(w) / "meta.json"
    return hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else f"missing:{w}"


def run_fingerprint(cfg: BaselinesConfig, task: str, backbone: str, method: str, seed: int,
                    profile: str | None) -> str:
    """A hash of everything that decides one row's numbers (module docstring, *Reuse*): two
    rows with one fingerprint are the same run."""
    from vlkit.checkpoint import hash_params

    return hash_params({"task": task, "backbone": backbone, "method": method, "seed": seed, "profile": profile,
                        "settings": cfg.settings(task), "gallery": cfg.gallery, "features": cfg.features,
                        "overrides": cfg.overrides.get(backbone) or {},
                        "probe_splits": list(cfg.probe_splits) if method == "linear_probe" else None,
                        "weights": _weights_identity(backbone, cfg) if backbone not in TEXT_PRESETS else None})


def train_config_for(s: dict, n_train: int, linear: bool, seed: int):
    """The :class:`vlkit.train.TrainConfig` of one row: settings ``s`` (:meth:`BaselinesConfig.settings`)
    on ``n_train`` examples -- ``probe_epochs`` at ``probe_lr`` for a linear probe, else
    ``steps`` (or ``epochs`` over the data) at ``lr`` with linear warm-up and decay."""
    from vlkit.train import TrainConfig

    bs = min(int(s["batch_size"]), n_train)
    if linear:
        return TrainConfig(epochs=int(s["probe_epochs"]), batch_size=bs, lr=float(s["probe_lr"]), seed=seed,
                           progress=False, fused=True)
    steps = s["steps"] if s["steps"] is not None else max(1, int(s["epochs"]) * (n_train // bs))
    return TrainConfig(steps=int(steps), batch_size=bs, lr=float(s["lr"]), seed=seed, schedule="linear",
                       warmup_steps=int(round(float(s["warmup"]) * steps)), max_grad_norm=1.0, weight_decay=0.01,
                       progress=False, fused=True)


def load_task_data(task: str, cfg: BaselinesConfig, profile: str | None) -> dict:
    spec, s = get_task(task), cfg.settings(task)
    kw = dict(profile=profile, features=cfg.features, text_len=s["text_len"])
    data = {"train": spec.load("train", limit=s["train"], **kw)}
    for split in ("val", "test") if s["val"] != 0 else ("test",):
        extra = gallery_options(cfg) if isinstance(spec, RetrievalTask) else {}
        data[split] = spec.load(split, limit=s[split], **kw, **extra)
    return data


def gallery_options(cfg: BaselinesConfig) -> dict:
    return {"captions_per_image": cfg.gallery["captions_per_image"]} if "captions_per_image" in cfg.gallery else {}


def task_spec(task: str, cfg: BaselinesConfig):
    spec = get_task(task)
    if isinstance(spec, RetrievalTask):
        changes = {}
        if "images_single" in cfg.gallery:
            changes["gallery_images_single"] = int(cfg.gallery["images_single"])
        if "rerank_k" in cfg.gallery:
            changes["rerank_k"] = int(cfg.gallery["rerank_k"])
        if "captions_per_image" in cfg.gallery:
            changes["captions_per_image"] = int(cfg.gallery["captions_per_image"])
        spec = dataclasses.replace(spec, **changes)
    return spec


def table_row(task: str, backbone: str, method: str, pretrained: str, spec, res: dict | None, data: dict,
         chance: dict | None = None) -> dict:
    test = chance if chance is not None else res["test"]
    val = None if res is None else res.get("val")
    row = {"task": task, "backbone": backbone, "method": method, "pretrained": pretrained, "metric": spec.metric,
           "test": round(test["score"], 2), "test_se": round(test["se"], 2), "n_test": int(test["n"]),
           "val": None if val is None else round(val["score"], 2),
           "val_se": None if val is None else round(val["se"], 2),
           "n_val": None if val is None else int(val["n"]),
           "n_train": None if res is None else res["n_train"], "steps": None if res is None else res["steps"],
           "trainable": None if res is None else res["trainable"]["backbone"] + res["trainable"]["head"]}
    if isinstance(spec, RetrievalTask):
        row["gallery"] = f"{test['n']} img x {test['n_captions']} cap"
        for d in ("i2t", "t2i"):
            for k in spec.ks:
                row[f"{d}_R@{k}"] = round(test[f"{d}_R@{k}"], 2)
    else:
        row["gallery"] = None
    if "macro_f1" in test:
        row["macro_f1"] = round(test["macro_f1"], 2)
    return row


def chance_rows(task: str, spec, data: dict, single_stream: bool = False, two_tower: bool = True) -> list[dict]:
    """Reference rows of ``task`` that train no backbone: for classification the
    train-majority class and the text-only baseline (:meth:`ClassifyTask.text_only`: what the
    text alone gives away); for retrieval the expected R@K of a random ranking on each
    gallery in use."""
    if isinstance(spec, RetrievalTask):
        rows = []
        if two_tower:
            rows.append(table_row(task, "–", "chance", "–", spec, None, data, spec.chance(data["train"], data["test"])))
        if single_stream:
            rows.append(table_row(task, "–", "chance", "–", spec, None, data,
                             spec.chance(data["train"], data["test"], single_stream=True)))
        return rows
    rows = []
    train = data["train"]
    for method, score in (("chance (majority class)", lambda split: spec.chance(train, split)),
                          ("text only (n-gram LR)", spec.text_only(train))):  # fit once, scored on test and val
        row = table_row(task, "–", method, "–", spec, None, data, score(data["test"]))
        if "val" in data:
            v = score(data["val"])
            row["val"], row["val_se"], row["n_val"] = round(v["score"], 2), round(v["se"], 2), int(v["n"])
        rows.append(row)
    return rows


def run_baselines(cfg: BaselinesConfig, profile: str | None = None, *, seed: int = 0,
                  log: Callable[[str], None] | None = print,
                  reuse: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """Run every row of the table; return ``(table, timings)``. ``reuse``: earlier rows (with
    their ``fingerprint`` column); a row whose fingerprint matches is copied, not rerun."""
    from vlkit.models.towers import TwoTowerBackbone

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    say = log or (lambda _m: None)
    t_stage = time.perf_counter()
    rows: list[dict] = []
    timings: dict = {"rows": []}
    built: dict = {}
    plan = [(b, t) for b in cfg.backbones for t in cfg.tasks] + [(b, t) for b in cfg.text_backbones
                                                                 for t in cfg.text_tasks]
    data_cache: dict = {}
    kinds: dict[str, set] = {}
    known = {} if reuse is None or "fingerprint" not in reuse else {
        r["fingerprint"]: {k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
        for r in reuse.to_dict("records") if isinstance(r["fingerprint"], str)}
    for backbone, task in plan:
        fps = {m: run_fingerprint(cfg, task, backbone, m, seed, profile) for m in cfg.methods}
        spec, s = task_spec(task, cfg), cfg.settings(task)
        if task not in data_cache:
            t0 = time.perf_counter()
            data_cache[task] = load_task_data(task, cfg, profile)
            timings.setdefault("data", {})[task] = round(time.perf_counter() - t0, 1)
        data = data_cache[task]
        if backbone not in built:
            t0 = time.perf_counter()
            built[backbone] = load_backbone(backbone, cfg, {k: v[0] for k, v in built.items()})
            timings.setdefault("build", {})[backbone] = round(time.perf_counter() - t0, 1)
        base, pretrained = built[backbone]
        kinds.setdefault(task, set()).add("two" if isinstance(base, TwoTowerBackbone) else "single")
        for method in cfg.methods:
            if fps[method] in known:
                rows.append(dict(known[fps[method]]))
                timings["rows"].append({"task": task, "backbone": backbone, "method": method,
                                        "reused": fps[method]})
                say(f"{task:17s} {backbone:15s} {method:13s} reused ({fps[method]})")
                continue
            t0 = time.perf_counter()
            linear = method == "linear_probe"
            tc = train_config_for(s, len(data["train"]), linear, seed)
            splits = tuple(sp for sp in ("val", "test") if sp in data and (not linear or sp in cfg.probe_splits))
            res = finetune(spec, copy.deepcopy(base), method, data=data, train_config=tc, seed=seed,
                           eval_splits=splits, head_lr_mult=None if linear else float(s["head_lr_mult"]))
            rows.append({**table_row(task, backbone, method, pretrained, spec, res, data), "fingerprint": fps[method]})
            dt = time.perf_counter() - t0
            timings["rows"].append({"task": task, "backbone": backbone, "method": method, "seconds": round(dt, 1),
                                    "train_seconds": round(res["train_seconds"], 1),
                                    "eval_seconds": round(res["eval_seconds"], 1)})
            val = "   –  " if rows[-1]["val"] is None else f"{rows[-1]['val']:6.2f}"
            say(f"{task:17s} {backbone:15s} {method:13s} val {val}  test {rows[-1]['test']:6.2f} "
                f"+- {rows[-1]['test_se']:.2f}  ({dt:.0f} s)")
            del res
    for task in list(cfg.tasks) + list(cfg.text_tasks):
        if task in data_cache:
            spec = task_spec(task, cfg)
            k = kinds.get(task, set())
            rows += chance_rows(task, spec, data_cache[task], single_stream="single" in k, two_tower="two" in k)
    timings["total_seconds"] = round(time.perf_counter() - t_stage, 1)
    table = pd.DataFrame(rows)
    order = {t: i for i, t in enumerate(list(cfg.tasks) + list(cfg.text_tasks))}
    table = table.sort_values("task", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
    for col in ("n_val", "n_train", "steps", "trainable"):
        if col in table:
            table[col] = table[col].astype("Int64")
    return table, timings


def table_note(cfg: BaselinesConfig, table: pd.DataFrame, profile: str | None) -> str:
    """The text under the Markdown table: subsets, galleries, weights, what the columns mean."""
    lines = [f"Profile `{profile}`. Scores in percent on the test subset (`n_test` queries), ± one binomial "
             "standard error (`test_se`); `val` is the tuning split. Chance: the train-majority class, or the "
             "exact expected R@K of a random ranking on the same gallery (no error). Text only: logistic regression on "
             "the bag of token 1-2-grams of the question / statement / text, fit on the same train subset, no "
             "image (`vlkit.tasks.text_only`): what the text alone gives away."]
    for task in list(cfg.tasks) + list(cfg.text_tasks):
        s = cfg.settings(task)
        sub = table[(table["task"] == task) & table["n_train"].notna()]
        n_train = int(sub["n_train"].iloc[0]) if len(sub) else None
        what = "image-caption pairs" if task == "shapes_retrieval" else "examples"
        lines.append(f"- `{task}`: train subset {n_train} {what} ({s['train'] or 'all'} "
                     f"{'images' if task == 'shapes_retrieval' else 'rows'}), full FT "
                     f"{str(s['steps']) + ' steps' if s['steps'] else str(s['epochs']) + ' epoch(s)'} at lr {s['lr']} "
                     f"(head x{s['head_lr_mult']}), "
                     f"linear probe {s['probe_epochs']} epochs at lr {s['probe_lr']}; val/test: "
                     f"{'none' if s['val'] == 0 else s['val'] or 'all'}/{s['test'] or 'all'} "
                     f"{'gallery images' if task == 'shapes_retrieval' else 'rows'} (fixed subsets).")
    if "shapes_retrieval" in cfg.tasks:
        spec = task_spec("shapes_retrieval", cfg)
        lines.append(f"- retrieval gallery: two-tower presets rank every caption by the contrastive score and "
                     f"re-rank the top {spec.rerank_k} per query with the ITM head; single-stream presets score "
                     f"every pair with the ITM head on the first {spec.gallery_images_single} images (`gallery`). "
                     "A caption is a hit for every gallery image it is true of (scene metadata).")
    lines.append("- `fingerprint`: a hash of everything that decides a row's numbers (`run_fingerprint`); full "
                 "fine-tuning rows of pre-trained presets are copies of the pre-training-helps stage's identical "
                 "runs (`results/pretrain/helps_runs.csv`, same fingerprint) when they exist.")
    w = {p: cfg.weights.get(p) for p in cfg.backbones}
    lines.append("- `pretrained`: in-repo vision-language pre-training loaded (" +
                 ", ".join(f"{p}: {v or 'none'}" for p, v in w.items()) +
                 "); MiniLM text weights and EfficientNet-Lite0 cells are pre-trained in every row.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from vlkit import config
    from vlkit.results import results_dir, write_json, write_table

    ap = argparse.ArgumentParser(prog="python -m vlkit.tasks.baselines", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=None, help="ci | default | paper (default: params.yaml's)")
    ap.add_argument("--results-dir", default=None, help="default: results/ (runs/results-ci/ under ci)")
    ap.add_argument("--no-weights", action="store_true", help="ignore baselines.weights (un-pretrained VL parts)")
    args = ap.parse_args(argv)
    params = config.load_params()
    profile = config.check_profile(args.profile or params.get("profile", "default"))
    cfg = config.resolve("baselines", profile, params)
    if args.no_weights:
        cfg = dataclasses.replace(cfg, weights={})
    table, timings = run_baselines(cfg, profile, seed=config.seed(params))
    out = Path(args.results_dir) if args.results_dir else results_dir(profile)
    paths = write_table(table, "baselines", out, note=table_note(cfg, table, profile))
    write_json({**timings, "profile": profile}, f"timings/baselines.{profile}", out)
    print(*paths, sep="\n")
    print(json.dumps({"total_seconds": timings["total_seconds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
