"""The EfficientVLM study (DVC stage ``evlm``, notebook ``notebooks/21_evlm.py``): Tables 1-4
and Figures 2-3 of Wang et al. 2023 on the mini X-VLM teacher and its half-depth student.

    python -m vlkit.notebook 21_evlm --profile default      # what `dvc repro evlm` runs

The task-time pipeline (:meth:`Study.run`, one *variant* per call)
-----------------------------------------------------------------
1. The teacher (``xvlm-mini``, 6/6/6, in-repo pre-trained) is fine-tuned on the task
   (:func:`vlkit.tasks.runner.finetune`, the task's ``task_settings``).
2. The student (``xvlm-mini-half``, 3/3/3, layer ``i`` of each encoder initialised from the
   *pre-trained* teacher's layer ``2i + 1``; :func:`vlkit.models.xvlm.student_layer_map`) gets
   a fresh task head and trains for ``prune.steps`` (phase 1) then ``prune.finetune_steps``
   (phase 2) optimiser steps:

   * **phase 1** -- with KD (``kd``), the loss is EfficientVLM's task-time distillation from
     the fine-tuned teacher (Sec. 3.1; :mod:`.distill`: attention-map MSE, hidden-state MSE,
     logits KL, task cross-entropy, weighted by params.yaml's ``evlm.distill``); without KD,
     the task cross-entropy alone. With pruning, hard-concrete gates sit on every head,
     cross-attention head, FFN unit and sub-layer of the student (:func:`.gating.attach_gates`)
     and the Lagrangian penalty of a :class:`~vlkit.nn.lagrangian.SparsityBudget` is added
     (Sec. 3.3, CoFi Eq. 6): ``scope="global"`` -- one budget over vision + text + fusion
     (*modal-adaptive*) -- or ``scope="per_group"`` -- one budget per encoder (*uniform*, or the
     *manual* per-encoder targets of Tab. 1). The target is warmed up linearly from 0 over the
     first ``prune.warmup`` share of phase 1, then held. Constant learning rate (after a 10 %
     warm-up); log alpha at ``prune.gate_lr``, the multipliers (gradient *ascent*) at
     ``prune.lambda_lr``, both without weight decay and with Adam's ``beta1 =
     prune.momentum`` (default 0; the reference keeps 0.9 over thousands of steps -- over a
     few dozen, momentum carried the gates far past the target: on the ci model the achieved
     sparsity missed it by 0.2-0.4 with 0.9, by at most ~0.07 with 0, apart from the
     coarsest 4-head layers at high targets). Initial log alpha 2 for heads and FFN units
     (``P(z > 0) = 0.97``; the reference's 10 for heads would not move in so few steps).
   * end of phase 1 -- the masks are frozen (:meth:`SparsityBudget.freeze`: gates, log alpha
     and lambdas fixed for good), exported (each sub-layer gate folded in) and the heads and
     FFN units they close are **physically removed** (:func:`.prune.prune`).
   * **phase 2** -- a short fine-tune of the smaller model with the same objective, linear
     decay to 0. The attention-map loss is kept only while every student unit still has the
     teacher's head count (it compares maps head by head), i.e. it is dropped after heads
     were removed; hidden and logits KD continue.

   The variants: ``student`` (no KD, no pruning: fine-tune only, the *un-distilled student*),
   ``kd`` (KD only), ``prune`` (pruning only), ``evlm`` (KD + pruning: EfficientVLM), each
   at one ``scope`` and target. Every variant trains the same number of steps on the same
   seeded data order.
3. Evaluation on the ``test`` subset (the task's accuracy, one binomial SE); parameters and
   GMACs per module (vision / text / fusion, :func:`module_params`, :func:`module_gmacs`) of
   the final model; the achieved sparsity -- removed / prunable parameters, overall and per
   encoder -- from the frozen masks (:func:`mask_sparsity`), which is the paper's key
   finding when the budget is global: where the pruning went.

What each table holds (``results/evlm/``; ``runs/results-ci/evlm/`` under ``ci``)
-----------------------------------------------------------------------------
* **Tab. 3** (:func:`table_3`): per task, teacher, un-distilled student and EfficientVLM with
  the modal-adaptive *and* the uniform budget at the same target ``target``, side by side
  whatever the outcome; on the ``headline`` tasks the student and both EfficientVLM rows run
  every seed of ``seeds`` (mean, sample SD); other rows one seed.
* **Tab. 1** (:func:`table_1`): ``manual_task`` with the manual per-encoder targets of
  ``manual`` (paper: .3/.3/.3, .1/.4/.4, .1/.1/.6 for vision/text/fusion; ``per_group``
  budgets), beside modal-adaptive pruning at the same *overall* sparsity (the size-weighted
  mean of the manual targets, rounded to 0.05).
* **Tab. 4** (fine-tuning part, :func:`table_4`): full (KD + pruning) / KD only / pruning
  only / fine-tune only on ``ablation_tasks`` (global budget, ``target``).
* **Fig. 2** (:func:`sensitivity`): head-pruning sensitivity -- the fine-tuned model
  (``sensitivity.model``: the un-distilled ``student`` or the ``teacher``) with a fraction of
  the heads of *one* encoder masked, no retraining; heads chosen by importance (Michel et
  al. 2019: ``|dL/dm_h|`` summed over ``sensitivity.batches`` training batches; the least
  important go first) or at random (``rule: random``, seeded). Fusion units lose the same
  fraction of self- and of cross-attention heads.
* **Fig. 3** (:func:`sweep`): ``sweep_task`` at every target of ``sweep``, modal-adaptive vs
  uniform.
* **Tab. 2** (:func:`table_2`): parameters and GMACs per module of the mini teacher, student
  and pruned students (one (image, text) pass of ``dummy_inputs``: 17 image and 40 text
  tokens), and of ``xvlm-clip`` vs ``xvlm-clip-small`` (and the latter uniformly pruned at
  ``paper_sparsity``: the first heads / FFN units of every unit kept) at the paper's 196 + 1
  image and 35 text tokens (random weights: MACs do not depend on them). Latency columns read
  ``results/bench/<bench>.<device>.json`` (:mod:`vlkit.bench_io`) for each bench of
  ``latency_benches``: rows ``{"model", "module", "latency_ms"}`` (``module`` in vision /
  text / fusion / total); "not measured" where the device's file or the row is absent.
* ``trajectories.csv``: expected sparsity, target and multipliers per phase-1 step of every
  pruning run (the controller's path).

GMACs are per test example (NLVR: its two passes) under the :func:`vlkit.efficiency.macs`
counter, cached image cells as input (the frozen CNN is in no column). The embedding step's
MACs are the vision embedding's (the cell / patch projection; text embeddings are lookups) and
the pooler's are the fusion encoder's, as in :meth:`vlkit.models.xvlm.XVLM.parts`.

Tab. 4's pre-training half (task-agnostic distillation on the pre-training corpus,
objectives added one by one, then fine-tune only) is :func:`.pretrain_kd.table_4_pretrain`.

Runtime: ``ci`` about 30 s of CPU. ``default`` (2 tasks, 3 seeds on shapes_nlvr: 2 teacher
fine-tunes and 21 student runs of 48 steps at batch 16, 16 of them with the teacher running
beside the student; estimated from the MACs, not yet measured): about 15-20 minutes on 2 CPU
cores.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.models.protocol import UnknownNameError
from vlkit.tasks.baselines import BaselinesConfig, load_backbone, load_task_data, task_spec, train_config_for
from vlkit.tasks.metrics import seed_sd
from vlkit.tasks.runner import ClassifyTask, NLVRTask, TaskModel, finetune

from .distill import DistillConfig, Distiller, _run, logits_loss
from .gating import INIT_KEYS, attach_gates
from .prune import prunable_units, prune, removed_params, sublayer, uniform_masks, unit_keys

__all__ = ["EVLMConfig", "ENCODERS", "VARIANTS", "PRUNE_KEYS", "SENSITIVITY_KEYS", "Variant", "Study",
           "CompressModel", "compress_loss", "task_inputs", "stack_passes", "module_params", "module_macs",
           "module_gmacs", "prunable_params", "mask_sparsity", "overall_target", "head_importance",
           "encoder_head_masks", "sensitivity", "table_3", "summarise", "table_1", "table_4", "sweep", "table_2",
           "uniform_masks", "pruned_label", "latency_cell", "trajectories"]

ENCODERS = ("vision", "text", "fusion")
VARIANTS = ("student", "kd", "prune", "evlm")  # (kd, prune): (F, F), (T, F), (F, T), (T, T)
SCOPES = ("global", "per_group")
PRUNE_KEYS = ("steps", "finetune_steps", "warmup", "gate_lr", "lambda_lr", "momentum", "init_log_alpha", "sublayer")
SENSITIVITY_KEYS = ("fractions", "rule", "batches", "model")
SENSITIVITY_RULES = ("importance", "random")
PRUNE_DEFAULTS = {"steps": 32, "finetune_steps": 16, "warmup": 0.5, "gate_lr": 0.2, "lambda_lr": 0.5,
                  "momentum": 0.0, "init_log_alpha": {"heads": 2.0, "cross_heads": 2.0, "ffn": 2.0, "sublayer": 10.0},
                  "sublayer": True}
SENSITIVITY_DEFAULTS = {"fractions": [0.25, 0.5, 0.75], "rule": "importance", "batches": 4, "model": "student"}


def _fraction(value, where: str, closed: bool = False) -> float:
    """``value`` as a float in [0, 1) (``closed``: [0, 1]); else an error naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0)
    if not ok:
        raise ValueError(f"{where} must be a number in [0, 1{']' if closed else ')'}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class EVLMConfig(BaselinesConfig):
    """The ``evlm`` section of params.yaml: the ``baselines`` keys (``tasks``, subsets and
    training settings in ``train`` / ``task_settings`` -- they drive the teacher's fine-tuning
    and the students' batch size, lr and head lr multiple --, ``weights``, ``overrides``,
    ``features``, ``threads``) plus

    ``teacher`` / ``student``: presets (the student is derived from the pre-trained teacher by
    :func:`~vlkit.tasks.baselines.load_backbone`); ``distill``: :class:`DistillConfig` fields
    (loss weights, temperature); ``prune``: :data:`PRUNE_KEYS` (phase-1 / phase-2 steps, the
    target's warm-up share of phase 1, gate and multiplier learning rates, initial log alpha
    per gate kind, sub-layer gates on/off; defaults :data:`PRUNE_DEFAULTS`); ``target``: the
    sparsity of Tab. 3 / Tab. 4; ``scopes``: the budgets compared (``global`` = modal-adaptive,
    ``per_group`` = uniform); ``seeds`` / ``headline``: the tasks whose student and
    EfficientVLM rows run every seed; ``manual`` / ``manual_task``: Tab. 1 (``[vision, text,
    fusion]`` targets; ``null`` task: skipped); ``sweep`` / ``sweep_task``: Fig. 3;
    ``ablation_tasks``: Tab. 4; ``sensitivity``: Fig. 2 (:data:`SENSITIVITY_KEYS`);
    ``paper_presets`` / ``paper_sparsity``: Tab. 2's paper-size rows; ``latency_benches``:
    the bench files Tab. 2 reads; ``tolerance``: how far the achieved sparsity of a pruned
    model may sit from its target (the notebook asserts it); ``pretrain_kd``: Tab. 4's pre-training distillation
    (:data:`.pretrain_kd.PRETRAIN_KD_KEYS`, :func:`.pretrain_kd.check_pretrain_kd`)."""

    teacher: str = "xvlm-mini"
    student: str = "xvlm-mini-half"
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["shapes_nlvr", "easyvqa"])
    distill: dict = dataclasses.field(default_factory=dict)
    prune: dict = dataclasses.field(default_factory=dict)
    target: float = 0.5
    scopes: list[str] = dataclasses.field(default_factory=lambda: list(SCOPES))
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    headline: list[str] = dataclasses.field(default_factory=lambda: ["shapes_nlvr"])
    manual: list = dataclasses.field(default_factory=lambda: [[0.3, 0.3, 0.3], [0.1, 0.4, 0.4], [0.1, 0.1, 0.6]])
    manual_task: str | None = "shapes_nlvr"
    sweep: list[float] = dataclasses.field(default_factory=lambda: [0.3, 0.5, 0.8])
    sweep_task: str | None = "shapes_nlvr"
    ablation_tasks: list[str] = dataclasses.field(default_factory=lambda: ["shapes_nlvr"])
    sensitivity: dict = dataclasses.field(default_factory=dict)
    paper_presets: list[str] = dataclasses.field(default_factory=lambda: ["xvlm-clip", "xvlm-clip-small"])
    paper_sparsity: float = 0.5
    latency_benches: list[str] = dataclasses.field(default_factory=lambda: ["prune_xvlm"])
    tolerance: float = 0.05
    pretrain_kd: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        from vlkit.models import PRESETS

        for name in (self.teacher, self.student, *self.paper_presets):
            if name not in PRESETS:
                raise UnknownNameError("preset in params.yaml evlm", name, sorted(PRESETS))
        for t in self.tasks:
            if not isinstance(task_spec(t, self), ClassifyTask):
                raise ValueError(f"evlm.tasks: the study distils classification heads (easyvqa, shapes_nlvr); "
                                 f"{t!r} is not one")
        for where, ts in (("headline", self.headline), ("ablation_tasks", self.ablation_tasks),
                          ("manual_task", [self.manual_task] if self.manual_task else []),
                          ("sweep_task", [self.sweep_task] if self.sweep_task else [])):
            for t in ts:
                if t not in self.tasks:
                    raise UnknownNameError(f"evlm.{where} task (must be one of evlm.tasks)", t, self.tasks)
        for s in self.scopes:
            if s not in SCOPES:
                raise UnknownNameError("evlm.scopes budget scope", s, SCOPES)
        if not self.scopes:
            raise ValueError(f"evlm.scopes must name at least one of {SCOPES}")
        for k in self.prune:
            if k not in PRUNE_KEYS:
                raise UnknownNameError("key in params.yaml evlm.prune", k, PRUNE_KEYS)
        for k in self.sensitivity:
            if k not in SENSITIVITY_KEYS:
                raise UnknownNameError("key in params.yaml evlm.sensitivity", k, SENSITIVITY_KEYS)
        p, s = self.prune_options(), self.sensitivity_options()
        for k in ("steps", "finetune_steps"):
            if isinstance(p[k], bool) or not isinstance(p[k], int) or p[k] < (1 if k == "steps" else 0):
                raise ValueError(f"evlm.prune.{k} must be an int >= {1 if k == 'steps' else 0}, got {p[k]!r}")
        _fraction(p["warmup"], "evlm.prune.warmup", closed=True)
        _fraction(p["momentum"], "evlm.prune.momentum")
        for k in ("gate_lr", "lambda_lr"):
            if isinstance(p[k], bool) or not isinstance(p[k], (int, float)) or not (0 < p[k] < math.inf):
                raise ValueError(f"evlm.prune.{k} must be a number > 0, got {p[k]!r}")
        for k in p["init_log_alpha"]:
            if k not in INIT_KEYS:
                raise UnknownNameError("key of evlm.prune.init_log_alpha", k, INIT_KEYS)
        if s["rule"] not in SENSITIVITY_RULES:
            raise UnknownNameError("evlm.sensitivity.rule", s["rule"], SENSITIVITY_RULES)
        if s["model"] not in ("student", "teacher"):
            raise UnknownNameError("evlm.sensitivity.model", s["model"], ["student", "teacher"])
        for f in s["fractions"]:
            _fraction(f, "evlm.sensitivity.fractions entry", closed=True)
        _fraction(self.target, "evlm.target")
        _fraction(self.paper_sparsity, "evlm.paper_sparsity")
        for t in self.sweep:
            _fraction(t, "evlm.sweep entry")
        for m in self.manual:
            if not (isinstance(m, (list, tuple)) and len(m) == len(ENCODERS)):
                raise ValueError(f"evlm.manual entries are [vision, text, fusion] targets; got {m!r}")
            for v in m:
                _fraction(v, f"evlm.manual entry {m!r}")
        if not self.seeds:
            raise ValueError("evlm.seeds must not be empty")
        self.distill_config()  # unknown keys / bad weights raise here, naming them
        self.pretrain_kd_options()
        if not (isinstance(self.tolerance, (int, float)) and 0 < self.tolerance <= 1):
            raise ValueError(f"evlm.tolerance must be in (0, 1], got {self.tolerance!r}")

    def distill_config(self) -> DistillConfig:
        """The task-time distillation weights (:class:`DistillConfig` defaults < ``distill``)."""
        return DistillConfig.from_dict(self.distill)

    def prune_options(self) -> dict:
        """:data:`PRUNE_DEFAULTS` < ``prune`` (``init_log_alpha`` merged per key)."""
        init = {**PRUNE_DEFAULTS["init_log_alpha"], **(self.prune.get("init_log_alpha") or {})}
        return {**PRUNE_DEFAULTS, **self.prune, "init_log_alpha": init}

    def pretrain_kd_options(self) -> dict:
        """Tab. 4's pre-training KD settings (:mod:`.pretrain_kd`): its defaults < ``pretrain_kd``."""
        from .pretrain_kd import check_pretrain_kd

        return check_pretrain_kd(self.pretrain_kd)

    def sensitivity_options(self) -> dict:
        return {**SENSITIVITY_DEFAULTS, **self.sensitivity}


# ============================================================================ accounting
def task_inputs(spec, batch: dict) -> list[dict]:
    """The backbone inputs of each forward pass a batch of ``spec`` needs: one for easy-VQA,
    two for NLVR (the statement with the left image, then with the right one)."""
    if isinstance(spec, NLVRTask):
        return [spec.inputs(batch, "image_feats_left"), spec.inputs(batch, "image_feats_right")]
    if isinstance(spec, ClassifyTask):
        return [spec.inputs(batch)]
    raise ValueError(f"task {spec.name!r}: the EfficientVLM study handles classification tasks only")


def stack_passes(passes: list[dict]) -> dict:
    """The passes of one batch as one forward of ``len(passes) * B`` rows (tensors concatenated
    along the batch): X-VLM runs an NLVR pair this way, so both images of a pair see the same
    draw of the hard-concrete gates."""
    if len(passes) == 1:
        return passes[0]
    keys = list(passes[0])
    if any(list(p) != keys for p in passes):
        raise ValueError(f"the passes of a batch have different inputs: {[sorted(p) for p in passes]}")
    return {k: torch.cat([p[k] for p in passes]) for k in keys}


def _modality(backbone) -> dict[str, str]:
    return {u.name: u.modality for u in backbone.units}


def module_params(backbone) -> dict[str, int]:
    """Parameters per module: ``vision`` / ``text`` / ``fusion`` (:meth:`XVLM.parts`: embeddings
    and norms with their tower, the pooler with fusion), ``other`` (the contrastive
    projections) and ``total`` (= :func:`vlkit.efficiency.params` of the backbone)."""
    from vlkit.efficiency import params

    parts = backbone.parts()
    out = {m: sum(params(mod) for mod in parts.get(m, [])) for m in ENCODERS}
    out["total"] = params(backbone)
    out["other"] = out["total"] - sum(out[m] for m in ENCODERS)
    return out


def module_macs(backbone, inputs: Mapping) -> dict[str, int]:
    """MACs of one forward pass per module: every unit's to its modality, the embedding step's
    to ``vision`` (the cell / patch projection; text embeddings are lookups, no MACs) and the
    pooler's (``finalize``) to ``fusion``; ``total`` is their sum, which equals
    :func:`vlkit.efficiency.macs` of the same call (:func:`~vlkit.efficiency.unit_macs`)."""
    from vlkit.efficiency import unit_macs

    per = unit_macs(backbone, inputs)
    mod = {**_modality(backbone), "embed": "vision", "finalize": "fusion"}
    out = dict.fromkeys(ENCODERS, 0)
    for name, m in per.items():
        if mod[name] not in out:
            raise ValueError(f"unit {name!r} has modality {mod[name]!r}; module_macs knows {ENCODERS}")
        out[mod[name]] += m
    out["total"] = sum(out[m] for m in ENCODERS)
    return out


def module_gmacs(backbone, spec, data) -> dict[str, float]:
    """GMACs per module of one test example of ``spec`` (NLVR: both passes summed)."""
    batch = data.collate(data.examples[:1])
    out = dict.fromkeys((*ENCODERS, "total"), 0)
    for x in task_inputs(spec, batch):
        for k, v in module_macs(backbone, x).items():
            out[k] += v
    return {k: v / 1e9 for k, v in out.items()}


def prunable_params(backbone, units: Sequence[str] | None = None) -> int:
    """Parameters that head / FFN-unit pruning can remove: every weight and bias of the q, k,
    v, o (self- and cross-attention) and fc1 / fc2 Linear layers of ``units`` (default: every
    prunable unit) -- the budget's full size (:meth:`GateSet.prunable_params`)."""
    layers = prunable_units(backbone)
    names = list(layers) if units is None else list(units)
    total = 0
    for n in names:
        for key in unit_keys(layers[n]):
            total += sum(p.numel() for p in sublayer(layers[n], key).parameters())
    return total


def mask_sparsity(backbone, masks: Mapping) -> dict[str, float]:
    """Achieved sparsity of ``masks`` on ``backbone``: removed / prunable parameters
    (:func:`~.prune.removed_params` / :func:`prunable_params`) overall (``all``) and per
    encoder -- exactly what :func:`~.prune.prune` removes, sub-layer gates and output biases
    included."""
    mod = _modality(backbone)
    out = {}
    for m in (*ENCODERS, "all"):
        units = [u for u in prunable_units(backbone) if m == "all" or mod[u] == m]
        full = prunable_params(backbone, units)
        sub = {u: v for u, v in masks.items() if u in units}
        out[m] = removed_params(backbone, sub) / full if full else float("nan")
    return out


def overall_target(backbone, targets: Mapping[str, float]) -> float:
    """The overall sparsity that per-encoder ``targets`` amount to: their mean weighted by each
    encoder's prunable parameters (what :class:`SparsityBudget` reports as the target)."""
    mod = _modality(backbone)
    sizes = {m: prunable_params(backbone, [u for u in prunable_units(backbone) if mod[u] == m]) for m in targets}
    return sum(targets[m] * sizes[m] for m in targets) / sum(sizes.values())


# ============================================================================ training
class CompressModel(nn.Module):
    """What :func:`vlkit.train.fit` trains in one phase: the student and its head, optionally a
    frozen teacher (task-time KD, :class:`.distill.Distiller`) and optionally gates under a
    :class:`~vlkit.nn.lagrangian.SparsityBudget`.

    Loss (:meth:`loss`)::

        KD:     attn * L_attn + hidden * L_hidden + logits * L_logits + task * L_task
        no KD:  L_task
        + budget(step).penalty                   (with gates; Lagrangian, CoFi Eq. 6)

    The passes of a batch (NLVR: the statement with each image) run as one forward of stacked
    rows (:func:`stack_passes`), so the attention and hidden losses average over both and both
    images see one draw of the gates; the logits are the head's output on the pooled vectors
    of all passes (the NLVR pair head sees both). ``step`` (the target's warm-up clock) is the
    number of optimiser steps done; :meth:`callback` advances it (pass it to
    ``fit(callbacks=...)``).
    """

    def __init__(self, spec, student: nn.Module, head: nn.Module, *, teacher: nn.Module | None = None,
                 teacher_head: nn.Module | None = None, distill: DistillConfig | None = None, gates=None,
                 budget=None, seed: int = 0):
        super().__init__()
        self.spec = spec
        self.student, self.head = student, head
        self.distill = distill if distill is not None and distill.kd else None
        self.kd = None
        if self.distill is not None:
            if teacher is None or teacher_head is None:
                raise ValueError("knowledge distillation needs the fine-tuned teacher and its head")
            self.kd = Distiller(student, teacher, self.distill, student_head=head, teacher_head=teacher_head,
                                seed=seed)
        if (gates is None) != (budget is None):
            raise ValueError("pass both gates and budget (pruning) or neither")
        self.gates, self.budget = gates, budget
        self.step = 0

    def callback(self, step: int, record: dict) -> None:
        self.step = int(step)

    def loss(self, batch: dict) -> dict:
        passes = task_inputs(self.spec, batch)
        x, n = stack_passes(passes), len(passes)
        out: dict = {}
        if self.kd is None:
            logits = self.head(*self.student(**x).pooled.chunk(n))
            total = task = F.cross_entropy(logits, batch["labels"])
        else:
            cfg, kd = self.distill, self.kd
            want_attn, want_units = cfg.attn > 0, cfg.hidden > 0
            with torch.no_grad():
                t_out, t_emb, _ = _run(kd.teacher, x, want_attn, want_units)
            s_out, s_emb, masks = _run(kd.student, x, want_attn, want_units)
            attn = kd._attention(s_out, t_out, masks) if want_attn else 0.0
            hidden = kd._hidden(s_out, t_out, s_emb, t_emb, masks) if want_units else 0.0
            s_pooled, t_pooled = s_out.pooled.chunk(n), t_out.pooled.chunk(n)
            logits = self.head(*s_pooled)
            task = F.cross_entropy(logits, batch["labels"])
            total = cfg.task * task if cfg.task > 0 else 0.0
            if want_attn:
                total = total + cfg.attn * attn
                out["attn"] = attn
            if want_units:
                total = total + cfg.hidden * hidden
                out["hidden"] = hidden
            if cfg.logits > 0:
                with torch.no_grad():
                    t_logits = kd.teacher_head(*t_pooled)
                lk = logits_loss(logits, t_logits, cfg.temperature)
                total = total + cfg.logits * lk
                out["logits"] = lk
        out["task"] = task
        out["acc"] = (logits.argmax(-1) == batch["labels"]).float().mean()
        if self.budget is not None:
            term = self.budget(self.step)
            total = total + term.penalty
            out.update(penalty=term.penalty, sparsity=term.expected_sparsity, target=term.target,
                       **{f"s_{k}": v for k, v in term.group_sparsity.items()},
                       **{f"lambda1_{k}": c.lambda_1 for k, c in self.budget.controllers.items()})
        out["loss"] = total
        return out


def compress_loss(model: CompressModel, batch: dict) -> dict:
    """``fit``'s ``loss_fn`` for a :class:`CompressModel`."""
    return model.loss(batch)


def _groups(model: CompressModel, lr: float, head_mult: float, gate_lr: float, lambda_lr: float,
            weight_decay: float, momentum: float = 0.9) -> list[dict]:
    """AdamW groups: student (decay on matrices), head at ``lr * head_mult``, hidden
    projections at ``lr``, log alphas at ``gate_lr`` and multipliers at ``lambda_lr`` (both
    without decay, with Adam's ``beta1 = momentum``)."""
    def split(params, rate):
        ps = [p for p in params if p.requires_grad]
        return [g for g in ({"params": [p for p in ps if p.ndim >= 2], "lr": rate, "weight_decay": weight_decay},
                            {"params": [p for p in ps if p.ndim < 2], "lr": rate, "weight_decay": 0.0})
                if g["params"]]

    groups = split(model.student.parameters(), lr) + split(model.head.parameters(), lr * head_mult)
    if model.kd is not None:
        groups += split(model.kd.projection.parameters(), lr)
    if model.gates is not None:
        betas = (float(momentum), 0.999)
        groups.append({"params": [p for p in model.gates.parameters() if p.requires_grad], "lr": gate_lr,
                       "weight_decay": 0.0, "betas": betas})
        groups.append({"params": list(model.budget.parameters()), "lr": lambda_lr, "weight_decay": 0.0,
                       "betas": betas})
    return [g for g in groups if g["params"]]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One student recipe: ``kd`` (task-time distillation), ``scope`` (``None``: no pruning;
    ``global`` / ``per_group``) and ``target`` (a float, or ``(vision, text, fusion)``
    targets for a manual per-group budget)."""

    kd: bool
    scope: str | None = None
    target: float | tuple = 0.0

    def __post_init__(self):
        if self.scope is not None and self.scope not in SCOPES:
            raise UnknownNameError("budget scope", self.scope, SCOPES)
        if isinstance(self.target, (list, tuple)):
            if self.scope != "per_group" or len(self.target) != len(ENCODERS):
                raise ValueError(f"per-encoder targets {self.target!r} need scope='per_group' and "
                                 f"{len(ENCODERS)} values (vision, text, fusion)")
            object.__setattr__(self, "target", tuple(float(t) for t in self.target))

    @property
    def method(self) -> str:
        """``student`` (fine-tune only), ``kd`` (KD only), ``prune`` (pruning only), ``evlm``."""
        return VARIANTS[int(self.kd) + 2 * int(self.scope is not None)]

    @property
    def label(self) -> str:
        if self.scope is None:
            return {"student": "student (fine-tune only)", "kd": "KD only"}[self.method]
        if isinstance(self.target, tuple):
            how = "manual " + "/".join(f"{t:g}" for t in self.target)
        else:
            how = "modal-adaptive" if self.scope == "global" else "uniform"
        return f"{'EfficientVLM' if self.kd else 'pruning only'} {how}"

    def targets(self) -> float | dict:
        return dict(zip(ENCODERS, self.target)) if isinstance(self.target, tuple) else float(self.target)


# ============================================================================ the study
class Study:
    """Shared state of one study run: the config, profile, data, backbones, fine-tuned
    teachers and every finished run (``runs``: ``{(task, Variant, seed): row}``), so the
    tables reuse each other's runs. ``keep``: models kept in memory (the un-distilled
    students for Fig. 2, the seed-0 pruned students for Tab. 2)."""

    def __init__(self, cfg: EVLMConfig, profile: str | None, *, seed: int = 0,
                 log: Callable[[str], None] = print):
        self.cfg, self.profile, self.seed, self.log = cfg, profile, seed, log
        self._data: dict = {}
        self._base: dict = {}
        self.teachers: dict = {}  # task -> (TaskModel, row)
        self.runs: dict = {}
        self.keep: dict = {}
        self.trajectories: list[dict] = []
        self.timings: list[dict] = []  # wall seconds per run
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))

    # -------------------------------------------------------------- inputs
    def data(self, task: str) -> dict:
        if task not in self._data:
            self._data[task] = load_task_data(task, self.cfg, self.profile)
        return self._data[task]

    def backbones(self):
        """``(teacher, student, pretrained)``: the pre-trained teacher and the student derived
        from it (built once; copies are trained)."""
        if not self._base:
            teacher, pre = load_backbone(self.cfg.teacher, self.cfg)
            student, _ = load_backbone(self.cfg.student, self.cfg, {self.cfg.teacher: teacher})
            self._base.update(teacher=teacher, student=student, pretrained=pre)
        return self._base["teacher"], self._base["student"], self._base["pretrained"]

    def spec(self, task: str):
        return task_spec(task, self.cfg)

    # -------------------------------------------------------------- teacher
    def teacher(self, task: str) -> tuple[TaskModel, dict]:
        """The fine-tuned teacher of ``task`` and its table row (trained once, under ``seed``)."""
        if task not in self.teachers:
            t0 = time.perf_counter()
            spec, data, s = self.spec(task), self.data(task), self.cfg.settings(task)
            base, _, pre = self.backbones()
            tc = train_config_for(s, len(data["train"]), False, self.seed)
            res = finetune(spec, copy.deepcopy(base), "full", data=data, train_config=tc, seed=self.seed,
                           eval_splits=("test",), head_lr_mult=float(s["head_lr_mult"]))
            model = res["model"]
            model.eval()
            row = self._row(task, "teacher", None, self.seed, model.backbone, res["test"], steps=res["steps"])
            row["pretrained"] = pre
            self.teachers[task] = (model, row)
            dt = self._timed(task, "teacher", self.seed, t0)
            self.log(f"teacher  {task:12s}: test {row['test']:6.2f} ({dt:.0f} s)")
        return self.teachers[task]

    # -------------------------------------------------------------- one student run
    def run(self, task: str, variant: Variant, seed: int | None = None, keep: bool = False) -> dict:
        """Train ``variant`` of the student on ``task`` (module docstring) and return its row
        (cached). ``keep``: also keep the final model in ``self.keep[(task, variant, seed)]``."""
        seed = self.seed if seed is None else seed
        key = (task, variant, seed)
        if key in self.runs and (not keep or key in self.keep):
            return self.runs[key]
        t0 = time.perf_counter()
        cfg, spec, data, s = self.cfg, self.spec(task), self.data(task), self.cfg.settings(task)
        p = cfg.prune_options()
        _, base, _ = self.backbones()
        student = copy.deepcopy(base)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = spec.make_head(spec.dims(student, data["train"]))
        teacher, t_head = None, None
        distill = cfg.distill_config() if variant.kd else None
        if variant.kd:
            tm, _ = self.teacher(task)
            teacher, t_head = tm.backbone, tm.head
        gates = budget = None
        bs = min(int(s["batch_size"]), len(data["train"]))
        steps1, steps2 = int(p["steps"]), int(p["finetune_steps"])
        if variant.scope is not None:
            gates = attach_gates(student, init_log_alpha=p["init_log_alpha"], sublayer=bool(p["sublayer"]))
            budget = gates.budget(variant.targets(), warmup_steps=int(round(float(p["warmup"]) * steps1)),
                                  scope=variant.scope)
        from vlkit.train import TrainConfig, fit

        model = CompressModel(spec, student, head, teacher=teacher, teacher_head=t_head, distill=distill,
                              gates=gates, budget=budget, seed=seed)
        tc1 = TrainConfig(steps=steps1, batch_size=bs, lr=float(s["lr"]), seed=seed, schedule="constant",
                          warmup_steps=int(round(0.1 * steps1)), max_grad_norm=1.0, weight_decay=0.01,
                          progress=False, fused=True)
        groups = _groups(model, float(s["lr"]), float(s["head_lr_mult"]), float(p["gate_lr"]),
                         float(p["lambda_lr"]), 0.01, float(p["momentum"]))
        r1 = fit(model, compress_loss, data["train"], config=tc1, collate_fn=data["train"].collate,
                 param_groups=groups, callbacks=[model.callback])
        row_extra: dict = {}
        final = student
        if gates is not None:
            exp_end = r1.history[-1].get("sparsity")  # expected sparsity at the last phase-1 step
            budget.freeze()
            masks = gates.masks()
            gates.detach()
            for rec in r1.history:
                self.trajectories.append({"task": task, "method": variant.method, "scope": variant.scope,
                                          "target": _target_str(variant), "seed": seed, "step": rec["step"],
                                          "t": rec["target"], "sparsity": rec["sparsity"],
                                          **{k: rec[k] for k in rec if k.startswith(("s_", "lambda1_"))},
                                          "penalty": rec["penalty"], "task_loss": rec["task"]})
            achieved = mask_sparsity(student, masks)
            final = prune(student, masks)
            from vlkit.efficiency import params

            row_extra.update({"sparsity": achieved["all"], **{f"sparsity_{m}": achieved[m] for m in ENCODERS},
                              "exp_sparsity": exp_end, "prunable": prunable_params(student),
                              "removed_masks": removed_params(student, masks),
                              "removed_measured": params(student) - params(final),
                              "heads_kept": sum(int(m.sum()) for u in masks.values() for k, m in u.items()
                                                if k != "ffn"),
                              "ffn_kept": sum(int(u["ffn"].sum()) for u in masks.values() if "ffn" in u)})
        else:
            row_extra.update({"sparsity": 0.0, **{f"sparsity_{m}": 0.0 for m in ENCODERS}})
        if steps2 > 0:
            d2 = distill
            if d2 is not None and d2.attn > 0 and _heads_changed(final, base):
                d2 = dataclasses.replace(d2, attn=0.0)
            model2 = CompressModel(spec, final, head, teacher=teacher, teacher_head=t_head,
                                   distill=d2 if d2 is not None and d2.kd else None, seed=seed)
            tc2 = TrainConfig(steps=steps2, batch_size=bs, lr=float(s["lr"]), seed=seed + 7919, schedule="linear",
                              warmup_steps=0, max_grad_norm=1.0, weight_decay=0.01, progress=False, fused=True)
            fit(model2, compress_loss, data["train"], config=tc2, collate_fn=data["train"].collate,
                param_groups=_groups(model2, float(s["lr"]), float(s["head_lr_mult"]), 1.0, 1.0, 0.01))
        final.eval()
        head.eval()
        tm = TaskModel(final, head, "full")
        test = spec.evaluate(tm, data["test"])
        row = self._row(task, variant.label, variant, seed, final, test, steps=steps1 + steps2)
        row.update(row_extra)
        self.runs[key] = row
        if keep:
            self.keep[key] = tm
        dt = self._timed(task, variant.label, seed, t0)
        self.log(f"{variant.label:34s} {task:12s} seed {seed}: test {row['test']:6.2f} sparsity "
                 f"{row['sparsity']:.2f} ({dt:.0f} s)")
        return row

    # -------------------------------------------------------------- rows
    def _timed(self, task: str, method: str, seed: int, t0: float) -> float:
        """Record a run's wall time in ``self.timings`` (kept out of the tables, which must be
        identical across runs of one profile and seed)."""
        dt = time.perf_counter() - t0
        self.timings.append({"task": task, "method": method, "seed": seed, "seconds": round(dt, 1)})
        return dt

    def _row(self, task, method, variant, seed, backbone, test, *, steps) -> dict:
        spec, data = self.spec(task), self.data(task)
        mp, mg = module_params(backbone), module_gmacs(backbone, spec, data["test"])
        row = {"task": task, "method": method, "variant": variant.method if variant else "teacher",
               "kd": bool(variant and variant.kd), "scope": variant.scope if variant else None,
               "target": _target_str(variant) if variant else None,
               "target_all": _target_all(variant, self.backbones()[1]) if variant else None, "seed": seed,
               "test": round(test["score"], 2), "test_se": round(test["se"], 2), "n_test": int(test["n"]),
               "params_M": round(mp["total"] / 1e6, 3),
               **{f"params_{m}_M": round(mp[m] / 1e6, 3) for m in ENCODERS},
               "gmacs": round(mg["total"], 4), **{f"gmacs_{m}": round(mg[m], 4) for m in ENCODERS},
               "steps": steps}
        return row


def _target_str(variant: Variant | None) -> str | None:
    if variant is None or variant.scope is None:
        return None
    t = variant.target
    return "/".join(f"{x:g}" for x in t) if isinstance(t, tuple) else f"{t:g}"


def _target_all(variant: Variant, student) -> float:
    if variant.scope is None:
        return 0.0
    t = variant.targets()
    return round(overall_target(student, t), 4) if isinstance(t, dict) else float(t)


def _heads_changed(model, reference) -> bool:
    """True when some unit of ``model`` has fewer (self- or cross-attention) heads than the
    same unit of ``reference``."""
    a, b = prunable_units(model), prunable_units(reference)
    return any(sublayer(a[n], k).num_heads != sublayer(b[n], k).num_heads
               for n in a for k in unit_keys(a[n]) if k != "ffn")


# ============================================================================ tables
def _seeds(cfg: EVLMConfig, task: str, seed: int) -> list[int]:
    return list(cfg.seeds) if task in cfg.headline else [seed]


def table_3(study: Study) -> pd.DataFrame:
    """Tab. 3 runs (one row per run): per task the fine-tuned teacher, the un-distilled student
    and EfficientVLM under each budget scope at ``target`` (all seeds on headline tasks).
    :func:`summarise` aggregates seeds."""
    cfg, rows = study.cfg, []
    for task in cfg.tasks:
        rows.append(study.teacher(task)[1])
        for sd in _seeds(cfg, task, study.seed):
            rows.append(study.run(task, Variant(kd=False), sd, keep=sd == study.seed))
            for scope in cfg.scopes:
                rows.append(study.run(task, Variant(kd=True, scope=scope, target=cfg.target), sd,
                                      keep=sd == study.seed))
    return _order(pd.DataFrame(rows))


SUMMARY_COLS = ("params_M", "params_vision_M", "params_text_M", "params_fusion_M", "gmacs", "gmacs_vision",
                "gmacs_text", "gmacs_fusion", "sparsity", "sparsity_vision", "sparsity_text", "sparsity_fusion")


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample SD (``ddof=1``; 0 for one seed) of ``test`` over the seeds of each
    (task, method) cell; the mean of the size / sparsity columns; ``seeds``: how many runs."""
    out = []
    for (task, method), g in runs.groupby(["task", "method"], sort=False):
        r = {"task": task, "method": method, "scope": g["scope"].iloc[0], "target": g["target"].iloc[0],
             "test": round(float(g.test.mean()), 2),
             "test_sd": round(seed_sd(g.test), 2),
             "test_se": round(float(g.test_se.mean()), 2), "seeds": len(g)}
        for c in SUMMARY_COLS:
            if c in g:
                v = pd.to_numeric(g[c], errors="coerce").mean()
                r[c] = None if pd.isna(v) else round(float(v), 4)
        out.append(r)
    return pd.DataFrame(out)


def table_1(study: Study) -> pd.DataFrame:
    """Tab. 1: ``manual_task`` with each manual per-encoder target (``per_group`` budgets) and
    modal-adaptive pruning at the same overall sparsity (the mean of their size-weighted
    overall targets, rounded to 0.05 so that a sweep point is reused). Empty when
    ``manual_task`` is null."""
    cfg = study.cfg
    if not cfg.manual_task or not cfg.manual:
        return pd.DataFrame()
    task, rows = cfg.manual_task, []
    _, student, _ = study.backbones()
    overall = []
    for m in cfg.manual:
        v = Variant(kd=True, scope="per_group", target=tuple(m))
        rows.append(study.run(task, v))
        overall.append(overall_target(student, v.targets()))
    t = round(float(np.mean(overall)) * 20) / 20
    rows.append(study.run(task, Variant(kd=True, scope="global", target=t)))
    return _order(pd.DataFrame(rows))


def table_4(study: Study) -> pd.DataFrame:
    """Tab. 4, fine-tuning part: full (KD + pruning) / KD only / pruning only / fine-tune only
    on each of ``ablation_tasks`` (global budget at ``target``; seed ``study.seed``)."""
    cfg, rows = study.cfg, []
    for task in cfg.ablation_tasks:
        for v in (Variant(kd=True, scope="global", target=cfg.target), Variant(kd=True),
                  Variant(kd=False, scope="global", target=cfg.target), Variant(kd=False)):
            rows.append(study.run(task, v))
    return _order(pd.DataFrame(rows))


def sweep(study: Study) -> pd.DataFrame:
    """Fig. 3: ``sweep_task`` at each target of ``sweep`` under each scope of ``scopes``."""
    cfg = study.cfg
    if not cfg.sweep_task:
        return pd.DataFrame()
    rows = [study.run(cfg.sweep_task, Variant(kd=True, scope=scope, target=t)) for t in cfg.sweep
            for scope in cfg.scopes]
    return _order(pd.DataFrame(rows))


def trajectories(study: Study) -> pd.DataFrame:
    """The controller's path: one row per phase-1 step of every pruning run -- ``t`` the
    warmed-up target, ``sparsity`` / ``s_<encoder>`` the expected sparsity over all gates / per
    encoder, ``lambda1_<controller>`` the multipliers, the penalty and the task loss (all as
    logged at that step, before its update); ``target`` is the run's final target."""
    return pd.DataFrame(study.trajectories)


# ============================================================================ Fig. 2
def head_importance(spec, model: TaskModel, data, batches: int, batch_size: int = 32,
                    seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Head importance (Michel, Levy & Neubig 2019, Eq. 2): ``I_h = sum_b |dL_b / dm_h|``, the
    absolute gradient of the task loss w.r.t. a multiplicative mask ``m_h = 1`` on each head's
    output, summed over ``batches`` seeded training batches (eval mode: no dropout). Returns
    ``{unit: {"heads": (H,), ["cross_heads": (H,)]}}``."""
    bb = model.backbone
    layers = prunable_units(bb)
    leaves = {}
    for name, layer in layers.items():
        for key in unit_keys(layer):
            if key != "ffn":
                mod = sublayer(layer, key)
                leaves[(name, key)] = torch.ones(mod.num_heads, requires_grad=True)
                mod.head_mask = leaves[(name, key)]
    total = {k: torch.zeros_like(v) for k, v in leaves.items()}
    was = model.training
    model.eval()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    try:
        for b in range(batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            if len(idx) == 0:
                break
            batch = data.collate([data.examples[int(i)] for i in idx])
            loss = spec.loss(model, batch)["loss"]
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for k, g in zip(leaves, grads):
                if g is not None:
                    total[k] += g.detach().abs()
    finally:
        for (name, key) in leaves:
            sublayer(layers[name], key).head_mask = None
        model.train(was)
    out: dict = {}
    for (name, key), v in total.items():
        out.setdefault(name, {})[key] = v
    return out


def encoder_head_masks(backbone, encoder: str, fraction: float, importance: Mapping | None = None,
                       seed: int = 0) -> dict:
    """Masks dropping ``round(fraction * H)`` heads of every attention sub-layer (self and, in
    fusion units, cross) of the units of one ``encoder`` -- the least important ones by
    ``importance`` (ties: lower index first), or a seeded random choice when it is ``None``.
    FFN units are untouched."""
    if encoder not in ENCODERS:
        raise UnknownNameError("encoder", encoder, ENCODERS)
    _fraction(fraction, "fraction", closed=True)
    mod = _modality(backbone)
    masks = {}
    g = torch.Generator().manual_seed(seed)
    for name, layer in prunable_units(backbone).items():
        if mod[name] != encoder:
            continue
        entry = {}
        for key in unit_keys(layer):
            if key == "ffn":
                continue
            h = sublayer(layer, key).num_heads
            drop = int(round(fraction * h))
            if importance is not None:
                order = torch.argsort(importance[name][key], stable=True)  # least important first
            else:
                order = torch.randperm(h, generator=g)
            keep = torch.ones(h, dtype=torch.bool)
            keep[order[:drop]] = False
            entry[key] = keep
        masks[name] = entry
    return masks


def sensitivity(study: Study) -> pd.DataFrame:
    """Fig. 2: per task, encoder and fraction, the test score of the fine-tuned model
    (``sensitivity.model``) with that fraction of one encoder's heads masked (no retraining),
    and its drop from the unpruned score."""
    from .prune import apply_masks, clear_masks

    cfg, o, rows = study.cfg, study.cfg.sensitivity_options(), []
    for task in cfg.tasks:
        spec, data = study.spec(task), study.data(task)
        if o["model"] == "teacher":
            tm = study.teacher(task)[0]
        else:
            v = Variant(kd=False)
            study.run(task, v, study.seed, keep=True)
            tm = study.keep[(task, v, study.seed)]
        base = spec.evaluate(tm, data["test"])["score"]
        imp = None
        if o["rule"] == "importance":
            imp = head_importance(spec, tm, data["train"], int(o["batches"]),
                                  min(int(cfg.settings(task)["batch_size"]), len(data["train"])), study.seed)
        for enc in ENCODERS:
            for f in o["fractions"]:
                masks = encoder_head_masks(tm.backbone, enc, float(f), imp, seed=study.seed)
                try:
                    apply_masks(tm.backbone, masks)
                    res = spec.evaluate(tm, data["test"])
                finally:
                    clear_masks(tm.backbone)
                dropped = sum(int((~m).sum()) for u in masks.values() for m in u.values())
                total = sum(m.numel() for u in masks.values() for m in u.values())
                rows.append({"task": task, "model": o["model"], "rule": o["rule"], "encoder": enc,
                             "fraction": float(f), "heads_dropped": dropped, "heads": total,
                             "test": round(res["score"], 2), "test_se": round(res["se"], 2),
                             "unpruned": round(base, 2), "drop": round(base - res["score"], 2)})
        study.log(f"sensitivity {task}: done")
    return pd.DataFrame(rows)


# ============================================================================ Tab. 2
def pruned_label(preset: str, sparsity: float) -> str:
    """The Tab. 2 key of ``preset`` pruned uniformly at ``sparsity`` (:func:`~.prune.uniform_masks`),
    e.g. ``"xvlm-clip-small pruned 50%"``: the ``model`` of its rows in the latency bench files
    (``bench/bench_prune_xvlm.py`` writes them under this name)."""
    return f"{preset} pruned {sparsity:.0%}"


def latency_cell(bench: str, device: str, model: str, module: str, results_dir=None):
    """``latency_ms`` of the row ``{"model": model, "module": module}`` of
    ``<bench>.<device>.json`` -- ``"not measured"`` if that device has no file or the file no
    such row."""
    from vlkit.bench_io import NOT_MEASURED, read_bench

    payload = read_bench(bench, device, results_dir)
    if payload is None:
        return NOT_MEASURED
    for r in payload.get("rows", []):
        if r.get("model") == model and r.get("module") == module and "latency_ms" in r:
            return r["latency_ms"]
    return NOT_MEASURED


def _latency_devices(benches: Sequence[str], results_dir=None) -> list[str]:
    """``cpu-2t`` and every GPU device with a file of one of ``benches`` (``gpu`` if none)."""
    from vlkit.bench_io import bench_devices

    found = sorted({d for b in benches for d in bench_devices(b, results_dir)})
    gpus = [d for d in found if not d.startswith("cpu")]
    return ["cpu-2t"] + (gpus or ["gpu"])


def _size_rows(label: str, kind: str, backbone, inputs, latency_key: str, benches, results_dir) -> list[dict]:
    mp, mm = module_params(backbone), module_macs(backbone, inputs)
    rows = []
    devices = _latency_devices(benches, results_dir)
    for module in (*ENCODERS, "total"):
        r = {"kind": kind, "model": label, "module": module, "params_M": round(mp[module] / 1e6, 3),
             "gmacs": round(mm[module] / 1e9, 4)}
        for d in devices:
            cells = [latency_cell(b, d, latency_key, module, results_dir) for b in benches]
            r[f"latency_ms {d}"] = next((c for c in cells if not isinstance(c, str)), cells[0] if cells else None)
        rows.append(r)
    return rows


def table_2(study: Study, results_dir=None) -> pd.DataFrame:
    """Tab. 2: parameters, GMACs and latency per module (module docstring). Mini rows: the
    teacher, the student and the seed-``seed`` pruned students of Tab. 3 (modal-adaptive and
    uniform) kept in ``study.keep``; paper rows: ``paper_presets`` and the last one pruned
    uniformly at ``paper_sparsity``. One (image, text) pass at each model's ``dummy_inputs``."""
    from vlkit.models import build

    cfg = study.cfg
    teacher, student, _ = study.backbones()
    x = student.dummy_inputs(1)
    benches = list(cfg.latency_benches)
    rows = _size_rows(cfg.teacher, "mini", teacher, x, cfg.teacher, benches, results_dir)
    rows += _size_rows(cfg.student, "mini", student, x, cfg.student, benches, results_dir)
    for (task, v, sd), tm in study.keep.items():
        if v.scope is not None and sd == study.seed:
            rows += _size_rows(f"{cfg.student} {v.label} ({task})", "mini", tm.backbone, x, "-", benches, results_dir)
    last = None
    for p in cfg.paper_presets:
        m = build(p, **(cfg.overrides.get(p) or {})).eval()
        rows += _size_rows(p, "paper", m, m.dummy_inputs(1), p, benches, results_dir)
        last = (p, m)
    if last is not None:
        p, m = last
        pruned = prune(m, uniform_masks(m, cfg.paper_sparsity))
        label = pruned_label(p, cfg.paper_sparsity)
        rows += _size_rows(f"{label} (uniform)", "paper", pruned, m.dummy_inputs(1), label, benches, results_dir)
        del pruned, m
    return pd.DataFrame(rows)


# ============================================================================ helpers
def _order(table: pd.DataFrame) -> pd.DataFrame:
    first = ["task", "method", "variant", "kd", "scope", "target", "target_all", "seed", "test", "test_se", "n_test",
             "sparsity", "sparsity_vision", "sparsity_text", "sparsity_fusion", "exp_sparsity", "params_M",
             "params_vision_M", "params_text_M", "params_fusion_M", "gmacs", "gmacs_vision", "gmacs_text",
             "gmacs_fusion"]
    if table.empty:
        return table
    return table[[c for c in first if c in table] + [c for c in table if c not in first]]
