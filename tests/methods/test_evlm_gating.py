"""EfficientVLM gates on protocol backbones: structure per unit and modality, costs = the
prunable parameter count, eval gates == masks == physically pruned model (atol 1e-4),
sub-layer gates folded into the masks, training samples (one z per gate per forward, seeded,
differentiable), freeze, detach, the Lagrangian budget, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from vlkit.efficiency import params
from vlkit.methods.evlm import DEFAULT_INIT, GateSet, attach_gates, prune
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError
from vlkit.nn.lagrangian import SparsityBudget

ATOL = 1e-4
BERT = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=32, vocab_size=99, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
XVLM = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=40, vision_layers=2,
            vocab_size=99, text_dim=32, text_heads=4, text_ffn_dim=48, text_layers=2, fusion_layers=2,
            max_positions=20, bos_token_id=2, eos_token_id=3, embed_dim=16, text_len=7)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """std-0.3 weights and biases (tiny BERT-init layers are near-identities, zero biases hide bias bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                m.weight.copy_(0.3 * torch.randn(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model


def tiny_bert():
    return randomize(build("bert-base", **BERT).eval())


def tiny_xvlm():
    return randomize(build("xvlm-clip", **XVLM).eval())


def inputs_of(model, batch=2):
    vl = hasattr(model, "vision_embeddings")  # X-VLM: fixed text length; BERT: 9 tokens
    inputs = model.dummy_inputs(batch) if vl else model.dummy_inputs(batch, seq_len=9)
    inputs["attention_mask"][-1, -2:] = 0
    return inputs


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def assert_same(o1, o2, atol=ATOL):
    torch.testing.assert_close(o1.pooled, o2.pooled, atol=atol, rtol=0)
    for k in o1.sequences:
        torch.testing.assert_close(o1.sequences[k], o2.sequences[k], atol=atol, rtol=0)


def scramble(gates: GateSet, seed: int) -> None:
    """Random log_alpha (seeded) in [-4, 4] and, to cover the folding: one closed sub-layer gate
    (with its entry gates open), one sub-layer whose entry gates are all closed (its gate open)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates.all_gates():
            gate.log_alpha.copy_(8 * torch.rand(gate.n, generator=g) - 4)
        names = gates.unit_names
        gates.gates[names[0]]["heads_layer"].log_alpha.fill_(-10.0)
        gates.gates[names[0]]["heads"].log_alpha.fill_(10.0)
        gates.gates[names[1]]["ffn"].log_alpha.fill_(-10.0)
        gates.gates[names[1]]["ffn_layer"].log_alpha.fill_(10.0)


def linear_params(layer) -> int:
    mods = [layer.attn, layer.ffn] + ([layer.cross_attn] if layer.cross_attn is not None else [])
    return sum(p.numel() for m in mods for p in m.parameters())


# ----------------------------------------------------------------------------- structure and costs
def test_gates_per_unit_and_modality():
    model = tiny_xvlm()
    gates = attach_gates(model)
    assert gates.unit_names == model.unit_names
    for name in gates.unit_names:
        keys = set(gates.gates[name])
        if name.startswith("F"):
            assert keys == {"heads", "heads_layer", "cross_heads", "cross_heads_layer", "ffn", "ffn_layer"}
            assert gates.gates[name]["cross_heads"].n == 4
        else:
            assert keys == {"heads", "heads_layer", "ffn", "ffn_layer"}
        assert gates.gates[name]["ffn"].n == model.unit(name).ffn.fc1.out_features
        assert gates.gates[name]["heads_layer"].n == 1
        torch.testing.assert_close(gates.gates[name]["heads"].log_alpha, torch.full((4,), DEFAULT_INIT["heads"]))
        torch.testing.assert_close(gates.gates[name]["ffn"].log_alpha.mean(), torch.tensor(DEFAULT_INIT["ffn"]))
    groups = gates.groups()
    assert set(groups) == {"vision", "text", "fusion"}
    assert len(groups["fusion"]) == 2 * 6 and len(groups["vision"]) == 2 * 4
    # optimiser sees only log_alphas; the backbone's parameter count is unchanged
    n_gate_params = sum(p.numel() for p in gates.parameters())
    assert n_gate_params == sum(4 + 1 + model.unit(n).ffn.fc1.out_features + 1 for n in model.unit_names) + 2 * 5
    assert params(model) == params(tiny_xvlm())


def test_costs_by_hand_and_full_size_is_the_prunable_count():
    model = tiny_xvlm()
    gates = attach_gates(model)
    costs = {(name, key): c for name in gates.unit_names for key, _, c in gates._costs(name)}
    hd = 8  # text 32 / 4 heads
    assert costs[("LEn0", "heads")] == 4 * hd * 32 + 3 * hd == 1048
    assert costs[("F0", "cross_heads")] == hd * (32 + 24 + 24 + 32) + 3 * hd == 920  # k/v read width 24
    assert costs[("VEn0", "heads")] == 4 * 6 * 24 + 3 * 6  # vision: head_dim 6, width 24
    assert costs[("F0", "ffn")] == 2 * 32 + 1
    assert costs[("F0", "ffn_layer")] == costs[("F0", "heads_layer")] == 32  # the output bias
    full = sum(gate.n * c for pairs in gates.groups().values() for gate, c in pairs)
    prunable = sum(linear_params(u.module) for u in model.units)
    assert full == gates.prunable_params() == prunable
    budget = gates.budget(0.5)
    assert budget.full_size() == pytest.approx(prunable)
    # without sub-layer gates the entries carry everything but the output biases
    model2 = tiny_bert()
    g2 = attach_gates(model2, sublayer=False)
    assert g2.prunable_params() == sum(linear_params(u.module) - 2 * 32 for u in model2.units)
    # only sub-layer gates: each owns its whole sub-layer
    model3 = tiny_bert()
    g3 = attach_gates(model3, heads=False, ffn=False)
    assert g3.prunable_params() == sum(linear_params(u.module) for u in model3.units)


# ----------------------------------------------------------------------------- eval == masks == pruned
@pytest.mark.parametrize("make", [tiny_bert, tiny_xvlm], ids=["bert", "xvlm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_eval_gates_equal_pruned_model(make, seed):
    model = make()
    inputs = inputs_of(model)
    full = run(model, inputs)
    gates = attach_gates(model)
    scramble(gates, seed)
    gated = run(model, inputs)  # eval: binary masks
    masks = gates.masks()
    names = gates.unit_names
    assert not masks[names[0]]["heads"].any()  # closed sub-layer gate folded in
    assert not masks[names[1]]["ffn"].any()
    for entry in masks.values():
        for keep in entry.values():
            assert keep.dtype == torch.bool
    kept = gates.kept_params()
    gates.detach()
    assert_same(run(model, inputs), full, atol=0)  # detach restores the exact model
    small = prune(model, masks)
    assert_same(run(small, inputs), gated)
    assert (gated.pooled - full.pooled).abs().max() > 1e-2
    # the exact kept count = what physical pruning leaves of the prunable parameters
    assert params(model) - params(small) == gates.prunable_params() - kept


def test_eval_masks_are_the_gates_eval_rule():
    """masks() of an entry gate = HardConcreteGate.mask(): keep n - round(E[#zeros]) largest log_alpha."""
    model = tiny_bert()
    gates = attach_gates(model, sublayer=False)
    la = torch.tensor([3.0, -3.0, -2.5, 2.0])  # E[#zeros] = 1.55 -> 2 zeros (vlkit.nn.gates doctest)
    with torch.no_grad():
        gates.gates["En0"]["heads"].log_alpha.copy_(la)
    assert gates.masks()["En0"]["heads"].tolist() == [True, False, False, True]


def test_all_closed_entries_remove_the_bias_in_the_gated_model():
    """Entry gates all 0 with the sub-layer gate open: the gated sub-layer still outputs exactly 0."""
    model = tiny_bert()
    gates = attach_gates(model)
    with torch.no_grad():
        gates.gates["En0"]["heads"].log_alpha.fill_(-10.0)
    seen = {}
    attn = model.unit("En0").attn

    def grab(m, args, out):
        seen["out"] = out.detach().clone()

    h = attn.register_forward_hook(grab)
    run(model, inputs_of(model))
    h.remove()
    assert torch.equal(seen["out"], torch.zeros_like(seen["out"]))
    assert attn.head_mask is None and attn.out_scale is None  # cleared after the call


# ----------------------------------------------------------------------------- training mode
def test_training_samples_seeded_shared_by_batch_and_differentiable():
    model = tiny_bert()
    gates = attach_gates(model, init_log_alpha={"heads": 0.0, "sublayer": 0.0})
    model.train()
    inputs = inputs_of(model)
    inputs["attention_mask"][:] = 1
    inputs["input_ids"][1] = inputs["input_ids"][0]  # two identical examples
    gates.generator = torch.Generator().manual_seed(0)
    o1 = model(**inputs).pooled
    # one z per gate for the whole batch: identical examples give identical outputs
    torch.testing.assert_close(o1[0], o1[1], atol=1e-6, rtol=0)
    loss = o1.pow(2).sum()
    loss.backward()
    for name, p in gates.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in gates.parameters())
    # same generator seed -> same draw; another seed -> another draw
    gates.generator = torch.Generator().manual_seed(0)
    o2 = model(**inputs).pooled
    gates.generator = torch.Generator().manual_seed(1)
    o3 = model(**inputs).pooled
    torch.testing.assert_close(o2, o1, atol=0, rtol=0)
    assert (o3 - o1).abs().max() > 1e-4


def test_training_draw_equals_gate_sample():
    """The hook sets head_mask = HardConcreteGate.sample(generator) (Louizos et al. Eq. 10)."""
    model = tiny_bert()
    gates = attach_gates(model, units=["En2"], ffn=False, sublayer=False, init_log_alpha={"heads": 0.5})
    model.train()
    seen = {}
    attn = model.unit("En2").attn

    def grab(m, args):  # returns None: leaves the inputs alone
        seen["z"] = m.head_mask.detach().clone()

    h = attn.register_forward_pre_hook(grab)
    gates.generator = torch.Generator().manual_seed(7)
    model(**inputs_of(model))
    h.remove()
    expected = gates.gates["En2"]["heads"].sample(torch.Generator().manual_seed(7)).detach()
    torch.testing.assert_close(seen["z"], expected, atol=0, rtol=0)


def test_freeze_makes_training_use_the_eval_masks():
    model = tiny_bert()
    gates = attach_gates(model)
    scramble(gates, 3)
    inputs = inputs_of(model)
    ref = run(model, inputs)
    gates.freeze()
    model.train()  # dropout is 0 in this config
    assert_same(run(model, inputs), ref, atol=1e-6)
    assert all(not p.requires_grad for p in gates.parameters())


def test_budget_drives_sparsity_up():
    """A few steps of the Lagrangian penalty alone (CoFi Eq. 6) raise the expected sparsity."""
    model = tiny_xvlm()
    gates = attach_gates(model)
    budget = gates.budget(0.6)
    assert isinstance(budget, SparsityBudget) and set(budget.group_names) == {"vision", "text", "fusion"}
    opt = torch.optim.Adam([{"params": gates.parameters(), "lr": 0.1},
                            {"params": budget.parameters(), "lr": 0.1, "weight_decay": 0.0}])
    s0 = budget(0).expected_sparsity.item()
    for step in range(30):
        opt.zero_grad()
        budget(step).penalty.backward()
        opt.step()
    s1 = budget(30).expected_sparsity.item()
    assert s0 < 0.4 and s1 > s0 + 0.1


# ----------------------------------------------------------------------------- attach / detach / errors
def test_skips_non_transformer_units_and_detach():
    model = tiny_bert()

    class Skip(nn.Module):
        def forward(self, x, ctx=None):
            return x

    model.replace_unit("En1", Skip())
    with pytest.warns(UserWarning, match="En1"):
        gates = attach_gates(model)
    assert gates.unit_names == ["En0", "En2"] and "Skip" in gates.skipped["En1"]
    with pytest.raises(ValueError, match="already carries gates"):
        attach_gates(model, units=["En0"])
    with pytest.raises(ValueError, match="gates.detach"):
        prune(model, gates.masks())
    gates.detach()
    assert not gates.attached and not model.unit("En0")._forward_pre_hooks
    small = prune(model, gates.masks())  # masks stay readable after detach
    assert small.unit("En0").ffn.fc1.out_features == int(gates.masks()["En0"]["ffn"].sum())
    attach_gates(model, units=["En0"]).detach()  # re-attaching after detach is fine


def test_bad_input():
    model = tiny_bert()
    with pytest.raises(UnknownNameError, match=r"unknown unit 'En7'.*En0, En1, En2"):
        attach_gates(model, units=["En7"])
    with pytest.raises(UnknownNameError, match=r"init_log_alpha key 'head'.*heads, cross_heads, ffn, sublayer"):
        attach_gates(model, init_log_alpha={"head": 1.0})
    with pytest.raises(ValueError, match="nothing to gate"):
        attach_gates(model, heads=False, ffn=False, sublayer=False)
    with pytest.raises(ValueError, match="inside log_alpha_range"):
        attach_gates(model, init_log_alpha=50.0)
    model.replace_unit("En2", nn.Identity())
    with pytest.raises(ValueError, match="'En2' is served by a Identity"):
        attach_gates(model, units=["En2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach_gates(model, units="En0").detach()  # explicit units: no warning
    assert math.isfinite(DEFAULT_INIT["heads"])
