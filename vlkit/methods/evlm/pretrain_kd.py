"""EfficientVLM's task-agnostic (pre-training) distillation, Tab. 4's pre-training half
(Wang et al. 2023, Sec. 3.1 "general distillation"; official ``GeneralDistill.py``).

Before any task, the half-depth student (``xvlm-mini-half``, teacher layers 1, 3, 5 of every
encoder) is distilled from the pre-trained teacher (``xvlm-mini``, frozen) on the
pre-training corpus of :mod:`vlkit.pretrain`; Tab. 4 adds the KD objectives one by one
(attention, + hidden states, + logits) and fine-tunes each student on the task exactly like
the "fine-tune only" variant (:meth:`Study.run` with ``Variant(kd=False)``).

:func:`pretrain_distill` -- ``steps`` optimiser steps of::

    task * (L_ITM + L_MLM [+ L_ITC])          the student's own pre-training loss (PretrainModel)
    + attn * L_attn + hidden * L_hidden + logits * L_logits     (:class:`.distill.Distiller`)

with the ``evlm.distill`` weights, the KD terms not named in ``objectives`` at weight 0, and
``cross_attention=False`` (the official pre-training script distils self-attention maps
only). The KD terms compare both models on the batch's ITM pairs (half matching captions,
half negatives), the pass whose pooled vector the ITM head reads.

Which logits: the official code distils the teacher's pre-training heads' logits (ITM, MLM).
The in-repo teacher checkpoint ``runs/pretrain/xvlm-mini/final`` holds the **backbone only**
(:func:`vlkit.pretrain.export_final`): its ITM / MLM heads were not kept. So the teacher's
ITM head is refitted first: ``head_steps`` steps of the ITM loss on the frozen teacher (a
linear probe, :class:`~vlkit.tasks.heads.ITMHead`, at the pre-training ``lr *
lr_new_mult``), and ``L_logits`` is the KL from that head's match / no-match distribution to
the student's ITM head's (:func:`.distill.logits_loss`). MLM logits are not distilled (a
refitted MLM head would need its own, longer fit). This is a stated departure.

Settings (params.yaml ``evlm.pretrain_kd``, :data:`PRETRAIN_KD_KEYS`): ``steps``,
``objectives`` (a list of objective sets, one table row each), ``batch_size``,
``head_steps``. Corpus, masking, lr and objectives of the student's own loss are the
``pretrain`` section's (for the same profile).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Sequence

import pandas as pd
import torch
from torch import nn

from vlkit.models.protocol import UnknownNameError

from .distill import DistillConfig, Distiller

__all__ = ["KD_OBJECTIVES", "PRETRAIN_KD_KEYS", "PRETRAIN_KD_DEFAULTS", "check_pretrain_kd", "kd_config",
           "PretrainDistiller", "teacher_itm_head", "pretrain_distill", "table_4_pretrain"]

KD_OBJECTIVES = ("attn", "hidden", "logits")
PRETRAIN_KD_KEYS = ("steps", "objectives", "batch_size", "head_steps")
PRETRAIN_KD_DEFAULTS = {"steps": 40, "objectives": [["attn"], ["attn", "hidden"], ["attn", "hidden", "logits"]],
                        "batch_size": 16, "head_steps": 20}


def check_pretrain_kd(section: dict) -> dict:
    """:data:`PRETRAIN_KD_DEFAULTS` < ``section`` (params.yaml ``evlm.pretrain_kd``), checked:
    unknown keys, non-positive counts and unknown objectives raise naming the bad value."""
    for k in section:
        if k not in PRETRAIN_KD_KEYS:
            raise UnknownNameError("key in params.yaml evlm.pretrain_kd", k, PRETRAIN_KD_KEYS)
    o = {**PRETRAIN_KD_DEFAULTS, **section}
    for k, low in (("steps", 1), ("batch_size", 2), ("head_steps", 0)):
        v = o[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"evlm.pretrain_kd.{k} must be an int >= {low}, got {v!r}")
    if not isinstance(o["objectives"], (list, tuple)) or not o["objectives"]:
        raise ValueError(f"evlm.pretrain_kd.objectives must be a non-empty list of objective lists, got "
                         f"{o['objectives']!r}")
    for objs in o["objectives"]:
        if not isinstance(objs, (list, tuple)) or not objs:
            raise ValueError(f"evlm.pretrain_kd.objectives entries are non-empty lists of {KD_OBJECTIVES}, got {objs!r}")
        for x in objs:
            if x not in KD_OBJECTIVES:
                raise UnknownNameError("evlm.pretrain_kd objective", x, KD_OBJECTIVES)
    if "logits" in [x for objs in o["objectives"] for x in objs] and o["head_steps"] < 1:
        raise ValueError("evlm.pretrain_kd: the logits objective needs head_steps >= 1 (the teacher's ITM head is "
                         f"refitted first), got {o['head_steps']!r}")
    return o


def kd_config(base: DistillConfig, objectives: Sequence[str]) -> DistillConfig:
    """``base``'s weights with only ``objectives`` of :data:`KD_OBJECTIVES` on (the others 0)
    and self-attention maps only (``cross_attention=False``, the official pre-training script)."""
    for x in objectives:
        if x not in KD_OBJECTIVES:
            raise UnknownNameError("pre-training KD objective", x, KD_OBJECTIVES)
    return dataclasses.replace(base, cross_attention=False,
                               **{k: (getattr(base, k) if k in objectives else 0.0) for k in KD_OBJECTIVES})


def _itm_inputs(batch: dict) -> dict:
    """The backbone inputs of a pre-training batch's ITM pass."""
    return {"input_ids": batch["itm_ids"], "attention_mask": batch["itm_mask"], "image_feats": batch["image_feats"]}


class PretrainDistiller(nn.Module):
    """The student's :class:`~vlkit.pretrain.PretrainModel` (its own ITM / MLM / ITC heads and
    losses) + a :class:`.distill.Distiller` from the frozen teacher on the ITM pass; the
    student's ITM head is the Distiller's ``student_head``. ``loss(batch)``: the Distiller's
    weighted total (its ``task`` term is the PretrainModel loss) and every part."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig, objectives: Sequence[str],
                 teacher_head: nn.Module | None, itc_temperature: float = 0.07, seed: int = 0):
        super().__init__()
        from vlkit.pretrain import PretrainModel

        self.pm = PretrainModel(student, objectives, itc_temperature, seed=seed)
        if config.logits > 0 and not hasattr(self.pm, "itm_head"):
            raise ValueError(f"the logits objective distils ITM logits; the student's objectives {list(objectives)} "
                             "have no 'itm'")
        self.kd = Distiller(student, teacher, config, student_head=getattr(self.pm, "itm_head", None),
                            teacher_head=teacher_head, inputs_fn=_itm_inputs,
                            task_loss_fn=self._task, seed=seed)
        self._parts: dict = {}

    def _task(self, _s, batch):
        self._parts = self.pm(batch)
        return self._parts["loss"]

    def loss(self, batch: dict) -> dict:
        out = self.kd.loss(batch)
        out.update({f"pre_{k}": v.detach() for k, v in self._parts.items() if k != "loss"})
        self._parts = {}
        return out


def _loss(model: PretrainDistiller, batch: dict) -> dict:
    return model.loss(batch)


def _pretrain_setup(study):
    from vlkit import config
    from vlkit.pretrain import build_corpus

    pcfg = config.resolve("pretrain", study.profile)
    key = ("pretrain_corpus", study.seed)
    if key not in study._data:
        study._data[key] = build_corpus(pcfg, study.profile, "train", study.seed)
    return pcfg, study._data[key]


def teacher_itm_head(teacher: nn.Module, corpus, collate, steps: int, batch_size: int, lr: float,
                     seed: int, itc_temperature: float = 0.07) -> nn.Module:
    """An ITM head fitted for ``steps`` steps on the frozen ``teacher`` (a linear probe: the
    backbone is not updated; module docstring), returned frozen in eval mode."""
    from vlkit.pretrain import PretrainModel, pretrain_loss
    from vlkit.train import TrainConfig, fit

    teacher.requires_grad_(False)
    probe = PretrainModel(teacher, ["itm"], itc_temperature, seed=seed)
    tc = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, schedule="constant", progress=False,
                     fused=True)
    fit(probe, pretrain_loss, corpus, config=tc, collate_fn=collate)
    head = probe.itm_head.eval()
    head.requires_grad_(False)
    return head


def pretrain_distill(study, objectives: Sequence[str], steps: int, seed: int, *, batch_size: int | None = None,
                     head_steps: int | None = None, return_model: bool = False):
    """Pre-training distillation of the study's student (module docstring): a copy of
    ``study.backbones()[1]`` trained ``steps`` steps with the KD terms of ``objectives`` (and
    the student's own pre-training loss at ``distill.task``) from a frozen copy of the
    pre-trained teacher. Returns the student backbone (eval mode; with ``return_model`` the
    :class:`PretrainDistiller` and ``fit``'s result too). Seeded by ``seed``."""
    from vlkit.pretrain import collator_for
    from vlkit.train import TrainConfig, fit

    o = study.cfg.pretrain_kd_options()
    bs = int(batch_size if batch_size is not None else o["batch_size"])
    head_steps = int(o["head_steps"] if head_steps is None else head_steps)
    dcfg = kd_config(study.cfg.distill_config(), objectives)
    pcfg, corpus = _pretrain_setup(study)
    base_t, base_s, _ = study.backbones()
    teacher, student = copy.deepcopy(base_t).eval(), copy.deepcopy(base_s)
    teacher.requires_grad_(False)
    pobj = list(pcfg.objectives.get(study.cfg.teacher, ["itm", "mlm"]))  # the pre-training the student derives from
    vocab = student.text_embeddings.word_embeddings.num_embeddings
    collate = collator_for(corpus, pcfg, vocab, objectives=pobj)
    t_head = None
    if dcfg.logits > 0:
        t_head = teacher_itm_head(teacher, corpus, collate, head_steps, bs, pcfg.lr * pcfg.lr_new_mult, seed,
                                  pcfg.itc_temperature)
    model = PretrainDistiller(student, teacher, dcfg, pobj, t_head, pcfg.itc_temperature, seed=seed)
    tc = TrainConfig(steps=int(steps), batch_size=bs, lr=pcfg.lr, weight_decay=pcfg.weight_decay, seed=seed,
                     max_grad_norm=pcfg.max_grad_norm, schedule="linear",
                     warmup_steps=int(pcfg.warmup_frac * steps), progress=False, fused=True)
    res = fit(model, _loss, corpus, config=tc, collate_fn=collate)
    student.eval()
    return (student, model, res) if return_model else student


def _label(objectives: Sequence[str]) -> str:
    names = {"attn": "attention", "hidden": "hidden", "logits": "logits"}
    return "+ " + " + ".join(names[x] for x in objectives)


def table_4_pretrain(study) -> pd.DataFrame:
    """Tab. 4, pre-training part: the un-distilled student ("no pre-training KD") and one
    student per objective set of ``pretrain_kd.objectives`` (distilled ``pretrain_kd.steps``
    steps), each fine-tuned on ``ablation_tasks[0]`` as ``Variant(kd=False)`` (seed
    ``study.seed``). ``seconds``: pre-training KD + fine-tuning wall time of the row."""
    from .study import Variant

    o = study.cfg.pretrain_kd_options()
    task, v, rows = study.cfg.ablation_tasks[0], Variant(kd=False), []
    t0 = time.perf_counter()
    r = dict(study.run(task, v))
    rows.append({"task": task, "objectives": "no pre-training KD", "pretrain_steps": 0, "test": r["test"],
                 "test_se": r["test_se"], "finetune_steps": r["steps"], "seconds": round(time.perf_counter() - t0, 1)})
    for objs in o["objectives"]:
        t0 = time.perf_counter()
        student = pretrain_distill(study, objs, int(o["steps"]), study.seed)
        sub = copy.copy(study)  # the same data, teachers and config; this student as the base
        sub._base = {**study._base, "student": student}
        sub.runs, sub.keep, sub.trajectories = {}, {}, []
        r = sub.run(task, v)
        rows.append({"task": task, "objectives": _label(objs), "pretrain_steps": int(o["steps"]), "test": r["test"],
                     "test_se": r["test_se"], "finetune_steps": r["steps"],
                     "seconds": round(time.perf_counter() - t0, 1)})
        study.log(f"pre-training KD {_label(objs):32s} {task}: test {r['test']:6.2f} ({rows[-1]['seconds']:.0f} s)")
    return pd.DataFrame(rows)
