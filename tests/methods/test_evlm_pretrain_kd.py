"""EfficientVLM's pre-training (task-agnostic) distillation, Tab. 4's pre-training half
(vlkit.methods.evlm.pretrain_kd), on the ci profile's tiny X-VLM with a 4/4/4 teacher: each
objective set switches on exactly the KD losses it names, the teacher is never updated, the
student starts as the teacher's odd layers, runs are seeded, and the config is checked."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from vlkit import config
from vlkit.methods.evlm import layer_pairs
from vlkit.methods.evlm.distill import DistillConfig
from vlkit.methods.evlm.pretrain_kd import check_pretrain_kd, kd_config, pretrain_distill
from vlkit.methods.evlm.study import Study
from vlkit.models.protocol import UnknownNameError


@pytest.fixture(scope="module")
def study():
    ci = config.resolve("evlm", "ci")
    tiny = dict(ci.overrides["xvlm-mini"], vision_layers=4, text_layers=4, fusion_layers=4)
    cfg = dataclasses.replace(ci, tasks=["shapes_nlvr"], overrides={**ci.overrides, "xvlm-mini": tiny})
    return Study(cfg, "ci", log=lambda m: None)


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_kd_config_keeps_only_the_named_weights():
    base = DistillConfig(attn=0.4, hidden=0.3, logits=0.2, task=0.6, cross_attention=True)
    c = kd_config(base, ["attn", "hidden"])
    assert (c.attn, c.hidden, c.logits, c.task, c.cross_attention) == (0.4, 0.3, 0.0, 0.6, False)
    with pytest.raises(UnknownNameError, match="'task'"):
        kd_config(base, ["task"])


def test_config_errors_name_the_bad_value(study):
    with pytest.raises(UnknownNameError, match="'step'"):
        dataclasses.replace(study.cfg, pretrain_kd={"step": 3})
    with pytest.raises(UnknownNameError, match="'atn'"):
        dataclasses.replace(study.cfg, pretrain_kd={"objectives": [["atn"]]})
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        dataclasses.replace(study.cfg, pretrain_kd={"steps": 0})
    with pytest.raises(ValueError, match="head_steps >= 1"):
        check_pretrain_kd({"head_steps": 0})
    assert check_pretrain_kd({"head_steps": 0, "objectives": [["attn"]]})["head_steps"] == 0


@pytest.mark.parametrize("objectives", [["attn"], ["attn", "hidden"], ["attn", "hidden", "logits"]])
def test_objectives_switch_on_exactly_their_losses(study, objectives):
    teacher, base, _ = study.backbones()
    t0, s0 = _state(teacher), _state(base)
    student, model, res = pretrain_distill(study, objectives, 2, 0, batch_size=4, head_steps=2, return_model=True)
    cfg = model.kd.config
    assert cfg.cross_attention is False  # self-attention maps only, as GeneralDistill.py
    for k in ("attn", "hidden", "logits"):
        assert (getattr(cfg, k) > 0) == (k in objectives), k
        values = [h[k] for h in res.history]
        if k in objectives:
            assert all(v > 0 for v in values), (k, values)
        else:
            assert all(v == 0 for v in values), (k, values)
    assert all(h["task"] > 0 and "pre_itm" in h and "pre_mlm" in h for h in res.history)
    # weighted total = sum of the enabled terms
    h = res.history[-1]
    assert h["loss"] == pytest.approx(sum(getattr(cfg, k) * h[k] for k in ("attn", "hidden", "logits", "task")),
                                      rel=1e-5)
    # the teacher (the study's and the distiller's frozen copy) is not updated; the base student neither
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())
    assert all(torch.equal(v, t0[k]) for k, v in model.kd.teacher.state_dict().items())
    assert not any(p.requires_grad for p in model.kd.teacher.parameters())
    assert all(torch.equal(v, s0[k]) for k, v in base.state_dict().items())
    # ... but the distilled student was
    assert any(not torch.equal(v, s0[k]) for k, v in student.state_dict().items())
    if "logits" in objectives:
        assert not any(p.requires_grad for p in model.kd.teacher_head.parameters())


def test_student_starts_from_the_teachers_odd_layers(study):
    teacher, base, _ = study.backbones()
    student, model, _ = pretrain_distill(study, ["attn"], 1, 0, batch_size=4, return_model=True)
    assert layer_pairs(base, teacher) == [("VEn0", "VEn1"), ("VEn1", "VEn3"), ("LEn0", "LEn1"),
                                          ("LEn1", "LEn3"), ("F0", "F1"), ("F1", "F3")]
    for s, t in layer_pairs(base, teacher):  # the starting point: the teacher's layers 1, 3
        sd, td = base.unit(s).state_dict(), teacher.unit(t).state_dict()
        assert all(torch.equal(sd[k], td[k]) for k in sd), (s, t)
    assert model.kd.pairs == layer_pairs(base, teacher)


def test_pretrain_distill_is_seeded(study):
    a = pretrain_distill(study, ["attn", "hidden", "logits"], 2, 3, batch_size=4, head_steps=2)
    b = pretrain_distill(study, ["attn", "hidden", "logits"], 2, 3, batch_size=4, head_steps=2)
    c = pretrain_distill(study, ["attn", "hidden", "logits"], 2, 4, batch_size=4, head_steps=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_table_rows_fine_tune_alike(study):
    from vlkit.methods.evlm.pretrain_kd import table_4_pretrain

    cfg = dataclasses.replace(study.cfg, pretrain_kd={"steps": 1, "batch_size": 4, "head_steps": 1},
                              prune={**study.cfg.prune, "steps": 2, "finetune_steps": 1})
    st = Study(cfg, "ci", log=lambda m: None)
    t = table_4_pretrain(st)
    assert list(t.objectives) == ["no pre-training KD", "+ attention", "+ attention + hidden",
                                  "+ attention + hidden + logits"]
    assert list(t.pretrain_steps) == [0, 1, 1, 1] and set(t.finetune_steps) == {3}
    assert set(t.task) == {cfg.ablation_tasks[0]}
    assert {"test", "test_se", "seconds"} <= set(t.columns)
