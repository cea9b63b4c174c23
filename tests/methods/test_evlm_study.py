"""The EfficientVLM study: per-module accounting (params and GMACs add up to the totals, the
prunable count equals the gates' full size, mask sparsity and overall targets by hand), the
variants and the config's checks, head-sensitivity masks, the latency cells, and -- on the ci
profile's tiny X-VLM and a 4-layer teacher -- the student layer map, the warm-up clock of the
budget, and the sparsity the global and the per-encoder budgets actually reach."""

from __future__ import annotations

import copy
import dataclasses
import json

import pandas as pd
import pytest
import torch

from vlkit import config
from vlkit.efficiency import macs, params
from vlkit.methods.evlm import attach_gates, layer_pairs, prune, removed_params
from vlkit.methods.evlm.study import (ENCODERS, CompressModel, Study, Variant, _heads_changed, encoder_head_masks,
                                      latency_cell, mask_sparsity, module_macs, module_params, overall_target,
                                      prunable_params, summarise, task_inputs, uniform_masks)
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError

# vision width 24 != text width 32: the fusion cross-attention's k/v read width 24
XVLM = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=40, vision_layers=2,
            vocab_size=99, text_dim=32, text_heads=4, text_ffn_dim=48, text_layers=2, fusion_layers=2,
            max_positions=20, bos_token_id=2, eos_token_id=3, embed_dim=16, text_len=7)


@pytest.fixture(scope="module")
def xvlm():
    return build("xvlm-clip", **XVLM).eval()


# ---------------------------------------------------------------------------- accounting
def test_module_macs_add_up_to_the_counter(xvlm):
    x = xvlm.dummy_inputs(2)
    mm = module_macs(xvlm, x)
    assert sum(mm[m] for m in ENCODERS) == mm["total"] == macs(xvlm, x)
    # the fusion encoder: 2 units of self + cross attention + FFN (7 text tokens, 5 image tokens) + the pooler
    n, m, d, dv = 7, 5, 32, 24
    unit = 4 * n * d * d + 2 * n * n * d + 2 * n * d * 48 + 2 * n * d * d + 2 * m * dv * d + 2 * n * m * d
    assert mm["fusion"] == 2 * (2 * unit + d * d)  # batch 2; the pooler: one dense layer on [CLS]


def test_module_params_partition_the_model(xvlm):
    mp = module_params(xvlm)
    assert mp["vision"] + mp["text"] + mp["fusion"] + mp["other"] == mp["total"] == params(xvlm)
    assert mp["other"] == params(xvlm.vision_proj) + params(xvlm.text_proj)
    pruned = prune(xvlm, uniform_masks(xvlm, 0.5))
    after = module_params(pruned)
    assert after["total"] == mp["total"] - removed_params(xvlm, uniform_masks(xvlm, 0.5))
    assert all(after[m] < mp[m] for m in ENCODERS)


def test_prunable_params_is_the_gates_full_size(xvlm):
    m = copy.deepcopy(xvlm)
    gates = attach_gates(m)
    assert prunable_params(m) == gates.prunable_params() == gates.budget(0.5).full_size()
    gates.detach()


def test_mask_sparsity_by_hand(xvlm):
    d, f = 24, 40  # vision units: width 24, 4 heads of 6, FFN 40
    unit = 4 * d * d + 4 * d + 2 * d * f + f + d  # q/k/v/o with biases + fc1/fc2 with biases
    head = 6 * (3 * d + d) + 3 * 6  # rows of q, k, v (+ biases), columns of o
    masks = {"VEn0": {"heads": torch.tensor([True, False, True, True])},
             "VEn1": {"ffn": torch.zeros(f, dtype=torch.bool)}}  # a whole FFN: its output bias goes too
    s = mask_sparsity(xvlm, masks)
    assert s["vision"] == pytest.approx((head + 2 * d * f + f + d) / (2 * unit))
    assert s["text"] == s["fusion"] == 0.0
    assert s["all"] == pytest.approx((head + 2 * d * f + f + d) / prunable_params(xvlm))


def test_overall_target_is_size_weighted(xvlm):
    mod = {u.name: u.modality for u in xvlm.units}
    size = {e: prunable_params(xvlm, [u for u in mod if mod[u] == e]) for e in ENCODERS}
    t = {"vision": 0.1, "text": 0.1, "fusion": 0.6}
    assert overall_target(xvlm, t) == pytest.approx(sum(t[e] * size[e] for e in ENCODERS) / sum(size.values()))
    assert overall_target(xvlm, dict.fromkeys(ENCODERS, 0.3)) == pytest.approx(0.3)


def test_uniform_masks_keep_the_first_share(xvlm):
    masks = uniform_masks(xvlm, 0.5)
    assert masks["F0"]["cross_heads"].tolist() == [True, True, False, False]
    assert int(masks["VEn0"]["ffn"].sum()) == 20 and int(masks["LEn1"]["ffn"].sum()) == 24
    with pytest.raises(ValueError, match="1.0"):
        uniform_masks(xvlm, 1.0)


def test_heads_changed(xvlm):
    only_ffn = {u: {"ffn": m["ffn"]} for u, m in uniform_masks(xvlm, 0.5).items()}
    assert not _heads_changed(prune(xvlm, only_ffn), xvlm)
    assert _heads_changed(prune(xvlm, {"F1": {"cross_heads": torch.tensor([1, 1, 1, 0])}}), xvlm)


# ---------------------------------------------------------------------------- Fig. 2 masks
def test_encoder_head_masks_drop_the_least_important(xvlm):
    imp = {u.name: {"heads": torch.tensor([0.3, 0.1, 0.2, 0.9]), "cross_heads": torch.tensor([5., 4., 3., 2.])}
           for u in xvlm.units}
    m = encoder_head_masks(xvlm, "fusion", 0.5, imp)
    assert set(m) == {"F0", "F1"}  # one encoder only, FFN untouched
    assert m["F0"]["heads"].tolist() == [True, False, False, True]
    assert m["F0"]["cross_heads"].tolist() == [True, True, False, False]
    assert encoder_head_masks(xvlm, "vision", 0.25, imp)["VEn1"]["heads"].tolist() == [True, False, True, True]
    r1, r2 = (encoder_head_masks(xvlm, "text", 0.5, None, seed=3) for _ in range(2))
    assert all((r1[u]["heads"] == r2[u]["heads"]).all() and int(r1[u]["heads"].sum()) == 2 for u in r1)
    assert not any(encoder_head_masks(xvlm, "text", 1.0)["LEn0"]["heads"])
    with pytest.raises(UnknownNameError, match="'audio'"):
        encoder_head_masks(xvlm, "audio", 0.5)


# ---------------------------------------------------------------------------- variants, config
def test_variants():
    assert [Variant(kd=k, scope=s).method for k, s in ((False, None), (True, None), (False, "global"),
                                                       (True, "global"))] == ["student", "kd", "prune", "evlm"]
    assert Variant(kd=True, scope="global", target=0.5).label == "EfficientVLM modal-adaptive"
    assert Variant(kd=True, scope="per_group", target=0.5).label == "EfficientVLM uniform"
    v = Variant(kd=True, scope="per_group", target=[0.1, 0.4, 0.4])
    assert v.targets() == {"vision": 0.1, "text": 0.4, "fusion": 0.4} and v.label.endswith("0.1/0.4/0.4")
    with pytest.raises(ValueError, match="per_group"):
        Variant(kd=True, scope="global", target=(0.1, 0.4, 0.4))
    with pytest.raises(UnknownNameError, match="'local'"):
        Variant(kd=True, scope="local", target=0.5)


def test_summarise_mean_and_sd():
    runs = pd.DataFrame([{"task": "t", "method": "m", "scope": "global", "target": "0.5", "test": x, "test_se": 2.0,
                          "sparsity": s} for x, s in ((70.0, 0.5), (74.0, 0.52), (72.0, 0.48))])
    r = summarise(runs).iloc[0]
    assert (r.test, r.test_sd, r.seeds, r.sparsity) == (72.0, 2.0, 3, 0.5)


@pytest.fixture(scope="module")
def ci_cfg():
    return config.resolve("evlm", "ci")


def test_config_errors_name_the_bad_value(ci_cfg):
    with pytest.raises(UnknownNameError, match="'step'"):
        dataclasses.replace(ci_cfg, prune={"step": 3})
    with pytest.raises(ValueError, match=r"\[vision, text, fusion\]"):
        dataclasses.replace(ci_cfg, manual=[[0.1, 0.9]])
    with pytest.raises(ValueError, match="1.0"):
        dataclasses.replace(ci_cfg, target=1.0)
    with pytest.raises(ValueError, match="classification"):
        dataclasses.replace(ci_cfg, tasks=["shapes_retrieval"], headline=[], ablation_tasks=[], manual_task=None,
                            sweep_task=None)
    with pytest.raises(UnknownNameError, match="'bbc_news'"):
        dataclasses.replace(ci_cfg, headline=["bbc_news"])
    with pytest.raises(UnknownNameError, match="'gradient'"):
        dataclasses.replace(ci_cfg, sensitivity={"rule": "gradient"})
    with pytest.raises(ValueError, match="'atn'"):
        dataclasses.replace(ci_cfg, distill={"atn": 1.0})
    with pytest.raises(UnknownNameError, match="'uniform'"):
        dataclasses.replace(ci_cfg, scopes=["uniform"])


# ---------------------------------------------------------------------------- latency cells
def test_latency_cell_reads_rows_or_says_not_measured(tmp_path):
    assert latency_cell("prune_xvlm", "h100", "xvlm-clip", "vision", tmp_path) == "not measured"
    rows = [{"model": "xvlm-clip", "module": "vision", "latency_ms": 12.5}]
    (tmp_path / "prune_xvlm.h100.json").write_text(json.dumps({"rows": rows}))
    assert latency_cell("prune_xvlm", "h100", "xvlm-clip", "vision", tmp_path) == 12.5
    assert latency_cell("prune_xvlm", "h100", "xvlm-clip", "fusion", tmp_path) == "not measured"


# ---------------------------------------------------------------------------- the ci study
@pytest.fixture(scope="module")
def study(ci_cfg):
    """The ci study on one task, with a 4/4/4 teacher so the student (2/2/2) has a real map."""
    tiny = dict(ci_cfg.overrides["xvlm-mini"], vision_layers=4, text_layers=4, fusion_layers=4)
    cfg = dataclasses.replace(ci_cfg, tasks=["shapes_nlvr"], overrides={**ci_cfg.overrides, "xvlm-mini": tiny},
                              prune={**ci_cfg.prune, "steps": 30, "finetune_steps": 1})
    return Study(cfg, "ci", log=lambda m: None)


def test_student_is_the_teachers_odd_layers(study):
    teacher, student, _ = study.backbones()
    assert student.unit_names == ["VEn0", "VEn1", "LEn0", "LEn1", "F0", "F1"]
    assert layer_pairs(student, teacher) == [("VEn0", "VEn1"), ("VEn1", "VEn3"), ("LEn0", "LEn1"),
                                             ("LEn1", "LEn3"), ("F0", "F1"), ("F1", "F3")]
    for s, t in layer_pairs(student, teacher):
        sd, td = student.unit(s).state_dict(), teacher.unit(t).state_dict()
        assert all(torch.equal(sd[k], td[k]) for k in sd), (s, t)


def test_budget_clock_and_kd_losses(study):
    spec, data = study.spec("shapes_nlvr"), study.data("shapes_nlvr")
    tm, _ = study.teacher("shapes_nlvr")
    _, base, _ = study.backbones()
    student = copy.deepcopy(base)
    head = spec.make_head(spec.dims(student, data["train"]))
    gates = attach_gates(student)
    budget = gates.budget(0.5, warmup_steps=4)
    model = CompressModel(spec, student, head, teacher=tm.backbone, teacher_head=tm.head,
                          distill=study.cfg.distill_config(), gates=gates, budget=budget).train()
    batch = data["train"].collate(data["train"].examples[:4])
    assert len(task_inputs(spec, batch)) == 2  # NLVR: two passes
    out = model.loss(batch)
    assert out["target"] == 0.0 and out["attn"] > 0 and out["hidden"] > 0 and out["logits"] >= 0
    model.callback(2, {})
    assert model.loss(batch)["target"] == pytest.approx(0.25)  # target warmed up linearly over 4 steps
    model.callback(9, {})
    assert model.loss(batch)["target"] == pytest.approx(0.5)
    assert not any(p.requires_grad for p in tm.backbone.parameters())  # the teacher stays frozen
    gates.detach()


def test_stacked_pair_loss_equals_the_task_loss(study):
    """NLVR's two passes run as one stacked forward: the same loss as the task's two calls."""
    from vlkit.tasks.runner import TaskModel

    spec, data = study.spec("shapes_nlvr"), study.data("shapes_nlvr")
    student = copy.deepcopy(study.backbones()[1])
    head = spec.make_head(spec.dims(student, data["train"]))
    batch = data["train"].collate(data["train"].examples[:5])
    with torch.no_grad():
        ours = CompressModel(spec, student, head).eval().loss(batch)["loss"]
        theirs = spec.loss(TaskModel(student, head).eval(), batch)["loss"]
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("scope,target", [("global", 0.5), ("per_group", 0.5), ("per_group", (0.1, 0.1, 0.6))])
def test_budgets_reach_their_targets(study, scope, target):
    row = study.run("shapes_nlvr", Variant(kd=True, scope=scope, target=target))
    assert row["removed_masks"] == row["removed_measured"] > 0
    assert abs(row["sparsity"] - row["target_all"]) <= study.cfg.tolerance
    if scope == "per_group":  # each encoder held to its own target
        goals = target if isinstance(target, tuple) else (target,) * 3
        for m, t in zip(ENCODERS, goals):
            assert abs(row[f"sparsity_{m}"] - t) <= 2 * study.cfg.tolerance, (m, row[f"sparsity_{m}"])
    dense = study.run("shapes_nlvr", Variant(kd=False))
    assert row["gmacs"] < dense["gmacs"] and row["params_M"] < dense["params_M"]
    assert dense["sparsity"] == 0.0 and dense["params_M"] == round(params(study.backbones()[1]) / 1e6, 3)


def test_runs_are_seeded(study):
    v = Variant(kd=False, scope="global", target=0.5)
    a = dict(study.run("shapes_nlvr", v, seed=5))
    study.runs.pop(("shapes_nlvr", v, 5))
    b = study.run("shapes_nlvr", v, seed=5)
    assert a == b


def test_gate_set_moves_like_a_module(xvlm):
    m = copy.deepcopy(xvlm)
    gates = attach_gates(m)
    gates.to(torch.float64)  # nn.Module._apply must not be shadowed by the hook helper
    assert gates.gates["F0"]["heads"].log_alpha.dtype == torch.float64
    gates.detach()
