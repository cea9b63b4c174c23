"""The SHERL study (DVC stage ``sherl``, notebook ``notebooks/30_sherl.py``): Tab. 1, Fig. 4,
Fig. 7 and the late-regulation ablation of Diao et al., "SHERL: Synthesizing High Accuracy
and Efficient Memory for Resource-Limited Transfer Learning" (ECCV 2024), on the mini
backbones.

    python -m vlkit.notebook 30_sherl --profile default      # what `dvc repro sherl` runs

What each table holds (``results/sherl/``; ``runs/results-ci/sherl/`` under ``ci``)
--------------------------------------------------------------------------------
* **Tab. 1** (:func:`study_tab1`), per ``(backbone, task)`` cell -- MiniLM on movie reviews
  (``text_methods``), ``vilt-mini`` on ``shapes_nlvr`` and easy-VQA (``vl_methods``): every
  method's test score ± one binomial SE, its trainable parameters (``params_pct``: the
  method's own parameters over the pre-trained backbone's, head excluded, as in the papers;
  ``trainable``: with the head) and two training-memory figures:

  - the **accounted** memory (deterministic; :func:`memory_accounting`) of one training step
    on the memory batch: weights (every parameter, fp32) + gradients and AdamW's two moments
    (3 x the trainable parameters) + the bytes autograd saves for backward in one training
    forward (:func:`vlkit.efficiency.autograd_saved_bytes`, weights excluded) -- ``est_mib`` and
    ``saved_mib``;
  - the **measured** peak (:func:`measure_peak`): a fresh subprocess per configuration
    (:func:`vlkit.efficiency.peak_memory`, the way ``bench/bench_memory.py`` measures) runs two
    training steps of the same model, head and batch; peak RSS minus RSS after the imports,
    with the peak counter reset after the model is built (building copies library weights
    once). Measured numbers vary from run to run (about +-0.04 GiB on this machine), so they
    live in their own file (``memory.csv``), apart from the score tables that are identical
    across runs of one profile and seed.

  The memory batch is the task's first ``memory_batch`` (default: the training batch size)
  training examples, text padded to the task's full length (+ the 16 image cells; NLVR runs
  its two passes); fp32, ``threads`` CPU threads.
* **Headline** (:func:`study_headline`): ``headline_methods`` (full fine-tuning and SHERL) on
  the ``headline`` cells over ``seeds``: mean, sample standard deviation, and a verdict
  (``tie`` when the difference is within the two spreads combined or one test SE;
  :func:`vlkit.methods.das.study.verdict`'s rule).
* **Fig. 4** (:func:`study_aggregators`): SHERL's aggregator swapped for each of
  ``aggregators`` (:data:`vlkit.nn.mtsa.AGGREGATORS`: MTSA = redundancy-normalised linear
  attention, LinearA without the redundancy term, LinearA(r) with a learnable one, MaxPool,
  AvePool, 4-head MHSA) on the ``ablation`` cell.
* **Fig. 7** (:func:`study_reduction`): SHERL over the reduction factors ``reductions``
  (MTSA width D / r) on the ``ablation`` cell: score against training memory.
* **Late regulation** (:func:`study_late`): SHERL with ``late_units`` late pre-trained units
  on the ``ablation`` cell -- 0: the merged features go straight to the pooler and head
  (``apply_sherl(late_unit=False)``), 1: the paper's design, k >= 2: multi-layer insertion.

* **CNN** (:func:`study_cnn`; Sec. 3.3 "beyond Transformers", Fig. 3b): full fine-tuning, a
  linear probe and SHERL on the ImageNet EfficientNet-Lite0 (``effnet-lite0``; SHERL's spatial
  mode, :mod:`vlkit.methods.sherl`: the MBConv stages pooled to the last stage's input
  resolution and merged by an MTSA with per-stage input widths, then the frozen last stage,
  head conv and pool) on the generated image task ``shapes_count`` (how many objects, 1-4;
  :mod:`vlkit.data.counting`). Same columns as Tab. 1: test accuracy ± SE, ``params_pct``,
  accounted memory and, where measured, the peak (:func:`cnn_train_step_memory` in a fresh
  subprocess). Its settings are the ``cnn`` mapping (:data:`CNN_DEFAULTS`).

Budgets: train/val/test subsets, epochs and learning rates are this section's keys (the
``baselines`` section's, :class:`SHERLConfig`). Every method trains at the task's ``lr``
unless ``method_lr`` names it (full fine-tuning: lower, with the head at ``head_lr_mult`` x).
Runs are seeded (head, data order, the method's initialisation) and shared between the tables
(``cache``): the default SHERL run of Tab. 1 is the MTSA bar of Fig. 4, the r = 8 point of
Fig. 7 and the 1-unit row of the late-regulation table.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from vlkit.efficiency import autograd_saved_bytes, params
from vlkit.models.protocol import UnknownNameError
from vlkit.nn.mtsa import AGGREGATORS
from vlkit.tasks.baselines import (BaselinesConfig, cached_backbone, cached_task_data, table_row, task_spec,
                                   train_config_for)
from vlkit.tasks.data import TaskData
from vlkit.tasks.metrics import seed_sd
from vlkit.tasks.runner import ClassifyTask, TaskModel, finetune, get_task

__all__ = ["SHERLConfig", "TABLE_METHODS", "MEASURED", "canonical_options", "late_options", "memory_batch",
           "memory_accounting", "measure_peak", "train_step_memory", "run_cell",
           "study_tab1", "study_headline", "seed_summary", "study_aggregators", "study_reduction", "study_late",
           "split_measured", "with_measured", "CNN_METHODS", "CNN_DEFAULTS", "cnn_settings", "ImageClassifyTask",
           "PixelCollate", "image_task_data", "cnn_train_step_memory", "run_cnn", "study_cnn"]

TABLE_METHODS = ("full", "adapter", "lora", "bitfit", "prompt", "lst", "unipt", "sherl")
MEMORY_MODES = ("subprocess", "off")
MEASURED = ("peak_mib", "step_s", "load_avg")  # run-to-run varying columns: memory.csv, not the score tables
MIB = 2**20
WARMUP_ENV = "VLKIT_SHERL_MEMORY_WARMUP"

# ---- the CNN table (Sec. 3.3, Fig. 3b): params.yaml sherl.cnn
CNN_METHODS = ("full", "linear_probe", "sherl")
CNN_BACKBONES = ("effnet-lite0",)
CNN_DATASETS = ("shapes_count",)
CNN_DEFAULTS: dict = {
    "backbone": "effnet-lite0",  # a protocol CNN whose units are its stages
    "dataset": "shapes_count",  # a generated image classification set (vlkit.data)
    "data": {},  # the set's knobs (sizes: n_train / n_val / n_test); every train and test row is used
    "methods": list(CNN_METHODS),
    "epochs": 3,  # passes over the training rows (or `steps`)
    "steps": None,
    "batch_size": 32,
    "lr": 1.0e-3,  # SHERL's MTSA and the heads
    "full_lr": 2.0e-4,  # full fine-tuning's backbone (its head at head_lr_mult x)
    "head_lr_mult": 10.0,
    "warmup": 0.1,
    "probe_lr": 1.0e-3,
    "probe_epochs": 20,
    "sherl_options": {},  # apply_sherl options for the CNN run (reduction, aggregator, features, ...)
    "memory_methods": None,  # which methods get a measured peak (None: all; needs memory: subprocess)
    "memory_batch": None,  # examples in the memory batch (None: batch_size)
}


def _positive(where: str, v, kind=(int, float), allow_none: bool = False):
    if v is None and allow_none:
        return v
    if isinstance(v, bool) or not isinstance(v, kind) or not v > 0:
        what = "a positive int" if kind is int else "a positive number"
        raise ValueError(f"params.yaml {where} must be {what}{' or null' if allow_none else ''}, got {v!r}")
    return v


def cnn_settings(cnn: Mapping | None) -> dict:
    """``sherl.cnn`` of params.yaml merged over :data:`CNN_DEFAULTS` and checked: an unknown key,
    method, backbone, dataset, data knob or SHERL option is an error naming the valid ones."""
    from vlkit.data.registry import spec as data_spec
    from vlkit.methods.petl import options

    cnn = dict(cnn or {})
    for k in cnn:
        if k not in CNN_DEFAULTS:
            raise UnknownNameError("key in params.yaml sherl.cnn", k, list(CNN_DEFAULTS))
    s = {**copy.deepcopy(CNN_DEFAULTS), **cnn}
    if s["backbone"] not in CNN_BACKBONES:
        raise UnknownNameError("sherl.cnn backbone", s["backbone"], CNN_BACKBONES)
    if s["dataset"] not in CNN_DATASETS:
        raise UnknownNameError("sherl.cnn dataset", s["dataset"], CNN_DATASETS)
    if not isinstance(s["data"], dict):
        raise ValueError(f"params.yaml sherl.cnn.data must be a mapping of {s['dataset']} knobs, got {s['data']!r}")
    data_spec(s["dataset"], **s["data"])  # every knob name and value
    for where in ("methods", "memory_methods"):
        ms = s[where]
        if ms is None and where == "memory_methods":
            continue
        if not isinstance(ms, (list, tuple)) or (where == "methods" and not ms):
            raise ValueError(f"params.yaml sherl.cnn.{where} must be a list of methods, got {ms!r}")
        for m in ms:
            if m not in CNN_METHODS:
                raise UnknownNameError(f"sherl.cnn.{where} method", m, CNN_METHODS)
    if not isinstance(s["sherl_options"], dict):
        raise ValueError(f"params.yaml sherl.cnn.sherl_options must be a mapping, got {s['sherl_options']!r}")
    for k in s["sherl_options"]:
        if k not in options("sherl") or k == "seed":
            raise UnknownNameError("option of sherl in sherl.cnn.sherl_options", k,
                                   [o for o in options("sherl") if o != "seed"])
    if (s["epochs"] is None) == (s["steps"] is None):
        raise ValueError(f"params.yaml sherl.cnn: give exactly one of epochs and steps, got epochs={s['epochs']!r}, "
                         f"steps={s['steps']!r}")
    for k in ("epochs", "steps", "batch_size", "probe_epochs", "memory_batch"):
        _positive(f"sherl.cnn.{k}", s[k], int, allow_none=k in ("epochs", "steps", "memory_batch"))
    for k in ("lr", "full_lr", "head_lr_mult", "probe_lr"):
        _positive(f"sherl.cnn.{k}", s[k])
    if isinstance(s["warmup"], bool) or not isinstance(s["warmup"], (int, float)) or not 0 <= s["warmup"] < 1:
        raise ValueError(f"params.yaml sherl.cnn.warmup must be a fraction in [0, 1), got {s['warmup']!r}")
    return s


@dataclasses.dataclass(frozen=True)
class SHERLConfig(BaselinesConfig):
    """The ``sherl`` section of params.yaml: the ``baselines`` keys (backbones, tasks, subsets
    and training settings in ``train`` / ``task_settings``, ``weights``, ``overrides``,
    ``features``, ``threads``) plus

    ``text_methods`` / ``vl_methods``: the Tab. 1 methods of the text cells
    (``text_backbones`` x ``text_tasks``) and of the VL cells (``backbones`` x ``tasks``);
    ``method_options``: ``{method: {option: value}}`` for every run of that method;
    ``method_lr``: ``{method: lr}`` (default: the task's ``lr``); ``headline`` /
    ``headline_methods`` / ``seeds``: the multi-seed cells; ``ablation``: ``[backbone, task]``
    of Fig. 4, Fig. 7 and the late-regulation table (default: the first text cell);
    ``aggregators``, ``reductions``, ``late_units``: their grids; ``memory``: ``subprocess``
    (measure peaks) or ``off``; ``memory_methods`` / ``memory_backbones``: restrict the
    measured peaks (``None``: all); ``memory_batch``: examples in the memory batch (``None``:
    the task's batch size); ``cnn``: the CNN table's settings (:data:`CNN_DEFAULTS`,
    :func:`cnn_settings`)."""

    backbones: list[str] = dataclasses.field(default_factory=lambda: ["vilt-mini"])
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["shapes_nlvr", "easyvqa"])
    text_tasks: list[str] = dataclasses.field(default_factory=lambda: ["movie_reviews"])
    text_methods: list[str] = dataclasses.field(default_factory=lambda: list(TABLE_METHODS))
    vl_methods: list[str] = dataclasses.field(default_factory=lambda: ["full", "adapter", "lora", "lst", "unipt",
                                                                       "sherl"])
    method_options: dict = dataclasses.field(default_factory=dict)
    method_lr: dict = dataclasses.field(default_factory=dict)
    headline: list = dataclasses.field(default_factory=lambda: [["minilm", "movie_reviews"]])
    headline_methods: list[str] = dataclasses.field(default_factory=lambda: ["full", "sherl"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    ablation: list[str] | None = None
    aggregators: list[str] = dataclasses.field(default_factory=lambda: list(AGGREGATORS))
    reductions: list[int] = dataclasses.field(default_factory=lambda: [16, 8, 4, 2])
    late_units: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    memory: str = "subprocess"
    memory_methods: list[str] | None = None
    memory_backbones: list[str] | None = None
    memory_batch: int | None = None
    cnn: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        cnn_settings(self.cnn)
        from vlkit.methods.petl import METHODS as PETL
        from vlkit.methods.petl import options

        valid = [m for m in PETL if m != "das"]
        for where, methods in (("text_methods", self.text_methods), ("vl_methods", self.vl_methods),
                               ("headline_methods", self.headline_methods), ("memory_methods",
                                                                             self.memory_methods or [])):
            for m in methods:
                if m not in valid:
                    raise UnknownNameError(f"sherl.{where} method", m, valid)
        for where, d in (("method_options", self.method_options), ("method_lr", self.method_lr)):
            for m in d:
                if m not in valid:
                    raise UnknownNameError(f"method in sherl.{where}", m, valid)
        for m, opts in self.method_options.items():
            if not isinstance(opts, dict):
                raise ValueError(f"sherl.method_options.{m} must be a mapping of options, got {opts!r}")
            for k in opts:
                if k not in options(m):
                    raise UnknownNameError(f"option of {m} in sherl.method_options", k, list(options(m)))
        for m, lr in self.method_lr.items():
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"sherl.method_lr.{m} must be a positive number, got {lr!r}")
        cells = self.cells()
        for cell in list(self.headline) + ([self.ablation] if self.ablation is not None else []):
            if not (isinstance(cell, (list, tuple)) and len(cell) == 2) or tuple(cell) not in cells:
                raise ValueError(f"sherl: headline / ablation cell {cell!r} is not a [backbone, task] of the Tab. 1 "
                                 f"grid {[list(c) for c in cells]}")
        for a in self.aggregators:
            if a not in AGGREGATORS:
                raise UnknownNameError("sherl.aggregators aggregator", a, AGGREGATORS)
        for r in self.reductions:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"sherl.reductions: every reduction factor must be an int >= 1, got {r!r}")
        for k in self.late_units:
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"sherl.late_units: every entry must be an int >= 0 (0: no late unit), got {k!r}")
        if self.memory not in MEMORY_MODES:
            raise UnknownNameError("sherl.memory mode", self.memory, MEMORY_MODES)
        if self.memory_batch is not None and (isinstance(self.memory_batch, bool) or self.memory_batch < 1):
            raise ValueError(f"sherl.memory_batch must be an int >= 1 or null, got {self.memory_batch!r}")
        for b in self.memory_backbones or []:
            if b not in list(self.backbones) + list(self.text_backbones):
                raise UnknownNameError("sherl.memory_backbones backbone", b,
                                       list(self.backbones) + list(self.text_backbones))
        if not self.seeds:
            raise ValueError("sherl.seeds must not be empty")
        if len(self.headline_methods) != 2 or len(set(self.headline_methods)) != 2:
            raise ValueError(f"sherl.headline_methods must be two methods [reference, contender], e.g. [full, sherl]; "
                             f"got {self.headline_methods}")

    # ------------------------------------------------------------------ grid
    def cells(self) -> list[tuple[str, str]]:
        """Tab. 1 cells in order: text cells first, then the VL cells."""
        return ([(b, t) for b in self.text_backbones for t in self.text_tasks]
                + [(b, t) for b in self.backbones for t in self.tasks])

    def methods_of(self, task: str) -> list[str]:
        return list(self.text_methods if get_task(task).modality == "text" else self.vl_methods)

    def ablation_cell(self) -> tuple[str, str]:
        """``[backbone, task]`` of Fig. 4 / Fig. 7 / late regulation (default: the first cell)."""
        return tuple(self.ablation) if self.ablation is not None else self.cells()[0]

    def lr_for(self, method: str, task: str) -> float:
        return float(self.method_lr.get(method, self.settings(task)["lr"]))

    def cnn_settings(self) -> dict:
        """The CNN table's settings: ``cnn`` over :data:`CNN_DEFAULTS`."""
        return cnn_settings(self.cnn)

    def measures(self, backbone: str, method: str) -> bool:
        """Whether the peak of ``method`` on ``backbone`` is measured in a subprocess."""
        return (self.memory == "subprocess" and (self.memory_methods is None or method in self.memory_methods)
                and (self.memory_backbones is None or backbone in self.memory_backbones))


# ---------------------------------------------------------------------------- options
def canonical_options(method: str, *layers: Mapping | None) -> dict:
    """The options of ``method`` merged left to right from ``layers``, with every entry equal to
    the method's default dropped and the rest sorted -- one key per distinct model, so the
    default SHERL run of Tab. 1 and the ``aggregator="mtsa"`` run of Fig. 4 are the same run.
    ``seed`` is kept out (it is the run's seed)."""
    from vlkit.methods.petl import options

    defaults = options(method)
    merged: dict = {}
    for layer in layers:
        merged.update(layer or {})
    for k in merged:
        if k not in defaults:
            raise UnknownNameError(f"option of {method}", k, list(defaults))
    return {k: merged[k] for k in sorted(merged) if k != "seed" and merged[k] != defaults[k]}


def late_options(k: int) -> dict:
    """SHERL options for ``k`` late pre-trained units: 0 -> ``late_unit=False`` (the merged
    features are the final features), k >= 1 -> ``insert_last=k``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"late units must be an int >= 0, got {k!r}")
    return {"late_unit": False} if k == 0 else {"insert_last": k}


def _describe(opts: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"


def _method_options(method: str, opts: Mapping, seed: int) -> dict:
    from vlkit.methods.petl import options

    return {**opts, **({"seed": seed} if "seed" in options(method) else {})}


# ---------------------------------------------------------------------------- memory
def memory_batch(data, spec, batch_size: int, text_len: int) -> dict:
    """The memory batch: the first ``batch_size`` examples of ``data`` (a :class:`TaskData`),
    collated, with ``input_ids`` / ``attention_mask`` padded (pad id 0, mask 0) to ``text_len``
    tokens -- the task's full length, so the figure does not depend on which examples come first."""
    n = min(int(batch_size), len(data))
    if n < 1:
        raise ValueError(f"memory batch needs at least one example; {spec.name} has {len(data)}")
    batch = dict(data.collate(data.examples[:n]))
    for ids, mask in (("input_ids", "attention_mask"), ("neg_input_ids", "neg_attention_mask")):
        if ids in batch:
            cur = batch[ids].shape[1]
            if cur > text_len:
                raise ValueError(f"{spec.name}: token ids of length {cur} exceed text_len {text_len}")
            pad = text_len - cur
            batch[ids] = torch.nn.functional.pad(batch[ids], (0, pad), value=data.collate.pad_id)
            batch[mask] = torch.nn.functional.pad(batch[mask], (0, pad), value=0)
    return batch


def memory_accounting(spec, model: TaskModel, batch: dict) -> dict:
    """Deterministic training memory of ``model`` (backbone/method + head) on ``batch``, MiB:

    ``weights_mib`` every parameter; ``states_mib`` gradients + AdamW's two moments of the
    trainable parameters (3 x their bytes); ``saved_mib`` what autograd saves in one training
    forward (:func:`vlkit.efficiency.autograd_saved_bytes`); ``est_mib`` their sum -- the
    steady-state lower bound of a training step (no allocator slack, no transient buffers)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    states = 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    was = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):  # dropout draws: leave the caller's RNG alone
            saved = autograd_saved_bytes(lambda: spec.loss(model, batch)["loss"], model)
    finally:
        model.train(was)
    return {"weights_mib": round(weights / MIB, 2), "states_mib": round(states / MIB, 2),
            "saved_mib": round(saved / MIB, 2), "est_mib": round((weights + states + saved) / MIB, 2)}


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``; a no-op elsewhere), so memory
    freed before the baseline / the peak reset is not silently reused below them (measured on a
    tiny ``vilt-mini``: without it the SHERL peak read 3 MiB for 11 MiB of accounted memory)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _warm_up(text_weights: bool = True) -> None:
    """One tiny training step of every method on a tiny random ``vilt-mini`` and, with
    ``text_weights``, the import MiniLM's builder makes (the HF BERT classes, ~4 s): library
    code and lazily imported modules (PEFT, ...) land in the peak-memory child's baseline, not
    in the model's memory."""
    if text_weights:
        import transformers.models.bert.modeling_bert  # noqa: F401  (MiniLM's builder)

    from vlkit.methods.petl import apply
    from vlkit.models import build

    spec = get_task("easyvqa")
    for method in TABLE_METHODS:
        bb = build("vilt-mini", pretrained_text=False, dim=32, heads=4, ffn_dim=64, layers=3)
        model = TaskModel(apply(method, bb), spec.make_head({"dim": 32}), method)
        x = bb.dummy_inputs(2)
        batch = {**x, "labels": torch.zeros(2, dtype=torch.long)}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
        model.train()
        spec.loss(model, batch)["loss"].backward()
        opt.step()
    gc.collect()
    _trim_heap()


def _warm_up_cnn() -> None:
    """The CNN children's warm-up: one tiny training step of each CNN method on
    ``effnet-lite0`` (64 px, 2 images), so the package import, the weights file's cached state
    dict and the convolution kernels land in the baseline, not in the model's memory."""
    from vlkit.models import build

    batch = {"pixel_values": torch.full((2, 3, 64, 64), 127.0), "labels": torch.tensor([0, 1])}
    for method in CNN_METHODS:
        model = _cnn_model(build("effnet-lite0"), method, {}, 2)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
        image_task(2).loss(model, batch)["loss"].backward()
        opt.step()
    gc.collect()
    _trim_heap()


def _warm_up_child() -> None:
    mode = os.environ[WARMUP_ENV]
    if mode == "cnn":
        _warm_up_cnn()
    else:
        _warm_up(text_weights=mode == "text")


def train_step_memory(*, preset: str, overrides: dict, task: str, method: str, options: dict, batch_path: str,
                      lr: float = 1e-3, steps: int = 2, seed: int = 0) -> dict:
    """The peak-memory target (runs in :func:`vlkit.efficiency.peak_memory`'s child): build
    ``preset`` (random VL weights: memory does not depend on them), apply ``method``, add the
    task head, reset the peak counter, run ``steps`` AdamW training steps (fused, as the tables
    train) on the batch stored at ``batch_path`` (safetensors)."""
    from safetensors.torch import load_file

    from vlkit.methods.petl import apply
    from vlkit.models import build

    spec = get_task(task)
    batch = load_file(batch_path)
    torch.manual_seed(seed)
    backbone = build(preset, **overrides)
    tuned = apply(method, backbone, **options)
    x = spec.inputs({k: v[:1] for k, v in batch.items()},
                    "image_feats_left" if "image_feats_left" in batch else "image_feats")
    tuned.eval()
    with torch.no_grad():
        dim = int(tuned(**x).pooled.shape[-1])
    model = TaskModel(tuned, spec.make_head({"dim": dim}), method).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    gc.collect()
    _trim_heap()
    reset = _reset_cpu_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        spec.loss(model, batch)["loss"].backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"step_s": times[-1], "peak_reset_after_build": reset, "trainable": params(model, True)}


def measure_peak(cfg: SHERLConfig, backbone: str, spec, batch: dict, method: str, opts: Mapping,
                 lr: float, seed: int = 0) -> dict:
    """Measured training peak of one configuration (:func:`train_step_memory` in a fresh
    subprocess via :func:`vlkit.efficiency.peak_memory`): ``{"peak_mib", "step_s", "load_avg",
    "method_note"}``."""
    overrides = dict(cfg.overrides.get(backbone) or {})
    # presets built with MiniLM's weights import the HF BERT classes: warm that import up too
    warmup = "plain" if overrides.get("pretrained_text") is False else "text"
    return _peak_in_child(cfg, "train_step_memory", batch, warmup, seed, preset=backbone, overrides=overrides,
                          task=spec.name, method=method, options=dict(opts), lr=float(lr))


def _peak_in_child(cfg: SHERLConfig, target: str, batch: dict, warmup: str, seed: int, **kwargs) -> dict:
    """Run ``target`` (a function of this module taking ``batch_path``) under
    :func:`vlkit.efficiency.peak_memory` with ``batch`` saved to a temporary safetensors file
    and the child's warm-up ``warmup`` (:data:`WARMUP_ENV`): ``{"peak_mib", "step_s",
    "load_avg", "peak_reset_after_build"}``."""
    from safetensors.torch import save_file

    from vlkit.efficiency import peak_memory

    with tempfile.TemporaryDirectory(prefix="vlkit-sherl-mem-") as tmp:
        path = str(Path(tmp) / "batch.safetensors")
        save_file({k: v.contiguous() for k, v in batch.items()}, path)
        old = os.environ.get(WARMUP_ENV)
        os.environ[WARMUP_ENV] = warmup
        try:
            load = os.getloadavg()[0]
            r = peak_memory(f"vlkit.methods.sherl_study:{target}", "cpu", seed=seed, threads=int(cfg.threads or 1),
                            timeout_s=600, batch_path=path, **kwargs)
        finally:
            if old is None:
                os.environ.pop(WARMUP_ENV, None)
            else:
                os.environ[WARMUP_ENV] = old
    return {"peak_mib": round(r["gib"] * 1024, 1), "step_s": round(r["result"]["step_s"], 3),
            "load_avg": round(load, 2), "peak_reset_after_build": r["result"]["peak_reset_after_build"]}


# ---------------------------------------------------------------------------- one run
def run_cell(cfg: SHERLConfig, profile: str | None, backbone: str, task: str, method: str, *,
             options: Mapping | None = None, seed: int = 0, measure: bool = True, cache: dict | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Fine-tune ``method`` (with ``cfg.method_options`` then ``options``) on ``backbone`` x
    ``task`` under ``seed``, evaluate, account its memory (and measure its peak when ``measure``
    and :meth:`SHERLConfig.measures`). Returns the table row; runs and peaks are cached in
    ``cache`` by their canonical options, so every table reuses them."""
    cache = cache if cache is not None else {}
    opts = canonical_options(method, cfg.method_options.get(method), options)
    key = ("run", backbone, task, method, tuple(opts.items()), seed)
    if key not in cache:
        base, pretrained = cached_backbone(backbone, cfg, cache)
        spec, s, data = task_spec(task, cfg), cfg.settings(task), cached_task_data(task, cfg, profile, cache)
        lr = cfg.lr_for(method, task)
        tc = train_config_for({**s, "lr": lr}, len(data["train"]), False, seed)
        mult = float(s["head_lr_mult"]) if method == "full" else 1.0
        splits = tuple(sp for sp in ("val", "test") if sp in data)
        t0 = time.perf_counter()
        res = finetune(spec, copy.deepcopy(base), method, data=data, train_config=tc, seed=seed, eval_splits=splits,
                       head_lr_mult=mult, method_options=_method_options(method, opts, seed))
        row = table_row(task, backbone, method, pretrained, spec, res, data)
        mb = _memory_batch(cfg, spec, s, data, cache)
        row.update(options=_describe(opts), seed=seed, lr=lr,
                   params_pct=round(100.0 * res["trainable"]["backbone"] / params(base), 3),
                   method_params=res["trainable"]["backbone"], head_params=res["trainable"]["head"],
                   mem_batch=int(next(iter(mb.values())).shape[0]), mem_len=int(mb["input_ids"].shape[1]),
                   **memory_accounting(spec, res["model"], mb))
        del res
        cache[key] = row
        log(f"{method:7s} {_describe(opts):28s} {task:13s} {backbone:9s} seed {seed}: test {row['test']:6.2f} "
            f"+- {row['test_se']:.2f}  est {row['est_mib']:8.1f} MiB  ({time.perf_counter() - t0:.0f} s)")
    row = dict(cache[key])
    mkey = ("peak", backbone, task, method, tuple(opts.items()))
    if measure and cfg.measures(backbone, method):
        if mkey not in cache:
            spec = task_spec(task, cfg)
            mb = _memory_batch(cfg, spec, cfg.settings(task), cached_task_data(task, cfg, profile, cache), cache)
            cache[mkey] = measure_peak(cfg, backbone, spec, mb, method, _method_options(method, opts, seed),
                                       cfg.lr_for(method, task), seed)
            log(f"        peak {cache[mkey]['peak_mib']:8.1f} MiB (accounted {row['est_mib']:.1f})")
    if mkey in cache:
        row.update(cache[mkey])
    return row


def split_measured(table: pd.DataFrame, keys=("task", "backbone", "method", "options")) -> tuple[pd.DataFrame,
                                                                                               pd.DataFrame]:
    """``(scores, measured)``: the table without the run-to-run varying columns (:data:`MEASURED`
    and ``peak_reset_after_build``), and, for the rows whose peak was measured, those columns
    with ``keys`` and the accounted memory beside them (``memory.csv``; empty if none was)."""
    varying = [c for c in (*MEASURED, "peak_reset_after_build") if c in table]
    scores = table.drop(columns=varying).reset_index(drop=True)
    if "peak_mib" not in table:
        return scores, pd.DataFrame(columns=[*keys, "peak_mib"])
    mem_cols = [c for c in (*keys, "mem_batch", "mem_len", "est_mib", "saved_mib", *varying) if c in table]
    measured = table.loc[table["peak_mib"].notna(), mem_cols]
    return scores, measured.drop_duplicates().reset_index(drop=True)


def with_measured(scores: pd.DataFrame, measured: pd.DataFrame | None,
                  keys=("task", "backbone", "method", "options")) -> pd.DataFrame:
    """``scores`` with the measured columns of ``measured`` (``memory.csv``) joined on ``keys``
    (rows never measured get none); the inverse of :func:`split_measured` for display."""
    if measured is None or measured.empty:
        return scores.copy()
    cols = [c for c in MEASURED if c in measured]
    right = measured[list(keys) + cols].drop_duplicates(subset=list(keys))
    return scores.drop(columns=[c for c in cols if c in scores]).merge(right, on=list(keys), how="left")


# ---------------------------------------------------------------------------- tables
def study_tab1(cfg: SHERLConfig, profile: str | None, *, seed: int = 0, cells=None, cache: dict | None = None,
               log: Callable[[str], None] = print) -> pd.DataFrame:
    """Tab. 1: every method of each cell (default :meth:`SHERLConfig.cells`) under ``seed``."""
    cache = cache if cache is not None else {}
    rows = []
    for b, t in (cells or cfg.cells()):
        for m in cfg.methods_of(t):
            rows.append(run_cell(cfg, profile, b, t, m, seed=seed, cache=cache, log=log))
    return _order(pd.DataFrame(rows))


def study_headline(cfg: SHERLConfig, profile: str | None, *, cache: dict | None = None,
                   log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(summary, runs)``: ``headline_methods`` on each ``headline`` cell under every seed of
    ``seeds`` (seed-0 runs are Tab. 1's); :func:`seed_summary` of the runs."""
    cache = cache if cache is not None else {}
    runs = []
    for b, t in cfg.headline:
        for m in cfg.headline_methods:
            for sd in cfg.seeds:
                runs.append(run_cell(cfg, profile, b, t, m, seed=sd, measure=False, cache=cache, log=log))
    runs = pd.DataFrame(runs)
    return seed_summary(runs, cfg.headline_methods), runs[[c for c in _RUN_COLS if c in runs]]


_RUN_COLS = ("task", "backbone", "method", "options", "seed", "test", "test_se", "n_test", "val", "params_pct",
             "est_mib")


def seed_summary(runs: pd.DataFrame, methods=("full", "sherl")) -> pd.DataFrame:
    """Per ``(task, backbone, method)`` of ``runs``: runs, mean and sample standard deviation
    (ddof 1; 0 for one run) of the test score, its mean binomial SE, min and max; and, per cell,
    the verdict of ``methods[1]`` against ``methods[0]`` (the winner's name, or ``tie`` when
    the difference is within ``max(sqrt(sd_a^2 + sd_b^2), SE)``)."""
    from vlkit.methods.das.study import verdict

    rows = []
    for (t, b), cell in runs.groupby(["task", "backbone"], sort=False):
        stats = {}
        for m, g in cell.groupby("method", sort=False):
            sd = seed_sd(g.test)
            stats[m] = (float(g.test.mean()), sd, float(g.test_se.mean()))
            rows.append({"task": t, "backbone": b, "method": m, "runs": len(g), "seeds": " ".join(map(str, g.seed)),
                         "mean": round(stats[m][0], 2), "sd": round(sd, 2), "test SE": round(stats[m][2], 2),
                         "min": round(float(g.test.min()), 2), "max": round(float(g.test.max()), 2),
                         "n_test": int(g.n_test.iloc[0])})
        if len(methods) >= 2 and all(m in stats for m in methods[:2]):
            (ma, sa, ea), (mb, sb, eb) = stats[methods[1]], stats[methods[0]]
            v = verdict(ma, sa, mb, sb, max(ea, eb))
            winner = {"DAS": methods[1], "random": methods[0], "tie": "tie"}[v]
            for r in rows:
                if (r["task"], r["backbone"]) == (t, b):
                    r[f"{methods[1]} - {methods[0]}"] = round(ma - mb, 2)
                    r["verdict"] = winner
    return pd.DataFrame(rows)


def study_aggregators(cfg: SHERLConfig, profile: str | None, *, seed: int = 0, cache: dict | None = None,
                      log: Callable[[str], None] = print) -> pd.DataFrame:
    """Fig. 4: SHERL with each aggregator of ``cfg.aggregators`` on the ablation cell."""
    b, t = cfg.ablation_cell()
    rows = [{**run_cell(cfg, profile, b, t, "sherl", options={"aggregator": a}, seed=seed, measure=False,
                        cache=cache, log=log), "aggregator": a} for a in cfg.aggregators]
    return _order(pd.DataFrame(rows), first=("aggregator",))


def study_reduction(cfg: SHERLConfig, profile: str | None, *, seed: int = 0, cache: dict | None = None,
                    log: Callable[[str], None] = print) -> pd.DataFrame:
    """Fig. 7: SHERL at each reduction factor of ``cfg.reductions`` on the ablation cell (MTSA
    width D / r), with its memory; full fine-tuning's row (Tab. 1's run) for reference."""
    b, t = cfg.ablation_cell()
    rows = [{**run_cell(cfg, profile, b, t, "sherl", options={"reduction": r}, seed=seed, cache=cache, log=log),
             "r": r} for r in cfg.reductions]
    rows.append({**run_cell(cfg, profile, b, t, "full", seed=seed, cache=cache, log=log), "r": None})
    return _order(pd.DataFrame(rows), first=("r",))


def study_late(cfg: SHERLConfig, profile: str | None, *, seed: int = 0, cache: dict | None = None,
               log: Callable[[str], None] = print) -> pd.DataFrame:
    """Late regulation: SHERL with each number of late pre-trained units in ``cfg.late_units``
    on the ablation cell (:func:`late_options`)."""
    b, t = cfg.ablation_cell()
    rows = [{**run_cell(cfg, profile, b, t, "sherl", options=late_options(k), seed=seed, cache=cache, log=log),
             "late_units": k} for k in cfg.late_units]
    return _order(pd.DataFrame(rows), first=("late_units",))


# ---------------------------------------------------------------------------- CNN (Sec. 3.3, Fig. 3b)
class PixelCollate:
    """Examples ``{"pixels": (3, H, W) uint8, "label": int}`` -> ``{"pixel_values": (B, 3, H, W)
    float 0..255, "labels": (B,) long}`` (the protocol CNN scales the pixels itself)."""

    def __call__(self, examples) -> dict:
        if len(examples) == 0:
            raise ValueError("cannot collate an empty batch")
        return {"pixel_values": torch.stack([e["pixels"] for e in examples]).float(),
                "labels": torch.as_tensor([int(e["label"]) for e in examples], dtype=torch.long)}


@dataclasses.dataclass(frozen=True)
class ImageClassifyTask(ClassifyTask):
    """Image classification on a protocol CNN's ``pooled`` output (the CNN table's task; not a
    :data:`vlkit.tasks.runner.TASKS` entry): cross-entropy, accuracy ± binomial SE, so
    :func:`vlkit.tasks.runner.finetune` trains and evaluates it like the other tasks. Its data
    is :func:`image_task_data`; the model's input is ``pixel_values`` alone.

    Head: one ``Linear(D, C)`` for **every** method (full fine-tuning, SHERL and the linear
    probe alike), as EfficientNet's own ImageNet classifier -- ViLT's two-layer classifier of
    the other tables would have ``2D² + ...`` = 3.3 M parameters on the 1280-wide pooled
    vector, as many as the whole backbone, and would dominate the memory of the cheap methods."""

    def inputs(self, batch: dict, *_, **__) -> dict:
        return {"pixel_values": batch["pixel_values"]}

    def make_head(self, dims: dict, linear: bool = False) -> nn.Module:
        from vlkit.tasks.heads import ClassifierHead

        return ClassifierHead(dims["dim"], self.num_classes, hidden=0)

    def load(self, split: str, **_):
        raise NotImplementedError("ImageClassifyTask's splits come from image_task_data(...)")


def image_task(num_classes: int, name: str = "shapes_count") -> ImageClassifyTask:
    """The :class:`ImageClassifyTask` of generated set ``name`` with ``num_classes`` classes."""
    return ImageClassifyTask(name, name, "image", "accuracy", "", text_len=0, num_classes=int(num_classes))


def image_task_data(dataset: str, split: str, *, seed: int = 0, knobs: Mapping | None = None) -> TaskData:
    """Every row of ``split`` of the generated image set ``dataset`` (``vlkit.data.load`` with
    ``seed`` and ``knobs``) as a :class:`TaskData` of ``{"pixels": (3, H, W) uint8, "label"}``
    examples collated by :class:`PixelCollate`; ``meta["classes"]``: the class names."""
    from vlkit.data import load

    ds = load(dataset, split, seed=seed, **dict(knobs or {}))
    examples = [{"pixels": torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
                 .contiguous(), "label": int(y)} for img, y in zip(ds["image"], ds["label"])]
    return TaskData(dataset, split, examples, PixelCollate(), list(range(len(ds))), len(ds),
                    {"classes": ds.features["label"].names})


def _cnn_model(backbone, method: str, options: Mapping, num_classes: int) -> TaskModel:
    """The CNN table's model: ``method`` applied to ``backbone`` (the linear probe: the frozen
    backbone, in eval mode) and a fresh linear head (:class:`ImageClassifyTask`)."""
    from vlkit.methods.petl import apply

    probe = method == "linear_probe"
    if probe:
        tuned = backbone.requires_grad_(False).eval()
    else:
        tuned = apply(method, backbone, **options)
    dim = int(backbone.head.out_channels)  # EfficientNetBackbone.finalize pools the head conv's channels
    return TaskModel(tuned, image_task(num_classes).make_head({"dim": dim}, linear=probe), method)


def cnn_train_step_memory(*, preset: str, method: str, options: dict, batch_path: str, num_classes: int,
                          lr: float = 1e-3, steps: int = 2, seed: int = 0) -> dict:
    """The CNN peak-memory target (in :func:`vlkit.efficiency.peak_memory`'s child), as
    :func:`train_step_memory`: build ``preset``, apply ``method`` (``linear_probe``: frozen
    backbone in eval mode, a linear head -- its step runs the backbone without a graph), reset
    the peak counter, run ``steps`` fused-AdamW steps on the batch at ``batch_path``."""
    from safetensors.torch import load_file

    from vlkit.models import build

    batch = load_file(batch_path)
    torch.manual_seed(seed)
    model = _cnn_model(build(preset), method, options, num_classes).train()
    if method == "linear_probe":
        model.backbone.eval()
    spec = image_task(num_classes)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    gc.collect()
    _trim_heap()
    reset = _reset_cpu_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        spec.loss(model, batch)["loss"].backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"step_s": times[-1], "peak_reset_after_build": reset, "trainable": params(model, True)}


def _cnn_data(cfg: SHERLConfig, profile: str | None, cache: dict) -> dict:
    """``{"train", "test"}`` :class:`TaskData` of the CNN set (params.yaml's seed under a profile)."""
    from vlkit import config

    s = cfg.cnn_settings()
    key = ("cnn_data", s["dataset"], repr(sorted(s["data"].items())), profile)
    if key not in cache:
        seed = config.seed() if profile is not None else 0
        cache[key] = {split: image_task_data(s["dataset"], split, seed=seed, knobs=s["data"])
                      for split in ("train", "test")}
    return cache[key]


def run_cnn(cfg: SHERLConfig, profile: str | None, method: str, *, seed: int = 0, measure: bool = True,
            cache: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """One row of the CNN table: ``method`` (:data:`CNN_METHODS`) on the ``cnn`` backbone and
    set, trained under ``seed`` with :func:`vlkit.tasks.runner.finetune` (full fine-tuning at
    ``full_lr``, its head at ``head_lr_mult`` x; SHERL at ``lr`` with ``sherl_options``; the
    linear probe: ``probe_epochs`` at ``probe_lr`` on features computed once), evaluated on
    every test row; memory accounted as in Tab. 1 (:func:`memory_accounting`) on the first
    ``memory_batch`` training images, and measured (:func:`cnn_train_step_memory`) when
    ``memory`` is ``subprocess`` and ``method`` is among ``memory_methods``."""
    from vlkit.models import build

    cache = cache if cache is not None else {}
    s = cfg.cnn_settings()
    if method not in CNN_METHODS:
        raise UnknownNameError("CNN table method", method, CNN_METHODS)
    opts = canonical_options("sherl", s["sherl_options"]) if method == "sherl" else {}
    key = ("cnn_run", s["backbone"], s["dataset"], method, tuple(opts.items()), seed)
    data = _cnn_data(cfg, profile, cache)
    spec = image_task(len(data["train"].meta["classes"]), s["dataset"])
    lr = s["full_lr"] if method == "full" else s["lr"]
    mb = data["train"].collate(data["train"].examples[:s["memory_batch"] or s["batch_size"]])
    if key not in cache:
        bkey = ("cnn_backbone", s["backbone"])
        if bkey not in cache:
            cache[bkey] = build(s["backbone"])
        base = cache[bkey]
        tc = train_config_for({**s, "lr": lr}, len(data["train"]), method == "linear_probe", seed)
        t0 = time.perf_counter()
        res = finetune(spec, copy.deepcopy(base), method, data=data, train_config=tc, seed=seed, eval_splits=("test",),
                       head_lr_mult=float(s["head_lr_mult"]) if method == "full" else 1.0,
                       method_options=_method_options(method, opts, seed) if method != "linear_probe" else None)
        row = table_row(s["dataset"], s["backbone"], method, "yes", spec, res, data)
        row.update(options=_describe(opts), seed=seed, lr=s["probe_lr"] if method == "linear_probe" else lr,
                   params_pct=round(100.0 * res["trainable"]["backbone"] / params(base), 3),
                   method_params=res["trainable"]["backbone"], head_params=res["trainable"]["head"],
                   mem_batch=int(mb["pixel_values"].shape[0]), mem_px=int(mb["pixel_values"].shape[-1]),
                   **memory_accounting(spec, res["model"], mb))
        del res
        cache[key] = row
        log(f"{method:12s} {_describe(opts):20s} {s['dataset']:12s} {s['backbone']}: test {row['test']:6.2f} "
            f"+- {row['test_se']:.2f}  est {row['est_mib']:8.1f} MiB  ({time.perf_counter() - t0:.0f} s)")
    row = dict(cache[key])
    mkey = ("cnn_peak",) + key[1:-1]
    wanted = s["memory_methods"] is None or method in s["memory_methods"]
    if measure and cfg.memory == "subprocess" and wanted:
        if mkey not in cache:
            cache[mkey] = _peak_in_child(cfg, "cnn_train_step_memory", mb, "cnn", seed, preset=s["backbone"],
                                         method=method, options=_method_options(method, opts, seed)
                                         if method == "sherl" else {}, num_classes=spec.num_classes, lr=float(lr))
            log(f"             peak {cache[mkey]['peak_mib']:8.1f} MiB (accounted {row['est_mib']:.1f})")
    if mkey in cache:
        row.update(cache[mkey])
    return row


def study_cnn(cfg: SHERLConfig, profile: str | None, *, seed: int = 0, cache: dict | None = None,
              log: Callable[[str], None] = print) -> pd.DataFrame:
    """SHERL beyond Transformers (Sec. 3.3, Fig. 3b): every method of ``cnn.methods`` (full
    fine-tuning, linear probe, SHERL) on the ``cnn`` backbone and set under ``seed``
    (:func:`run_cnn`); the Tab. 1 columns (test ± SE, params %, accounted memory, measured
    peak where measured)."""
    cache = cache if cache is not None else {}
    rows = [run_cnn(cfg, profile, m, seed=seed, cache=cache, log=log) for m in cfg.cnn_settings()["methods"]]
    return _order(pd.DataFrame(rows))


# ---------------------------------------------------------------------------- helpers


def _memory_batch(cfg: SHERLConfig, spec, s: dict, data: dict, cache: dict) -> dict:
    key = ("memory_batch", spec.name)
    if key not in cache:
        n = cfg.memory_batch or int(s["batch_size"])
        cache[key] = memory_batch(data["train"], spec, n, int(s["text_len"] or spec.text_len))
    return cache[key]


def _order(table: pd.DataFrame, first: tuple = ()) -> pd.DataFrame:
    empty = [c for c in ("val", "val_se", "n_val", "gallery") if c in table and table[c].isna().all()]
    table = table.drop(columns=empty)
    lead = [*first, "task", "backbone", "method", "options", "test", "test_se", "n_test", "val", "params_pct",
            "method_params", "head_params", "trainable", "est_mib", "saved_mib", "peak_mib", "seed"]
    return table[[c for c in lead if c in table] + [c for c in table if c not in lead]]


if os.environ.get(WARMUP_ENV):  # set by the peak measurements for their children only (after every definition)
    _warm_up_child()
