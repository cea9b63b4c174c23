"""EfficientVLM distillation: layer pairing (2i+1, last to last) and its errors, each loss on a
hand-worked example, exact zeros for a student that *is* the teacher's odd layers, gradients
to the student only, padding that changes nothing, config validation, and a few fit() steps.

Tiny X-VLM configurations: teacher vision/text/fusion 4/2/2, student 2/1/1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.methods.evlm.distill import (DistillConfig, Distiller, HiddenProjection, attention_loss, distill_loss,
                                        embed_key, hidden_loss, layer_pairs, logits_loss)
from vlkit.models.meter import build_meter_clip16_roberta
from vlkit.models.towers import init_bert_style
from vlkit.models.xvlm import build_xvlm_clip, student_unit_map
from vlkit.tasks.heads import ClassifierHead

TINY = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=48, vocab_size=99,
            text_dim=32, text_heads=4, text_ffn_dim=64, max_positions=20, bos_token_id=2, eos_token_id=3,
            embed_dim=16, text_len=7)
TEACHER = dict(vision_layers=4, text_layers=2, fusion_layers=2)
STUDENT = dict(vision_layers=2, text_layers=1, fusion_layers=1)
NUM_CLASSES = 3


def tiny(seed: int = 0, **kw):
    """Tiny X-VLM with weights re-drawn at std 0.3 (BERT's 0.02 makes tiny layers near-identities)."""
    model = build_xvlm_clip(**{**TINY, "seed": seed, **kw}).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init_bert_style(model, std=0.3)
    return model


class Identity(nn.Module):
    def forward(self, x, ctx=None):
        return x


def copy_paired(student, teacher) -> None:
    """Load into ``student`` the teacher's weights, each student unit from its paired teacher
    unit (EfficientVLM initialises the student this way)."""
    pairs, sd = dict(layer_pairs(student, teacher)), teacher.state_dict()
    new = {}
    for key in student.state_dict():
        if key.startswith("blocks."):
            unit = key.split(".")[1]
            key_t = f"blocks.{pairs[unit]}{key[len('blocks.') + len(unit):]}"
        else:
            key_t = key
        new[key] = sd[key_t]
    student.load_state_dict(new)


def batch_of(model, n: int = 3, seed: int = 0) -> dict:
    """Inputs with padding in rows 1 and 2, plus labels."""
    inputs = model.dummy_inputs(n)
    inputs["input_ids"][1, -2:] = model.config.pad_token_id
    inputs["attention_mask"][1, -2:] = 0
    inputs["input_ids"][2, -3:] = model.config.pad_token_id
    inputs["attention_mask"][2, -3:] = 0
    g = torch.Generator().manual_seed(seed)
    inputs["labels"] = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return inputs


def head(dim: int, seed: int) -> ClassifierHead:
    torch.manual_seed(seed)
    return ClassifierHead(dim, NUM_CLASSES)


def ce(logits, batch):
    return F.cross_entropy(logits, batch["labels"])


# ============================================================================ layer map
def test_layer_pairs_are_2i_plus_1_last_to_last():
    teacher, student = tiny(**TEACHER), tiny(1, **STUDENT)
    pairs = layer_pairs(student, teacher)
    assert pairs == [("VEn0", "VEn1"), ("VEn1", "VEn3"), ("LEn0", "LEn1"), ("F0", "F1")]
    assert dict(pairs) == student_unit_map(student, teacher)
    deeper = tiny(vision_layers=6, text_layers=4, fusion_layers=2)
    mid = tiny(1, vision_layers=3, text_layers=2, fusion_layers=1)
    assert layer_pairs(mid, deeper) == [("VEn0", "VEn1"), ("VEn1", "VEn3"), ("VEn2", "VEn5"),
                                        ("LEn0", "LEn1"), ("LEn1", "LEn3"), ("F0", "F1")]


@pytest.mark.parametrize("student_layers, match", [
    (dict(vision_layers=2, text_layers=1, fusion_layers=2), r"fusion encoder: student has 2 layers and teacher 2"),
    (dict(vision_layers=3, text_layers=1, fusion_layers=1), r"vision encoder: student has 3 layers and teacher 4"),
    (dict(vision_layers=2, text_layers=1, fusion_layers=0), r"fusion: student has 0 layers, teacher has 2"),
])
def test_layer_pairs_misfit_names_encoder_and_counts(student_layers, match):
    teacher, student = tiny(**TEACHER), tiny(1, **student_layers)
    with pytest.raises(ValueError, match=match):
        layer_pairs(student, teacher)
    with pytest.raises(ValueError, match=match):
        Distiller(student, teacher, DistillConfig(logits=0, task=0))


def test_layer_pairs_split_co_attention_by_stream():
    """METER's fusion units FL0, FV0, FL1, FV1 are two interleaved encoders: FL pairs with FL."""
    kw = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=48, text_dim=40,
              text_heads=4, text_ffn_dim=80, vocab_size=99, max_positions=20, hidden_dim=32, fusion_heads=4,
              fusion_ffn_dim=64, text_len=7)
    teacher = build_meter_clip16_roberta(**kw, vision_layers=2, text_layers=2, fusion_layers=2)
    student = build_meter_clip16_roberta(**kw, vision_layers=1, text_layers=1, fusion_layers=1)
    assert layer_pairs(student, teacher) == [("VEn0", "VEn1"), ("LEn0", "LEn1"), ("FL0", "FL1"), ("FV0", "FV1")]


# ============================================================================ the losses by hand
def test_attention_loss_hand_worked():
    # B=1, H=2, N=2 query rows, M=2 keys
    s = torch.tensor([[[[0.5, 0.5], [1.0, 0.0]], [[0.2, 0.8], [0.0, 1.0]]]])
    t = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.2, 0.8], [1.0, 0.0]]]])
    # row errors (summed over keys): head0 = [0.5, 0], head1 = [0, 2]
    assert attention_loss(s, t).item() == pytest.approx(2.5 / 4)  # / (H * N)
    assert attention_loss(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(0.5 / 2)  # row 0 only
    assert attention_loss(s, t, torch.tensor([[0, 1]])).item() == pytest.approx(2.0 / 2)  # row 1 only
    # = the official MSELoss()(s, t) * M when nothing is masked
    assert attention_loss(s, t).item() == pytest.approx(F.mse_loss(s, t).item() * 2)
    with pytest.raises(ValueError, match=r"student \(1, 2, 2, 2\), teacher \(1, 1, 2, 2\)"):
        attention_loss(s, t[:, :1])
    with pytest.raises(ValueError, match="keeps no query row"):
        attention_loss(s, t, torch.tensor([[0, 0]]))


def test_hidden_loss_hand_worked():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # B=1, N=2, D=2
    t = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # squared errors: token 0: 0 + 4 = 4, token 1: 9 + 16 = 25
    assert hidden_loss(s, t).item() == pytest.approx(29 / 4)
    assert hidden_loss(s, t, mask=torch.tensor([[1, 0]])).item() == pytest.approx(4 / 2)
    # width 2 -> 3 through W_h = [[1, 0], [0, 1], [1, 1]], b = 0: s -> [[1, 2, 3], [3, 4, 7]]
    proj = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    t3 = torch.tensor([[[1.0, 2.0, 0.0], [3.0, 4.0, 7.0]]])
    assert hidden_loss(s, t3, proj).item() == pytest.approx(9 / 6)
    assert hidden_loss(s, t3, proj, torch.tensor([[0, 1]])).item() == 0.0
    with pytest.raises(ValueError, match="widths differ: pass a projection"):
        hidden_loss(s, t3)


def test_logits_loss_hand_worked():
    s = torch.tensor([[0.0, 0.0]])  # p_s = (1/2, 1/2)
    t = torch.tensor([[math.log(3.0), 0.0]])  # p_t = (3/4, 1/4)
    # KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120
    assert logits_loss(s, t).item() == pytest.approx(0.1308120, abs=1e-6)
    # T = 2: p_t = (sqrt3, 1) / (sqrt3 + 1) = (0.6339746, 0.3660254); KL = 0.0363408; x T^2 = 0.1453631
    assert logits_loss(s, t, temperature=2.0).item() == pytest.approx(0.1453631, abs=1e-6)
    # batchmean over rows; a second, identical row leaves the mean; an agreeing row halves it
    assert logits_loss(s.repeat(2, 1), t.repeat(2, 1)).item() == pytest.approx(0.1308120, abs=1e-6)
    both = logits_loss(torch.cat([s, t]), torch.cat([t, t]))
    assert both.item() == pytest.approx(0.1308120 / 2, abs=1e-6)
    assert logits_loss(torch.cat([s, t]), torch.cat([t, t]), mask=torch.tensor([True, False])).item() == \
        pytest.approx(0.1308120, abs=1e-6)
    # the direction is KL(teacher || student), not the reverse: KL(p_s || p_t) = 0.1438410
    assert logits_loss(t, s).item() == pytest.approx(0.1438410, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        logits_loss(s, t, temperature=0.0)


# ============================================================================ the distiller
@pytest.fixture(scope="module")
def twins():
    """(student, teacher, teacher with identities at its unpaired layers): the student is the
    teacher's odd layers, so it computes exactly what the identity teacher computes."""
    teacher = tiny(**TEACHER)
    student = tiny(1, **STUDENT)
    copy_paired(student, teacher)
    ident = tiny(**TEACHER)
    for name in ("VEn0", "VEn2", "LEn0", "F0"):
        ident.replace_unit(name, Identity())
    return student, teacher, ident


def test_losses_exactly_zero_for_the_teachers_own_layers(twins):
    student, teacher, ident = twins
    s_head, t_head = head(32, 0), head(32, 5)
    s_head.load_state_dict(t_head.state_dict())
    batch = batch_of(teacher)
    for cross in (True, False):
        cfg = DistillConfig(attn=1, hidden=1, logits=1, task=0, cross_attention=cross)
        out = Distiller(student, ident, cfg, s_head, t_head).loss(batch)
        assert {k: out[k].item() for k in ("loss", "attn", "hidden", "logits")} == \
            {"loss": 0.0, "attn": 0.0, "hidden": 0.0, "logits": 0.0}
    # the same student against the full teacher (whose even layers do work) is far from zero
    out = Distiller(student, teacher, cfg, s_head, t_head).loss(batch)
    assert all(out[k].item() > 1e-3 for k in ("attn", "hidden", "logits"))
    # the identity teacher gives no attention maps at its unpaired units: only pairs are read
    assert Distiller(student, ident, DistillConfig(logits=0, task=0)).pairs == [("VEn0", "VEn1"), ("VEn1", "VEn3"), ("LEn0", "LEn1"),
                                                    ("F0", "F1")]


def test_total_is_the_weighted_sum_and_cross_attention_counts(twins):
    student, teacher, _ = twins
    s_head, t_head, batch = head(32, 1), head(32, 2), batch_of(teacher)
    w = DistillConfig(attn=0.3, hidden=2.0, logits=0.7, task=1.5, temperature=2.0)
    d = Distiller(student, teacher, w, s_head, t_head, task_loss_fn=ce)
    out = d.loss(batch)
    expect = 0.3 * out["attn"] + 2.0 * out["hidden"] + 0.7 * out["logits"] + 1.5 * out["task"]
    torch.testing.assert_close(out["loss"], expect)
    with torch.no_grad():
        s_logits = s_head(student(**d.inputs(batch)).pooled)
        t_logits = t_head(teacher(**d.inputs(batch)).pooled)
    torch.testing.assert_close(out["task"], F.cross_entropy(s_logits, batch["labels"]))
    torch.testing.assert_close(out["logits"], logits_loss(s_logits, t_logits, 2.0))
    # leaving out the fusion unit's cross-attention map removes exactly its term
    no_cross = Distiller(student, teacher, DistillConfig(attn=1, hidden=0, logits=0, task=0, cross_attention=False))
    s_o = student(output_attentions=True, **d.inputs(batch))
    t_o = teacher(output_attentions=True, **d.inputs(batch))
    cross_term = attention_loss(s_o.attentions["F0"][1], t_o.attentions["F1"][1], batch["attention_mask"])
    assert cross_term.item() > 0
    torch.testing.assert_close(out["attn"] - no_cross.loss(batch)["attn"], cross_term)


def test_gradients_reach_the_student_and_projections_only():
    teacher = tiny(**TEACHER)
    student = tiny(1, **STUDENT, text_dim=16, text_ffn_dim=32)  # text width 16 vs 32: projected
    s_head, t_head = head(16, 0), head(32, 1)
    d = Distiller(student, teacher, DistillConfig(), s_head, t_head, task_loss_fn=ce)
    assert set(d.projection.widths) == {"VEn0", "VEn1", "LEn0", "F0", embed_key("text"), embed_key("vision")}
    assert {k: tuple(v) for k, v in d.projection.widths.items() if v[0] != v[1]} == \
        {"LEn0": (16, 32), "F0": (16, 32), embed_key("text"): (16, 32)}
    assert d.projection.get("VEn0") is None and isinstance(d.projection.get("F0"), nn.Linear)
    d.train()
    assert not teacher.training and not t_head.training and student.training
    d.loss(batch_of(teacher))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None and not p.requires_grad for p in t_head.parameters())
    for name in student.unit_names:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.unit(name).parameters()), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.projection.parameters())
    trainable = {id(p) for p in d.parameters() if p.requires_grad}
    assert trainable == {id(p) for m in (student, s_head, d.projection) for p in m.parameters()}


def test_padded_positions_change_nothing(twins):
    student, teacher, _ = twins
    d = Distiller(student, teacher, DistillConfig(attn=1, hidden=1, logits=0, task=0))
    batch = batch_of(teacher)
    other = {k: v.clone() for k, v in batch.items()}
    pad = other["attention_mask"] == 0
    other["input_ids"][pad] = 50 + torch.arange(int(pad.sum()))  # new tokens under the padding
    a, b = d.loss(batch), d.loss(other)
    for k in ("attn", "hidden"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # ... while the padded rows themselves did change: unmasked, the losses would move
    s1 = student(output_units=True, output_attentions=True, **d.inputs(batch))
    s2 = student(output_units=True, output_attentions=True, **d.inputs(other))
    assert (s1.unit_outputs["LEn0"] - s2.unit_outputs["LEn0"]).abs().max() > 1e-3
    t1 = teacher(output_units=True, output_attentions=True, **d.inputs(batch))
    assert abs(hidden_loss(s1.unit_outputs["F0"], t1.unit_outputs["F1"]).item()
               - hidden_loss(s2.unit_outputs["F0"], t1.unit_outputs["F1"]).item()) > 1e-4
    assert abs(attention_loss(s1.attentions["LEn0"][0], t1.attentions["LEn1"][0]).item()
               - attention_loss(s2.attentions["LEn0"][0], t1.attentions["LEn1"][0]).item()) > 1e-5


def test_head_count_mismatch_is_a_clear_error():
    teacher = tiny(**TEACHER)
    pruned = tiny(1, **STUDENT, text_heads=2)  # as if half the text heads were removed
    d = Distiller(pruned, teacher, DistillConfig(attn=1, hidden=0, logits=0, task=0))
    with pytest.raises(ValueError, match=r"student unit LEn0 has 2 self-attention heads, teacher unit LEn1 has 4"):
        d.loss(batch_of(teacher))
    # the hidden loss does not care about heads
    d = Distiller(pruned, teacher, DistillConfig(attn=0, hidden=1, logits=0, task=0))
    assert d.loss(batch_of(teacher))["hidden"].item() > 0


def test_distiller_set_up_errors(twins):
    student, teacher, _ = twins
    with pytest.raises(ValueError, match=r"logits weight 0.4 > 0 needs both student_head and teacher_head"):
        Distiller(student, teacher, DistillConfig())
    d = Distiller(student, teacher, DistillConfig(logits=0))
    with pytest.raises(ValueError, match=r"task weight 0.6 > 0 needs a task_loss_fn"):
        d.loss(batch_of(teacher))
    with pytest.raises(ValueError, match="same module"):
        Distiller(student, student, DistillConfig(logits=0, task=0))
    with pytest.raises(TypeError, match="must be a vlkit Backbone"):
        Distiller(nn.Linear(2, 2), teacher)


def test_fine_tune_only_never_runs_the_teacher(twins):
    student, teacher, _ = twins
    calls = []
    hook = teacher.register_forward_pre_hook(lambda *a: calls.append(1))
    emb_hook = teacher.text_embeddings.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        d = Distiller(student, teacher, DistillConfig(attn=0, hidden=0, logits=0, task=1), head(32, 0),
                      task_loss_fn=ce)
        out = d.loss(batch_of(teacher))
    finally:
        hook.remove()
        emb_hook.remove()
    assert calls == [] and out["attn"].item() == out["hidden"].item() == out["logits"].item() == 0.0
    assert out["loss"].item() == out["task"].item() > 0


def test_fit_trains_the_student_and_leaves_the_teacher(twins):
    from vlkit.train import TrainConfig, fit

    _, teacher, _ = twins
    student = tiny(3, **STUDENT)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(student, teacher, DistillConfig(attn=1, hidden=1, logits=0, task=0))
    batch = batch_of(teacher, n=4)
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    before = d.loss(batch)["loss"].item()
    res = fit(d, distill_loss, data, config=TrainConfig(steps=6, batch_size=4, lr=3e-3, progress=False, seed=0))
    assert {"attn", "hidden", "logits", "task"} <= set(res.history[0])
    assert d.loss(batch)["loss"].item() < 0.9 * before
    assert not teacher.training
    assert all(torch.equal(v, t_state[k]) for k, v in teacher.state_dict().items())


# ============================================================================ config
@pytest.mark.parametrize("kw, match", [
    (dict(attn=-0.1), r"attn must be a finite number >= 0, got -0.1"),
    (dict(hidden=float("nan")), r"hidden must be a finite number >= 0, got nan"),
    (dict(logits=True), r"logits must be a finite number >= 0, got True"),
    (dict(task="1"), r"task must be a finite number >= 0, got '1'"),
    (dict(attn=0, hidden=0, logits=0, task=0), r"at least one distillation weight .* must be > 0"),
    (dict(temperature=0), r"temperature must be a finite number > 0, got 0"),
    (dict(temperature=float("inf")), r"temperature must be a finite number > 0, got inf"),
    (dict(cross_attention=1), r"cross_attention must be true or false, got 1"),
])
def test_distill_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kw)


def test_distill_config_defaults_and_from_dict():
    c = DistillConfig()
    # the official total: 0.6 * task + 0.4 * KD
    assert (c.attn, c.hidden, c.logits, c.task, c.temperature) == (0.4, 0.4, 0.4, 0.6, 1.0)
    assert DistillConfig.from_dict({"attn": 1, "task": 0}) == DistillConfig(attn=1, task=0)
    with pytest.raises(ValueError, match=r"unknown distillation key\(s\) 'atn'; valid keys: attn, hidden"):
        DistillConfig.from_dict({"atn": 1})
    with pytest.raises(Exception):
        c.attn = 1.0  # frozen
    assert not DistillConfig(attn=0, hidden=0, logits=0, task=1).kd


def test_hidden_projection_is_seeded_and_keyed():
    a = HiddenProjection({"F0": (16, 32), "LEn0": (8, 8), embed_key("text"): (16, 32)}, seed=3)
    b = HiddenProjection({"F0": (16, 32), "LEn0": (8, 8), embed_key("text"): (16, 32)}, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.get("LEn0") is None and a.get(embed_key("text")).weight.shape == (32, 16)
    with pytest.raises(KeyError, match=r"no distilled pair 'F9'; valid: F0, LEn0, embed:text"):
        a.get("F9")
