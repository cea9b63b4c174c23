"""DAS apply (Wu et al. 2023, Sec. 3.2; official vilt_module_train.py / meter_module_train.py):
candidates per backbone, the official adapter layout, the MAC identity of a skip on
ViLT-B/32, hand-computed kept / skipped units, what trains, the search supernet, bad input."""

import copy

import pytest
import torch

from vlkit.efficiency import macs, transformer_layer_macs, unit_macs
from vlkit.methods.das import SkipSupernet, apply_skips, candidates, das_trainable
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError
from vlkit.nn.adapters import ParallelAdapter, SkipAdapter, bottleneck_params, count_adapter_params

VILT_TINY = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=101)
METER_TINY = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=48, vision_layers=2,
                  text_dim=40, text_heads=4, text_ffn_dim=80, text_layers=2, vocab_size=99, max_positions=20,
                  hidden_dim=32, fusion_heads=4, fusion_ffn_dim=64, fusion_layers=3, text_len=7)
XVLM_TINY = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=48, vision_layers=2,
                 vocab_size=99, text_dim=32, text_heads=4, text_ffn_dim=64, text_layers=2, fusion_layers=2,
                 max_positions=20, bos_token_id=2, eos_token_id=3, embed_dim=16, text_len=7)
BERT_TINY = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=101)


@pytest.fixture(scope="module")
def vilt():
    return build("vilt-b32", **VILT_TINY)


@pytest.fixture(scope="module")
def vilt_inputs(vilt):
    return vilt.dummy_inputs(batch_size=2, text_len=5, image_size=(64, 96))


@pytest.fixture(scope="module")
def meter():
    return build("meter-clip16-roberta", **METER_TINY)


# ---------------------------------------------------------------- candidates
def test_candidates_per_backbone(vilt, meter):
    assert candidates(vilt, "fusion") == candidates(vilt, "global") == ["En0", "En1", "En2"]
    assert candidates(meter, "fusion") == ["FL0", "FV0", "FL1", "FV1", "FL2", "FV2"]
    assert candidates(meter, "global") == ["LEn0", "LEn1", "FL0", "FV0", "FL1", "FV1", "FL2", "FV2"]
    xvlm = build("xvlm-clip", **XVLM_TINY)
    assert candidates(xvlm, "fusion") == ["F0", "F1"]
    assert candidates(xvlm, "global") == ["LEn0", "LEn1", "F0", "F1"]
    assert candidates(build("bert-base", **BERT_TINY), "global") == ["En0", "En1", "En2"]


def test_candidates_bad_scope(meter):
    with pytest.raises(UnknownNameError, match="'encoder'.*fusion, global"):
        candidates(meter, "encoder")
    no_fusion = build("meter-clip16-roberta", **{**METER_TINY, "fusion_layers": 0})
    with pytest.raises(ValueError, match="scope 'fusion' has no candidate units"):
        candidates(no_fusion, "fusion")
    with pytest.raises(ValueError, match="scope 'fusion' has no candidate units"):
        apply_skips(no_fusion, [], scope="fusion")
    assert candidates(no_fusion, "global") == ["LEn0", "LEn1"]


# ---------------------------------------------------------------- the MAC identity on ViLT-B/32
@pytest.fixture(scope="module")
def vilt_b32_3():
    """ViLT-B/32 at the paper's width and 241 tokens, 3 layers (per-unit MACs as in 12)."""
    return build("vilt-b32", num_hidden_layers=3)


def test_skip_saves_exactly_the_layer_macs_on_vilt_b32(vilt_b32_3):
    b = vilt_b32_3
    x = b.dummy_inputs()
    n, d = 241, 768
    assert x["input_ids"].shape[1] + 1 + (320 // 32) * (640 // 32) == n
    S, u = ["En0"], "En1"
    with_s = apply_skips(b, S, inplace=False)
    with_su = apply_skips(b, S + [u], inplace=False)
    assert with_su.unit(u).bottleneck == 192 and with_s.unit("En2").adapters["attn"].bottleneck == 96
    per_s, per_su = unit_macs(with_s, x), unit_macs(with_su, x)
    kept_u, skip_u = per_s[u], per_su[u]
    layer = transformer_layer_macs(n, d)
    assert layer == 1_794_983_424
    assert kept_u == layer + 2 * (2 * d * 96 * n)  # the layer + its two bottleneck-96 adapters
    assert skip_u == 2 * d * 192 * n  # the bottleneck-192 skip adapter
    assert macs(with_su, x) == macs(with_s, x) - kept_u + skip_u
    assert macs(with_s, x) - macs(with_su, x) == layer  # 1.795 G less per skip
    # every other part is unchanged
    assert {k: v for k, v in per_s.items() if k != u} == {k: v for k, v in per_su.items() if k != u}
    # the pre-trained backbone is untouched by inplace=False
    assert all(not layer.adapters for layer in (b.unit(nm) for nm in b.unit_names))


# ---------------------------------------------------------------- layout
def test_vilt_layout(vilt):
    m = apply_skips(vilt, ["En1"], kept_bottleneck=8, inplace=False)
    skip = m.unit("En1")
    assert isinstance(skip, SkipAdapter) and skip.bottleneck == 16 and skip.act == "relu" and skip.init == "bert"
    for name in ("En0", "En2"):
        ad = m.unit(name).adapters
        assert list(ad) == ["attn", "ffn"]
        assert all(isinstance(a, ParallelAdapter) and a.bottleneck == 8 and a.act == "relu" for a in ad.values())
    assert count_adapter_params(m) == 2 * 2 * bottleneck_params(32, 8) + bottleneck_params(32, 16)


def test_meter_layout_fusion_and_global(meter):
    m = apply_skips(meter, ["FV1"], inplace=False)  # default sizes: 96 kept, 3 x 96 skipped
    assert isinstance(m.unit("FV1"), SkipAdapter) and m.unit("FV1").bottleneck == 288
    for name in ("FL0", "FV0", "FL1", "FL2", "FV2"):
        assert list(m.unit(name).adapters) == ["attn", "cross", "ffn"]
    for name in ("VEn0", "VEn1", "LEn0", "LEn1"):
        assert not m.unit(name).adapters
    g = apply_skips(meter, ["LEn0", "FL2"], scope="global", kept_bottleneck=4, inplace=False)
    assert g.unit("LEn0").bottleneck == 8 and g.unit("FL2").bottleneck == 12
    assert list(g.unit("LEn1").adapters) == ["attn", "ffn"]
    assert not g.unit("VEn0").adapters and not g.unit("VEn1").adapters


# ---------------------------------------------------------------- what the units compute
def test_skipped_and_kept_units_by_hand(vilt, vilt_inputs):
    """Skipped: x + up(relu(down(LN x))); kept (pre-norm): x1 = x + Attn(LN1 x) + d_attn(x),
    x2 = x1 + FFN(LN2 x1) + d_ffn(x1) -- the official kept block."""
    m = apply_skips(vilt, ["En1"], kept_bottleneck=8, inplace=False).eval()
    with torch.no_grad():
        state = m.embed(**vilt_inputs)
        x, mask = state.streams["joint"], state.masks["joint"]
        after0 = m.run_units(state, 0, 1)
        layer = m.unit("En0")
        ad = layer.adapters
        d = lambda a, t: a.up(torch.relu(a.down(a.norm(t))))  # noqa: E731
        x1 = x + layer.attn(layer.attn_norm(x), mask) + d(ad["attn"], x)
        x2 = x1 + layer.ffn(layer.ffn_norm(x1)) + d(ad["ffn"], x1)
        torch.testing.assert_close(after0.streams["joint"], x2, atol=1e-6, rtol=1e-5)
        y = after0.streams["joint"]
        skip = m.unit("En1")
        out = m.run_units(after0, 1, 2).streams["joint"]
        torch.testing.assert_close(out, y + d(skip, y), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(out, y)  # BERT init: the skip adapter is not the identity


def test_zero_init_adapters_keep_outputs(vilt, vilt_inputs):
    """init="zero": adding adapters changes nothing; a skip is then exactly "drop the unit"."""
    with torch.no_grad():
        ref = vilt(**vilt_inputs).pooled
        same = apply_skips(vilt, [], init="zero", inplace=False)(**vilt_inputs).pooled
        torch.testing.assert_close(same, ref, atol=0, rtol=0)

        class Identity(torch.nn.Module):
            def forward(self, x, ctx=None):
                return x

        dropped = copy.deepcopy(vilt)
        dropped.replace_unit("En1", Identity())
        skipped = apply_skips(vilt, ["En1"], init="zero", inplace=False)(**vilt_inputs).pooled
        torch.testing.assert_close(skipped, dropped(**vilt_inputs).pooled, atol=0, rtol=0)
        assert not torch.allclose(skipped, ref)


def test_seeded_adapters(vilt):
    a, b, c = (apply_skips(vilt, ["En0"], seed=s, inplace=False) for s in (3, 3, 4))
    sa, sb, sc = (dict(trainable.named_parameters()) for trainable in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.En0.down.weight"], sc["blocks.En0.down.weight"])
    g = torch.random.get_rng_state()
    apply_skips(vilt, ["En0"], seed=5, inplace=False)
    assert torch.equal(g, torch.random.get_rng_state())  # the global RNG is not consumed


# ---------------------------------------------------------------- what trains
def test_trainable_vilt(vilt):
    m = apply_skips(vilt, ["En1"], inplace=False)
    head = torch.nn.Linear(32, 3)
    names = set(das_trainable(m, head))
    expected = {n for n, _ in m.named_parameters()
                if ".adapters." in n or n.startswith(("blocks.En1.", "pooler."))}
    expected |= {"embeddings.token_type_embeddings.weight", "embeddings.text_embeddings.token_type_embeddings.weight"}
    assert names == expected
    assert {n for n, p in m.named_parameters() if p.requires_grad} == expected
    assert all(p.requires_grad for p in head.parameters())
    assert sum(p.numel() for n, p in m.named_parameters() if p.requires_grad) == (
        count_adapter_params(m) + 32 * 32 + 32 + vilt.embeddings.token_type_embeddings.weight.numel()
        + vilt.embeddings.text_embeddings.token_type_embeddings.weight.numel())


def test_trainable_meter_keeps_towers_frozen(meter):
    m = apply_skips(meter, ["FV1"], inplace=False)
    names = set(das_trainable(m))
    assert "token_type_embeddings.weight" in names
    assert {"text_pooler.dense.weight", "image_pooler.dense.bias"} <= names
    assert "text_embeddings.token_type_embeddings.weight" not in names  # official: text_transformer frozen
    assert not any(n.startswith(("blocks.VEn", "blocks.LEn", "vision_embeddings", "image_transform",
                                 "text_transform")) for n in names)
    assert all(".adapters." in n or n.startswith("blocks.FV1.") for n in names if n.startswith("blocks."))


def test_unused_pooler_stays_frozen():
    b = build("bert-base", pooling="mean", **BERT_TINY)
    names = das_trainable(apply_skips(b, ["En0"], kept_bottleneck=4))
    assert not any(n.startswith("pooler.") for n in names)
    assert "embeddings.token_type_embeddings.weight" in names


# ---------------------------------------------------------------- bad input
def test_bad_skip_sets(vilt, meter):
    with pytest.raises(ValueError, match="k=3 .*only 3 candidates"):
        apply_skips(vilt, ["En0", "En1", "En2"], inplace=False)
    with pytest.raises(UnknownNameError, match="'En9'.*En0, En1, En2"):
        apply_skips(vilt, ["En9"], inplace=False)
    with pytest.raises(UnknownNameError, match="'VEn0'.*FL0, FV0, FL1"):
        apply_skips(meter, ["VEn0"], inplace=False)
    with pytest.raises(UnknownNameError, match="'LEn1'"):
        apply_skips(meter, ["LEn1"], scope="fusion", inplace=False)
    with pytest.raises(ValueError, match="more than once"):
        apply_skips(vilt, ["En1", "En1"], inplace=False)
    with pytest.raises(TypeError, match="string"):
        apply_skips(vilt, "En1", inplace=False)
    with pytest.raises(ValueError, match="kept_bottleneck"):
        apply_skips(vilt, ["En1"], kept_bottleneck=0, inplace=False)


def test_apply_twice_and_errors_change_nothing(vilt):
    m = copy.deepcopy(vilt)
    keys = list(m.state_dict())
    with pytest.raises(UnknownNameError):
        apply_skips(m, ["En0", "Nope"])
    assert list(m.state_dict()) == keys and all(p.requires_grad for p in m.parameters())
    apply_skips(m, ["En0"])
    with pytest.raises((ValueError, TypeError), match="pre-trained backbone"):
        apply_skips(m, ["En1"])


# ---------------------------------------------------------------- search supernet
def test_supernet_equals_apply_skips(meter):
    """With S active, the supernet costs and computes what apply_skips(S) does (same adapter
    weights), co-attention snapshots included."""
    x = meter.dummy_inputs(batch_size=2)
    sn = SkipSupernet(copy.deepcopy(meter), kept_bottleneck=4, seed=1)
    for S in (["FV0"], ["FL1", "FV2"]):
        sn.set_skips(S)
        final = apply_skips(meter, S, kept_bottleneck=4, inplace=False, seed=9)
        for name, unit in sn.units.items():
            if name in S:
                final.unit(name).load_state_dict(unit.skip.state_dict())
            else:
                final.unit(name).adapters.load_state_dict(unit.layer.adapters.state_dict())
        assert unit_macs(sn.backbone, x) == unit_macs(final, x)  # sums to macs(): the whole pass
        with torch.no_grad():
            torch.testing.assert_close(sn.backbone(**x).pooled, final(**x).pooled, atol=0, rtol=0)


def test_supernet_switching(vilt, vilt_inputs):
    sn = SkipSupernet(copy.deepcopy(vilt), kept_bottleneck=4)
    with torch.no_grad():
        full = sn.backbone(**vilt_inputs).pooled
        with sn.skipping(["En2", "En0"]) as s:
            assert s == ("En0", "En2") and sn.skips == s
            assert [u.skipped for u in sn.units.values()] == [True, False, True]
            skipped = sn.backbone(**vilt_inputs).pooled
        assert sn.skips == () and not torch.allclose(full, skipped)
        torch.testing.assert_close(sn.backbone(**vilt_inputs).pooled, full, atol=0, rtol=0)
    with pytest.raises(ValueError, match="k=3"):
        sn.set_skips(["En0", "En1", "En2"])
    with pytest.raises(UnknownNameError):
        sn.set_skips(["En7"])
    with pytest.raises(ValueError, match="already has adapters"):
        SkipSupernet(apply_skips(vilt, [], inplace=False))


def test_das_as_a_petl_method_is_apply_skips(meter):
    """``petl.apply("das", b, skip=...)`` builds exactly ``apply_skips``'s model: same weights,
    same trainable tensors; ``skip=()`` is the adapters-only k = 0 model."""
    from vlkit.methods.petl import apply

    ref = apply_skips(meter, ["FV1"], scope="global", seed=2, inplace=False)
    got = apply("das", copy.deepcopy(meter), skip=["FV1"], scope="global", seed=2)
    a, b = ref.state_dict(), got.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ({n for n, p in ref.named_parameters() if p.requires_grad}
            == {n for n, p in got.named_parameters() if p.requires_grad})
    k0 = apply("das", copy.deepcopy(meter), scope="fusion")
    assert not any(isinstance(k0.unit(n), SkipAdapter) for n in candidates(meter, "fusion"))
    with pytest.raises(UnknownNameError, match="'skips'"):
        apply("das", copy.deepcopy(meter), skips=["FV1"])
