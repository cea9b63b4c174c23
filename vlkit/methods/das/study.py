"""The DAS study (DVC stage ``das``, notebook ``notebooks/20_das.py``): Tables A, B, C of
Wu et al. 2023 on the mini backbones, and the policy trajectories.

    python -m vlkit.notebook 20_das --profile default      # what `dvc repro das` runs

What each table holds (``results/das/``; ``runs/results-ci/das/`` under ``ci``)
------------------------------------------------------------------------------
* **Tab. A** (``table_a``): per backbone x task x scope x k -- the skipped units the search
  found (:func:`~vlkit.methods.das.search.search`), the test score of the final run (which
  restarts from the pre-trained backbone, :func:`~vlkit.methods.das.apply.apply_das`), the
  *additional GMACs* of the final model against the un-adapted backbone (negative: cheaper;
  one forward pass of one test example, NLVR counts its two passes, retrieval scores one
  image-caption pair, :func:`cell_gmacs`), and the trainable
  parameters (adapters, poolers, token-type embeddings, head). ``k = 0`` is the adapters-only
  model (DAS's "Adapter" row; method ``das``, k 0), and ``full`` is full fine-tuning with the
  same budget (``full: true``).
* **Tab. B** (``table_b``): for the ``headline`` cells, DAS over ``seeds`` (search + final run
  per seed) against ``random_sets`` random skip sets of the same k (each final-trained once);
  mean and standard deviation, and a verdict: a difference smaller than the two spreads
  combined (``sqrt(sd_a^2 + sd_b^2)``, at least one test SE) is a **tie**.
* **Tab. C** (``table_c``): a text backbone (MiniLM) on a text task (movie reviews): DAS
  k = 1..3 against full fine-tuning, BitFit, LoRA and Adapter, with updated parameters and
  GMACs per example.
* ``policy.csv``: the skip probability of every candidate after every policy round of every
  search (the trajectory plot); ``paper_gmacs``: the additional GMACs of skipping k units of
  the paper-size ``vilt-b32`` / ``meter-clip16-roberta`` (the last k candidates; ViLT's
  units all cost the same, METER's text-side ``FL*`` and image-side ``FV*`` do not).

Budgets. Train/val/test subsets, steps and learning rates are the ``das`` section of
params.yaml (its keys are the ``baselines`` section's, :class:`DASConfig`); the search runs
``warmup_epochs`` over the training subset then ``rounds`` policy rounds of ``every`` steps,
scoring ``S`` sets on one fresh validation batch per round. Everything is seeded.

Tasks. The search scores a task by its training loss (:meth:`TaskSpec.loss`) on validation
examples in the training format, reward ``exp(-loss)``: classification (easy-VQA, NLVR) and
retrieval (``shapes_retrieval``). DAS (Sec. 3.1, Alg. 1) rewards a skip set by the task's
validation loss, whatever the task. For retrieval our validation examples are **pairs**, not
the R@K gallery: :func:`task_data` adds ``data["val_pairs"]``, the val split loaded with
``as_pairs=True`` (:meth:`RetrievalTask.load`: ``val`` images drawn as the train split draws
its own, every (image, caption, hard-negative caption) of them), and the reward is
``exp(-(ITM + ITC))`` -- ITM over positives, hard-negative captions and in-batch negative
images, plus ITC for two-tower backbones -- on one batch of those pairs: the training loss on
held-out images. The val gallery and the test gallery keep their R@K protocol for the final
run (Tab. A / B report mean R@1 of the two directions, :func:`table_row`); the test split is
never read by the search.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable

import numpy as np
import pandas as pd
import torch

from vlkit.models.protocol import UnknownNameError
from vlkit.seeding import seeded
from vlkit.tasks.baselines import (BaselinesConfig, cached_backbone, cached_task_data, gallery_options, table_row,
                                   task_spec, train_config_for)
from vlkit.tasks.data import TaskData
from vlkit.tasks.metrics import seed_sd
from vlkit.tasks.runner import TASKS, ClassifyTask, RetrievalTask, TaskModel, finetune, get_task, training_collate

from .apply import SCOPES, apply_das, candidates
from .search import search

__all__ = ["DASConfig", "SEARCH_KEYS", "SEARCHABLE", "searchable_tasks", "task_data", "run_search", "final_run",
           "cell_gmacs", "verdict", "study_table_a", "study_table_b", "study_table_c", "paper_gmacs", "policy_frame"]

SEARCH_KEYS = ("rounds", "S", "every", "policy_lr", "warmup_epochs", "val_batch_size")
TEXT_METHODS = ("full", "bitfit", "lora", "adapter")
SEARCHABLE = (ClassifyTask, RetrievalTask)  # task kinds whose loss the search can score (module docstring)


def searchable_tasks() -> list[str]:
    """The vision-language tasks ``das.tasks`` may hold."""
    return [t for t in TASKS if get_task(t).modality == "vl" and isinstance(get_task(t), SEARCHABLE)]


@dataclasses.dataclass(frozen=True)
class DASConfig(BaselinesConfig):
    """The ``das`` section of params.yaml: the ``baselines`` keys (backbones, tasks, subsets
    and training settings in ``train`` / ``task_settings``, ``weights``, ``overrides``,
    ``features``, ``threads``) plus

    ``scopes``: ``{backbone: [fusion | global]}`` (single-stream backbones: one scope, every
    unit a candidate); ``ks``: skipped units per set; ``search``: :data:`SEARCH_KEYS`;
    ``headline``: ``[[backbone, task, scope, k], ...]`` the Tab. B cells; ``seeds``: DAS
    seeds of a headline cell; ``random_sets``: random skip sets per headline cell;
    ``text_ks`` / ``text_methods``: Tab. C on ``text_backbones[0]`` x ``text_tasks[0]``;
    ``paper_presets`` / ``paper_ks``: the paper-size GMACs columns; ``full``: also run full
    fine-tuning per Tab. A cell (same steps, at ``full_lr``; every PETL method and DAS train
    at the settings' ``lr``)."""

    backbones: list[str] = dataclasses.field(default_factory=lambda: ["vilt-mini", "meter-mini"])
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["shapes_nlvr", "easyvqa"])
    text_tasks: list[str] = dataclasses.field(default_factory=lambda: ["movie_reviews"])
    scopes: dict = dataclasses.field(default_factory=lambda: {"meter-mini": ["fusion", "global"]})
    ks: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    search: dict = dataclasses.field(default_factory=dict)
    headline: list = dataclasses.field(default_factory=list)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    random_sets: int = 3
    text_ks: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])
    text_methods: list[str] = dataclasses.field(default_factory=lambda: list(TEXT_METHODS))
    paper_presets: list[str] = dataclasses.field(default_factory=lambda: ["vilt-b32", "meter-clip16-roberta"])
    paper_ks: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])
    full: bool = True
    full_lr: float = 2e-4

    def __post_init__(self):
        super().__post_init__()
        from vlkit.methods.petl import METHODS as PETL

        from vlkit.models import PRESETS

        for b, scopes in self.scopes.items():
            if b not in PRESETS:
                raise UnknownNameError("preset in params.yaml das.scopes", b, sorted(PRESETS))
            for s in scopes:
                if s not in SCOPES:
                    raise UnknownNameError(f"DAS scope of das.scopes.{b}", s, SCOPES)
        for k in self.search:
            if k not in SEARCH_KEYS:
                raise UnknownNameError("key in params.yaml das.search", k, SEARCH_KEYS)
        for k in list(self.ks) + list(self.text_ks) + list(self.paper_ks):
            if not isinstance(k, int) or k < 1:
                raise ValueError(f"das: every k must be an int >= 1, got {k!r}")
        for m in self.text_methods:
            if m not in PETL or m == "das":
                raise UnknownNameError("das.text_methods method", m, [x for x in PETL if x != "das"])
        for t in self.tasks:
            if not isinstance(task_spec(t, self), SEARCHABLE):
                raise UnknownNameError("das task (the search scores classification and retrieval losses)", t,
                                       searchable_tasks())
        for cell in self.headline:
            if not (isinstance(cell, (list, tuple)) and len(cell) == 4):
                raise ValueError(f"das.headline entries are [backbone, task, scope, k]; got {cell!r}")
            b, t, s, k = cell
            if b not in self.backbones or t not in self.tasks or s not in self.scopes_of(b) or k not in self.ks:
                raise ValueError(f"das.headline cell {cell!r} is not in the Tab. A grid (backbones {self.backbones}, "
                                 f"tasks {self.tasks}, scopes of {b}: {self.scopes_of(b)}, ks {self.ks})")
        if self.random_sets < 1 or not self.seeds:
            raise ValueError(f"das: random_sets must be >= 1 and seeds non-empty; got {self.random_sets}, {self.seeds}")

    def scopes_of(self, backbone: str) -> list[str]:
        """Scopes searched for ``backbone`` (default ``["global"]``: every non-vision unit)."""
        return list(self.scopes.get(backbone) or ["global"])

    def search_options(self) -> dict:
        """:func:`search` options (defaults: 8 rounds of 4 steps, S = 3, policy lr 1, one warm-up epoch)."""
        return {"rounds": 8, "S": 3, "every": 4, "policy_lr": 1.0, "warmup_epochs": 1, "val_batch_size": None,
                **self.search}


# ---------------------------------------------------------------------------- one cell
def _task_loss(spec):
    """``loss_fn(model, batch)`` for :func:`search`: the task's loss on a :class:`TaskModel`
    view of the search's backbone and head."""
    return lambda m, batch: spec.loss(TaskModel(m.backbone, m.head, "das"), batch)


def _head(spec, backbone, data, seed: int):
    with seeded(seed):
        return spec.make_head(spec.dims(backbone, data["train"]))


def task_data(task: str, cfg: DASConfig, profile: str | None, cache: dict) -> dict:
    """The splits of ``task`` (:func:`cached_task_data`) and, for retrieval with a val split,
    ``"val_pairs"``: the val split in the training format (``as_pairs=True``; ``val`` images,
    the gallery's count), which the search's policy rounds read (module docstring)."""
    data = cached_task_data(task, cfg, profile, cache)
    spec = task_spec(task, cfg)
    if isinstance(spec, RetrievalTask) and "val" in data and "val_pairs" not in data:
        s = cfg.settings(task)
        data["val_pairs"] = spec.load("val", limit=s["val"], profile=profile, features=cfg.features,
                                      text_len=s["text_len"], as_pairs=True, **gallery_options(cfg))
    return data


def _search_val(spec, data: dict) -> TaskData:
    """The validation examples the policy rounds score: ``val`` (classification) or
    ``val_pairs`` (retrieval: its ``val`` is a gallery, not training-format pairs)."""
    if "val" not in data:
        raise ValueError(f"{spec.name}: the DAS search needs a validation split (das.task_settings.{spec.name}.val "
                         "must not be 0)")
    if not isinstance(spec, RetrievalTask):
        return data["val"]
    if "val_pairs" not in data:
        raise ValueError(f"{spec.name}: the DAS search scores retrieval on val pairs in the training format; load "
                         "the splits with vlkit.methods.das.study.task_data (data['val_pairs'], "
                         "RetrievalTask.load('val', as_pairs=True))")
    return data["val_pairs"]


def run_search(spec, backbone, data: dict, *, k: int, scope: str, settings: dict, options: dict, seed: int):
    """DAS's search for ``k`` units of ``backbone`` on ``spec``'s training subset, policy
    rounds on its validation examples (both from ``data``; retrieval: ``data["val_pairs"]``,
    :func:`task_data`), each split collated with its own image store. Returns the
    :class:`SearchResult`."""
    val = _search_val(spec, data)
    tc = train_config_for(settings, len(data["train"]), False, seed)
    o = dict(options)
    return search(backbone, _task_loss(spec), data["train"].examples, val.examples, k=k, scope=scope,
                  rounds=int(o["rounds"]), S=min(int(o["S"]), math.comb(len(candidates(backbone, scope)), k)),
                  every=int(o["every"]), policy_lr=float(o["policy_lr"]), warmup_epochs=int(o["warmup_epochs"]),
                  val_batch_size=o["val_batch_size"], seed=seed, head=_head(spec, backbone, data, seed),
                  collate_fn=training_collate(spec, data["train"]), val_collate_fn=training_collate(spec, val),
                  train_config=tc)


def final_run(spec, backbone, data: dict, *, skip, scope: str, settings: dict, seed: int,
              method: str = "das", lr: float | None = None) -> dict:
    """Fine-tune a copy of the pre-trained ``backbone`` with ``skip`` replaced (``method="das"``)
    or with another method (at ``lr`` when given), and evaluate on val / test. Returns
    :func:`finetune`'s dict."""
    tc = train_config_for(settings if lr is None else {**settings, "lr": lr}, len(data["train"]), False, seed)
    opts = {"skip": list(skip), "scope": scope, "seed": seed} if method == "das" else {}
    splits = tuple(s for s in ("val", "test") if s in data)
    mult = float(settings["head_lr_mult"]) if method == "full" else 1.0
    return finetune(spec, copy.deepcopy(backbone), method, data=data, train_config=tc, seed=seed,
                    eval_splits=splits, head_lr_mult=mult, method_options=opts)


def cell_gmacs(spec, model: torch.nn.Module, data: dict) -> float:
    """GMACs of ``model`` for one test example of ``spec`` (NLVR: both passes; retrieval:
    scoring one image-caption pair -- the first test caption with its image -- i.e. one
    forward of the pair through the backbone, what every ITM score of the gallery costs), by
    the :func:`vlkit.efficiency.macs` counter. Heads are not counted."""
    from vlkit.efficiency import macs

    batch = data["test"].collate(data["test"].examples[:1])
    tm = TaskModel(model, torch.nn.Identity(), "das")
    if isinstance(spec, RetrievalTask):
        return macs(lambda: tm(**spec.inputs(batch))) / 1e9
    return macs(lambda: spec.encode(tm, batch)) / 1e9


def verdict(a_mean: float, a_sd: float, b_mean: float, b_sd: float, se: float = 0.0) -> str:
    """``"DAS"`` / ``"random"`` when one mean beats the other by more than the noise -- the two
    spreads combined, ``sqrt(a_sd^2 + b_sd^2)``, and at least one test SE -- else ``"tie"``."""
    noise = max(math.hypot(a_sd, b_sd), se)
    d = a_mean - b_mean
    return "tie" if abs(d) <= noise else ("DAS" if d > 0 else "random")


# ---------------------------------------------------------------------------- tables
def _rows_for_cell(spec, backbone_name, base, data, pretrained, *, scope, k, settings, options, seed, log):
    t0 = time.perf_counter()
    found = run_search(spec, base, data, k=k, scope=scope, settings=settings, options=options, seed=seed)
    t1 = time.perf_counter()
    res = final_run(spec, base, data, skip=found.best, scope=scope, settings=settings, seed=seed)
    row = table_row(spec.name, backbone_name, "das", pretrained, spec, res, data)
    row.update(scope=scope, k=k, seed=seed, skipped=" ".join(found.best),
               search_s=round(t1 - t0, 1), final_s=round(time.perf_counter() - t1, 1))
    gm = cell_gmacs(spec, res["model"].backbone, data)
    log(f"DAS {spec.name:12s} {backbone_name:10s} {scope:6s} k={k} seed {seed}: skip {row['skipped']:12s} "
        f"test {row['test']:6.2f} ({row['search_s'] + row['final_s']:.0f} s)")
    return row, found, gm


def study_table_a(cfg: DASConfig, profile: str | None, *, seed: int = 0, log: Callable[[str], None] = print,
                  cache: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Tab. A, the policy trajectories and the searches: ``(table, policy, searches)``.

    ``searches``: ``{(backbone, task, scope, k, seed): (row, SearchResult)}`` -- Tab. B reuses
    the seed-``seed`` searches. ``cache``: shared data / backbones between the tables."""
    cache = cache if cache is not None else {}
    rows, policy, searches = [], [], {}
    for b in cfg.backbones:
        base, pretrained = cached_backbone(b, cfg, cache)
        for t in cfg.tasks:
            spec, s, data = task_spec(t, cfg), cfg.settings(t), task_data(t, cfg, profile, cache)
            plain = cell_gmacs(spec, base, data)
            for method in ["das"] + (["full"] if cfg.full else []):  # k = 0 (adapters only), full fine-tuning
                scope = cfg.scopes_of(b)[0]
                res = final_run(spec, base, data, skip=(), scope=scope, settings=s, seed=seed, method=method,
                                lr=cfg.full_lr if method == "full" else None)
                row = table_row(t, b, "das" if method == "das" else "full", pretrained, spec, res, data)
                row.update(scope=scope if method == "das" else "–", k=0, seed=seed, skipped="",
                           add_gmacs=round(cell_gmacs(spec, res["model"].backbone, data) - plain, 4),
                           gmacs=round(plain, 4))
                rows.append(row)
                log(f"{method:4s} k=0 {t:12s} {b:10s}: test {row['test']:6.2f}")
            for scope in cfg.scopes_of(b):
                for k in cfg.ks:
                    row, found, gm = _rows_for_cell(spec, b, base, data, pretrained, scope=scope, k=k, settings=s,
                                                    options=cfg.search_options(), seed=seed, log=log)
                    row.update(add_gmacs=round(gm - plain, 4), gmacs=round(plain, 4))
                    rows.append(row)
                    searches[(b, t, scope, k, seed)] = (row, found)
                    policy += _policy_rows(found, b, t, scope, k, seed)
    return _order(pd.DataFrame(rows)), pd.DataFrame(policy), searches


def _policy_rows(found, b, t, scope, k, seed) -> list[dict]:
    return [{"backbone": b, "task": t, "scope": scope, "k": k, "seed": seed, "round": r, "unit": u, "p": round(p, 5)}
            for r, probs in enumerate(found.policy_history) for u, p in zip(found.candidates, probs)]


def policy_frame(searches: dict) -> pd.DataFrame:
    """Policy trajectories of ``searches`` (``{key: (row, SearchResult)}``) as one long frame."""
    return pd.DataFrame([r for (b, t, scope, k, seed), (_, f) in searches.items()
                         for r in _policy_rows(f, b, t, scope, k, seed)])


def study_table_b(cfg: DASConfig, profile: str | None, searches: dict, *, seed: int = 0,
                  log: Callable[[str], None] = print, cache: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tab. B: ``(summary, runs)`` for each headline cell -- DAS over ``cfg.seeds`` (search and
    final run under each seed) against ``cfg.random_sets`` random k-sets (uniform, seeded,
    distinct when enough exist), each final-trained under ``seed``. ``searches`` (from
    :func:`study_table_a`) supplies the seeds already searched there."""
    cache = cache if cache is not None else {}
    runs, summary = [], []
    for b, t, scope, k in cfg.headline:
        base, pretrained = cached_backbone(b, cfg, cache)
        spec, s, data = task_spec(t, cfg), cfg.settings(t), task_data(t, cfg, profile, cache)
        for sd in cfg.seeds:
            key = (b, t, scope, k, sd)
            if key not in searches:
                row, found, _ = _rows_for_cell(spec, b, base, data, pretrained, scope=scope, k=k, settings=s,
                                               options=cfg.search_options(), seed=sd, log=log)
                searches[key] = (row, found)
            row = searches[key][0]
            runs.append({"backbone": b, "task": t, "scope": scope, "k": k, "kind": "DAS", "seed": sd,
                         "skipped": row["skipped"], "test": row["test"], "test_se": row["test_se"], "val": row["val"],
                         "n_test": row["n_test"]})
        cands = candidates(base, scope)
        g = np.random.default_rng(seed + 7919)
        sets: list[tuple[str, ...]] = []
        for _ in range(cfg.random_sets):
            for _try in range(100):
                pick = tuple(sorted(g.choice(len(cands), size=k, replace=False).tolist()))
                if pick not in sets or len(sets) >= math.comb(len(cands), k):
                    break
            sets.append(pick)
        for j, pick in enumerate(sets):
            names = [cands[i] for i in pick]
            res = final_run(spec, base, data, skip=names, scope=scope, settings=s, seed=seed)
            row = table_row(t, b, "das", pretrained, spec, res, data)
            runs.append({"backbone": b, "task": t, "scope": scope, "k": k, "kind": "random", "seed": j,
                         "skipped": " ".join(names), "test": row["test"], "test_se": row["test_se"],
                         "val": row["val"], "n_test": row["n_test"]})
            log(f"random {t:12s} {b:10s} {scope:6s} k={k} #{j}: skip {' '.join(names):12s} test {row['test']:6.2f}")
        cell = pd.DataFrame([r for r in runs if (r["backbone"], r["task"], r["scope"], r["k"]) == (b, t, scope, k)])
        das, rnd = cell[cell.kind == "DAS"], cell[cell.kind == "random"]
        sd_d, sd_r = seed_sd(das.test), seed_sd(rnd.test)
        summary.append({"backbone": b, "task": t, "scope": scope, "k": k,
                        "DAS mean": round(das.test.mean(), 2), "DAS sd": round(sd_d, 2), "DAS runs": len(das),
                        "DAS sets": "; ".join(sorted(set(das.skipped))),
                        "random mean": round(rnd.test.mean(), 2), "random sd": round(sd_r, 2), "random runs": len(rnd),
                        "random sets": "; ".join(rnd.skipped), "test SE": round(float(cell.test_se.mean()), 2),
                        "n_test": int(cell.n_test.iloc[0]),  # the rows' queries (retrieval: gallery images)
                        "verdict": verdict(das.test.mean(), sd_d, rnd.test.mean(), sd_r, float(cell.test_se.mean()))})
    return pd.DataFrame(summary), pd.DataFrame(runs)


def study_table_c(cfg: DASConfig, profile: str | None, *, seed: int = 0, log: Callable[[str], None] = print,
                  cache: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tab. C: ``text_backbones[0]`` on ``text_tasks[0]`` -- DAS k in ``text_ks`` against
    ``text_methods``; updated parameters and GMACs per example. Returns ``(table, policy)``."""
    cache = cache if cache is not None else {}
    b, t = cfg.text_backbones[0], cfg.text_tasks[0]
    base, pretrained = cached_backbone(b, cfg, cache)
    spec, s, data = task_spec(t, cfg), cfg.settings(t), task_data(t, cfg, profile, cache)
    plain = cell_gmacs(spec, base, data)
    rows, policy = [], []
    for m in cfg.text_methods:
        res = final_run(spec, base, data, skip=(), scope="global", settings=s, seed=seed, method=m,
                        lr=cfg.full_lr if m == "full" else None)
        row = table_row(t, b, m, pretrained, spec, res, data)
        row.update(k=0, skipped="", gmacs=round(cell_gmacs(spec, res["model"].backbone, data), 4))
        rows.append(row)
        log(f"{m:8s} {t:12s} {b}: test {row['test']:6.2f}")
    for k in cfg.text_ks:
        row, found, gm = _rows_for_cell(spec, b, base, data, pretrained, scope="global", k=k, settings=s,
                                        options=cfg.search_options(), seed=seed, log=log)
        row.update(gmacs=round(gm, 4))
        rows.append(row)
        policy += _policy_rows(found, b, t, "global", k, seed)
    table = pd.DataFrame(rows)
    table["add_gmacs"] = (table["gmacs"] - plain).round(4)
    return table, pd.DataFrame(policy)


def paper_gmacs(cfg: DASConfig) -> pd.DataFrame:
    """Additional GMACs (vs the un-adapted model) of skipping the last k candidates of each
    paper-size preset (random weights; MACs do not depend on them), and of k = 0 (adapters
    only), at the presets' own input sizes (:meth:`dummy_inputs`, batch 1)."""
    from vlkit.efficiency import macs, params
    from vlkit.models import build

    rows = []
    for p in cfg.paper_presets:
        base = build(p, **(cfg.overrides.get(p) or {})).eval()
        x = base.dummy_inputs(1)
        plain = macs(base, x)
        scopes = ["global"] if not base.units_of("vision", "fusion") else ["fusion", "global"]
        for scope in scopes:
            cands = candidates(base, scope)
            for k in [0] + [k for k in cfg.paper_ks if k < len(cands)]:
                names = cands[len(cands) - k:] if k else []
                m = apply_das(copy.deepcopy(base), skip=names, scope=scope)
                rows.append({"preset": p, "scope": scope, "k": k, "skipped": " ".join(names),
                             "gmacs": round(plain / 1e9, 3), "add_gmacs": round((macs(m, x) - plain) / 1e9, 3),
                             "trainable (M)": round(params(m, trainable_only=True) / 1e6, 3)})
                del m
        del base
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- helpers


def _order(table: pd.DataFrame) -> pd.DataFrame:
    first = ["task", "backbone", "method", "scope", "k", "skipped", "test", "test_se", "n_test", "val", "val_se",
             "add_gmacs", "gmacs", "trainable", "seed"]
    return table[[c for c in first if c in table] + [c for c in table if c not in first]]
