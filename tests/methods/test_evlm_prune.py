"""EfficientVLM physical pruning: pruned == masked (eval, atol 1e-4) for random masks with fully
pruned sub-layers and units, on a tiny BERT and a tiny X-VLM (fusion units with cross-attention
to a narrower vision stream); parameter counts by hand; save -> load with the new shapes; bad
masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlkit.efficiency import params
from vlkit.methods.evlm import (apply_masks, check_masks, clear_masks, load_pruned, masked_copy, prune,
                                pruning_spec, removed_params, reshape_to_spec, save_pruned)
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError

ATOL = 1e-4
BERT = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=32, vocab_size=99, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# vision width 24 != text width 32: the fusion cross-attention's k/v read width 24
XVLM = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=40, vision_layers=2,
            vocab_size=99, text_dim=32, text_heads=4, text_ffn_dim=48, text_layers=2, fusion_layers=2,
            max_positions=20, bos_token_id=2, eos_token_id=3, embed_dim=16, text_len=7)
# METER: co-attention fusion units FL*/FV* (each side cross-attends to the other's snapshot)
METER = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=48, vision_layers=2,
             text_dim=40, text_heads=4, text_ffn_dim=80, text_layers=2, vocab_size=99, max_positions=20,
             hidden_dim=32, fusion_heads=4, fusion_ffn_dim=64, fusion_layers=2, text_len=7)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Large random weights *and biases* (std 0.3): tiny BERT-init layers are near-identities
    and zero biases would hide a bias that survives a removed sub-layer."""
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


def tiny_meter():
    return randomize(build("meter-clip16-roberta", **METER).eval())


def bert_inputs(model, batch=2):
    inputs = model.dummy_inputs(batch, seq_len=9)
    inputs["attention_mask"][1, -3:] = 0
    return inputs


def xvlm_inputs(model, batch=2):
    inputs = model.dummy_inputs(batch)
    inputs["attention_mask"][1, -2:] = 0
    return inputs


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


@pytest.fixture(scope="module")
def xvlm():
    return tiny_xvlm()


CASES = {"bert": (tiny_bert, bert_inputs), "xvlm": (tiny_xvlm, xvlm_inputs), "meter": (tiny_meter, xvlm_inputs)}


def random_masks(model, seed: int) -> dict:
    """Random keep-masks (p = 0.5) on every unit, plus: the 1st unit loses its whole self-attention,
    the 2nd its whole FFN, the last everything (incl. cross-attention on fusion units)."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for u in model.units:
        layer = u.module
        entry = {"heads": torch.rand(layer.attn.num_heads, generator=g) < 0.5,
                 "ffn": torch.rand(layer.ffn.fc1.out_features, generator=g) < 0.5}
        if layer.cross_attn is not None:
            entry["cross_heads"] = torch.rand(layer.cross_attn.num_heads, generator=g) < 0.5
        masks[u.name] = entry
    names = model.unit_names
    masks[names[0]]["heads"][:] = False
    masks[names[1]]["ffn"][:] = False
    for key in masks[names[-1]]:
        masks[names[-1]][key][:] = False
    return masks


def outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def assert_same(o1, o2, atol=ATOL):
    torch.testing.assert_close(o1.pooled, o2.pooled, atol=atol, rtol=0)
    for k in o1.sequences:
        torch.testing.assert_close(o1.sequences[k], o2.sequences[k], atol=atol, rtol=0)


def hand_removed(model, masks) -> int:
    """Parameters removed, by hand: a dropped head owns hd*(q_in + k_in + v_in + o_out) weights
    and 3*hd q/k/v biases (4*hd*D + 3*hd for self-attention), a dropped FFN unit 2*D + 1; a
    sub-layer with nothing kept also loses its D output bias."""
    total = 0
    for name, entry in masks.items():
        layer = model.unit(name)
        D = layer.dim
        for key, keep in entry.items():
            dropped = int((~keep).sum())
            if key == "ffn":
                total += dropped * (2 * D + 1)
            else:
                attn = layer.attn if key == "heads" else layer.cross_attn
                hd, kv = attn.head_dim, attn.k.in_features
                total += dropped * (hd * (2 * D + 2 * kv) + 3 * hd)
            total += D if not keep.any() else 0
    return total


# ----------------------------------------------------------------------------- pruned == masked
@pytest.mark.parametrize("arch", ["bert", "xvlm", "meter"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_equals_masked(arch, seed):
    make, make_inputs = CASES[arch]
    model = make()
    inputs = make_inputs(model)
    masks = random_masks(model, seed)
    full = outputs(model, inputs)
    masked = outputs(masked_copy(model, masks), inputs)
    pruned_model = prune(model, masks)
    pruned = outputs(pruned_model, inputs)
    assert_same(pruned, masked)
    # the masks matter (the check is not vacuous) and the original is untouched
    assert (full.pooled - masked.pooled).abs().max() > 1e-2
    assert_same(outputs(model, inputs), full, atol=0)
    # parameter count: what the masks imply, by hand and by the library
    assert params(model) - params(pruned_model) == hand_removed(model, masks) == removed_params(model, masks)


def test_shapes_after_pruning(xvlm):
    masks = random_masks(xvlm, 0)
    small = prune(xvlm, masks)
    for name, entry in masks.items():
        layer = small.unit(name)
        for key, keep in entry.items():
            k = int(keep.sum())
            if key == "ffn":
                assert (layer.ffn.fc1.out_features, layer.ffn.fc2.in_features) == (k, k)
                assert (layer.ffn.fc2.bias is None) == (k == 0)
                assert layer.ffn.fc1.weight.shape == (k, layer.dim)
            else:
                attn = layer.attn if key == "heads" else layer.cross_attn
                inner = k * attn.head_dim
                assert attn.num_heads == k
                assert [attn.q.out_features, attn.k.out_features, attn.v.out_features, attn.o.in_features] == [inner] * 4
                assert attn.k.weight.shape[1] == (24 if key == "cross_heads" else layer.dim)
                assert (attn.o.bias is None) == (k == 0)
    assert pruning_spec(small)["units"]["F1"] == {"heads": 0, "cross_heads": 0, "ffn": 0}


def test_kept_rows_are_the_kept_heads(bert):
    """Head h owns rows h*hd..(h+1)*hd-1 of q/k/v (and columns of o): kept heads keep theirs, in order."""
    keep = torch.tensor([False, True, False, True])
    small = prune(bert, {"En0": {"heads": keep}})
    a, b = bert.unit("En0").attn, small.unit("En0").attn
    hd = a.head_dim
    rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in (1, 3)])
    for n in ("q", "k", "v"):
        torch.testing.assert_close(getattr(b, n).weight, getattr(a, n).weight[rows], atol=0, rtol=0)
        torch.testing.assert_close(getattr(b, n).bias, getattr(a, n).bias[rows], atol=0, rtol=0)
    torch.testing.assert_close(b.o.weight, a.o.weight[:, rows], atol=0, rtol=0)
    torch.testing.assert_close(b.o.bias, a.o.bias, atol=0, rtol=0)


def test_removed_sublayer_contributes_exactly_zero(bert):
    """A fully pruned attention (FFN) outputs exactly 0, bias included, masked and pruned alike;
    all-False masks make the unit exactly its post-norm of the input."""
    x = torch.randn(2, 5, bert.unit("En0").dim, generator=torch.Generator().manual_seed(0))
    masks = {"En0": {"heads": torch.zeros(4, dtype=torch.bool), "ffn": torch.zeros(48, dtype=torch.bool)}}
    for model in (masked_copy(bert, masks), prune(bert, masks)):
        layer = model.unit("En0")
        with torch.no_grad():
            assert torch.equal(layer.attn(x), torch.zeros_like(x))
            assert torch.equal(layer.ffn(x), torch.zeros_like(x))
            # post-norm: x -> LN(x + 0) -> LN(. + 0)
            expected = layer.ffn_norm(layer.attn_norm(x))
            torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_prune_twice_equals_pruning_once(bert):
    """Masks refer to the current sizes: pruning a pruned model again composes the masks."""
    first = {"En1": {"heads": torch.tensor([True, False, True, True]), "ffn": torch.arange(48) % 3 != 0}}
    second = {"En1": {"heads": torch.tensor([False, True, True]), "ffn": torch.arange(32) < 20}}
    kept_heads = torch.tensor([False, False, True, True])
    kept_ffn = torch.zeros(48, dtype=torch.bool)
    kept_ffn[torch.nonzero(first["En1"]["ffn"]).flatten()[:20]] = True
    once = prune(bert, {"En1": {"heads": kept_heads, "ffn": kept_ffn}})
    twice = prune(prune(bert, first), second)
    inputs = bert_inputs(bert)
    assert_same(outputs(twice, inputs), outputs(once, inputs), atol=1e-5)
    assert params(twice) == params(once)


def test_inplace_and_mask_helpers(bert):
    model = tiny_bert()
    inputs = bert_inputs(model)
    masks = random_masks(model, 3)
    ref = outputs(model, inputs)
    apply_masks(model, masks)
    masked = outputs(model, inputs)
    clear_masks(model)
    assert_same(outputs(model, inputs), ref, atol=0)  # clearing restores the exact model
    out = prune(model, masks, inplace=True)
    assert out is model
    assert_same(outputs(model, inputs), masked)
    # every mask field is cleared on the pruned model (the masks are in the shapes now)
    for u in model.units:
        assert u.module.attn.head_mask is None and u.module.attn.out_scale is None
        assert u.module.ffn.unit_mask is None and u.module.ffn.out_scale is None


def test_masks_accept_lists_and_01_values(bert):
    m1 = {"En2": {"heads": [True, False, True, True], "ffn": (torch.arange(48) % 2).float()}}
    m2 = {"En2": {"heads": torch.tensor([1, 0, 1, 1], dtype=torch.bool), "ffn": torch.arange(48) % 2 == 1}}
    assert params(prune(bert, m1)) == params(prune(bert, m2))
    assert torch.equal(check_masks(bert, m1)["En2"]["ffn"], m2["En2"]["ffn"])


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", ["bert", "xvlm"])
def test_save_load_roundtrip(arch, tmp_path):
    make, make_inputs = CASES[arch]
    model = make()
    small = prune(model, random_masks(model, 4))
    folder = save_pruned(small, tmp_path / "pruned")
    preset, overrides = ("bert-base", BERT) if arch == "bert" else ("xvlm-clip", XVLM)
    loaded = load_pruned(preset, folder, **overrides).eval()
    assert pruning_spec(loaded) == pruning_spec(small)
    assert params(loaded) == params(small)
    inputs = make_inputs(model)
    assert_same(outputs(loaded, inputs), outputs(small, inputs), atol=0)


def test_load_with_spec_dict_and_state_dict(bert, tmp_path):
    small = prune(bert, random_masks(bert, 5))
    spec = pruning_spec(small)
    loaded = load_pruned(lambda **kw: build("bert-base", **kw), spec, small.state_dict(), **BERT).eval()
    inputs = bert_inputs(bert)
    assert_same(outputs(loaded, inputs), outputs(small, inputs), atol=0)
    # the unpruned preset cannot take the pruned weights; a wrong spec is refused clearly
    with pytest.raises(RuntimeError, match="size mismatch"):
        build("bert-base", **BERT).load_state_dict(small.state_dict())
    with pytest.raises(ValueError, match=r"spec\['units'\]\['En0'\]\['heads'\] = 9"):
        reshape_to_spec(build("bert-base", **BERT), {"units": {"En0": {"heads": 9}}})
    with pytest.raises(UnknownNameError, match="En7"):
        reshape_to_spec(build("bert-base", **BERT), {"units": {"En7": {"heads": 1}}})
    with pytest.raises(ValueError, match="preset 'bert-base', not 'minilm'"):
        load_pruned("minilm", spec, small.state_dict())
    with pytest.raises(FileNotFoundError, match="pruning.json"):
        load_pruned("bert-base", tmp_path, **BERT)


# ----------------------------------------------------------------------------- bad input
def test_bad_masks(bert, xvlm):
    with pytest.raises(UnknownNameError, match=r"unknown unit 'En9'.*En0, En1, En2"):
        prune(bert, {"En9": {"heads": torch.ones(4, dtype=torch.bool)}})
    with pytest.raises(ValueError, match=r"masks\['En1'\]\['heads'\] has shape \(3,\), expected \(4,\)"):
        prune(bert, {"En1": {"heads": torch.ones(3, dtype=torch.bool)}})
    with pytest.raises(ValueError, match=r"masks\['En0'\]\['ffn'\] has shape \(4, 12\), expected \(48,\)"):
        prune(bert, {"En0": {"ffn": torch.ones(4, 12, dtype=torch.bool)}})
    with pytest.raises(UnknownNameError, match=r"cross_heads.*heads, ffn"):  # no cross-attention in BERT
        prune(bert, {"En0": {"cross_heads": torch.ones(4, dtype=torch.bool)}})
    with pytest.raises(UnknownNameError, match="'head'"):
        prune(xvlm, {"F0": {"head": torch.ones(4, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="0/1 values"):
        prune(bert, {"En0": {"heads": torch.tensor([1, 2, 0, 1])}})
    with pytest.raises(TypeError, match="must be a dict"):
        prune(bert, [("En0", {})])
    with pytest.raises(TypeError, match=r"masks\['En0'\] must be a dict"):
        prune(bert, {"En0": torch.ones(4, dtype=torch.bool)})
    # a unit served by something else (a DAS skip) has nothing to prune
    model = tiny_bert()

    class Skip(nn.Module):
        def forward(self, x, ctx=None):
            return x

    model.replace_unit("En1", Skip())
    with pytest.raises(ValueError, match="'En1' is served by a Skip, not a TransformerLayer"):
        prune(model, {"En1": {"heads": torch.ones(4, dtype=torch.bool)}})
    with pytest.raises(TypeError, match="not a plain nn.Linear"):
        layer = model.unit("En0")
        layer.attn.q = nn.Sequential(layer.attn.q)
        prune(model, {"En0": {"heads": torch.ones(4, dtype=torch.bool)}})
