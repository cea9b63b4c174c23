"""ViLT backbone (``vilt-b32``) against HF ``ViltModel``."""

from __future__ import annotations

import pytest
import torch
from transformers import ViltModel

from vlkit.models import build
from vlkit.models.convert import vit_layer_state
from vlkit.models.vilt import ViltBackbone, vilt_config


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# tiny widths, but the paper's 32-pixel patches and 40-token text limit
TINY = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=101)


def _inputs(batch=3, n=9, hw=(96, 160), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, 5:] = 0  # text padding
    pixels = torch.randn(batch, 3, *hw, generator=g)
    pixel_mask = torch.ones(batch, *hw, dtype=torch.long)
    pixel_mask[2, :, hw[1] // 2:] = 0  # right half of image 2 is padding -> padded patches
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "pixel_mask": pixel_mask}


@pytest.fixture(scope="module")
def tiny():
    return build("vilt-b32", **TINY)


@pytest.fixture(scope="module")
def tiny_hf_pair(tmp_path_factory):
    torch.manual_seed(1)
    hf = ViltModel(vilt_config(**TINY)).eval()
    folder = tmp_path_factory.mktemp("vilt")
    hf.save_pretrained(folder)
    return hf, build("vilt-b32", weights=folder)


@torch.no_grad()
def test_equals_hf_vilt_with_masks(tiny_hf_pair):
    hf, ours = tiny_hf_pair
    x = _inputs()
    torch.manual_seed(ours.patch_seed)  # HF draws the patch order from the global RNG
    ref = hf(**x)
    out = ours(**x)
    assert out.sequences["joint"].shape == ref.last_hidden_state.shape == (3, 9 + 1 + 3 * 5, 32)
    assert_close(out.sequences["joint"], ref.last_hidden_state)
    assert_close(out.pooled, ref.pooler_output)
    # joint mask = text mask, image CLS, then the patch mask (image 2: 6 of 15 patches padded)
    mask = out.masks["joint"]
    assert torch.equal(mask[:, :9], x["attention_mask"])
    assert mask[:, 9].eq(1).all() and mask[2, 10:].sum() < 15 and mask[0, 10:].sum() == 15


@torch.no_grad()
def test_unpadded_images_take_the_batched_path_bit_identically(tiny_hf_pair):
    """All pixels valid -> ViltBackbone._embed_unpadded (one gather, no per-image loop):
    the same tokens, order and mask as HF's per-image visual_embed."""
    hf, ours = tiny_hf_pair
    x = _inputs()
    x["pixel_mask"] = torch.ones_like(x["pixel_mask"])
    for pixel_mask in (x["pixel_mask"], None):
        torch.manual_seed(ours.patch_seed)
        ref = hf(**{**x, "pixel_mask": pixel_mask})
        out = ours(**{**x, "pixel_mask": pixel_mask})
        assert_close(out.sequences["joint"], ref.last_hidden_state)  # our layers vs HF's: float rounding
        assert_close(out.pooled, ref.pooler_output)
    state = ours.embed(**x)  # bit-identical to HF's embeddings module, at the same patch seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ours.patch_seed)
        z, mask = ours.embeddings(x["input_ids"], x["attention_mask"], None, x["pixel_values"], x["pixel_mask"],
                                  None, None)
    assert torch.equal(state.streams["joint"], z) and torch.equal(state.masks["joint"], mask)


@torch.no_grad()
def test_patch_order_is_seeded(tiny):
    x = _inputs()
    a, b = tiny(**x), tiny(**x)
    assert torch.equal(a.sequences["joint"], b.sequences["joint"])
    tiny.patch_seed = None  # library behaviour: a fresh random patch order each pass
    try:
        torch.manual_seed(0)
        c = tiny(**x)
        torch.manual_seed(1)
        d = tiny(**x)
    finally:
        tiny.patch_seed = 0
    assert not torch.allclose(c.sequences["joint"], d.sequences["joint"])
    # ... but only the order: text tokens and the pooled vector are unchanged
    assert_close(c.sequences["joint"][:, :10], d.sequences["joint"][:, :10])
    assert_close(c.pooled, d.pooled)


@torch.no_grad()
def test_dummy_inputs_give_241_tokens(tiny):
    x = tiny.dummy_inputs(2)
    assert x["pixel_values"].shape == (2, 3, 320, 640) and x["input_ids"].shape == (2, 40)
    state = tiny.embed(**x)
    assert state.streams["joint"].shape == (2, 241, 32)  # 40 text + 1 image CLS + 10 x 20 patches
    assert state.masks["joint"].eq(1).all() and state.extra["num_text"] == 40
    assert torch.equal(tiny.dummy_inputs(2)["pixel_values"], x["pixel_values"])  # seeded


def test_paper_config():
    c = vilt_config()
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.patch_size,
            c.max_position_embeddings) == (768, 12, 12, 3072, 32, 40)


def test_vit_layer_converter_names():
    torch.manual_seed(0)
    sd = ViltModel(vilt_config(**TINY)).state_dict()
    st = vit_layer_state(sd, "encoder.layer.2")
    assert torch.equal(st["attn.k.weight"], sd["encoder.layer.2.attention.attention.key.weight"])
    assert torch.equal(st["attn_norm.weight"], sd["encoder.layer.2.layernorm_before.weight"])
    assert torch.equal(st["ffn_norm.bias"], sd["encoder.layer.2.layernorm_after.bias"])
    # qkv_bias=False checkpoints: zero biases, the same function
    no_bias = {k: v for k, v in sub(sd, "encoder.layer.2.").items() if not k.endswith(("query.bias", "key.bias"))}
    assert vit_layer_state(no_bias)["attn.q.bias"].abs().sum() == 0


def sub(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def test_bad_inputs(tiny):
    x = _inputs()
    with pytest.raises(ValueError, match="batch sizes differ"):
        tiny.embed(input_ids=x["input_ids"][:2], pixel_values=x["pixel_values"])
    with pytest.raises(ValueError, match="exceed max_position_embeddings=40"):
        tiny.embed(input_ids=torch.ones(1, 41, dtype=torch.long), pixel_values=x["pixel_values"][:1])


# ---------------------------------------------------------------------- protocol
def test_slice_equals_forward(tiny, protocol_checks):
    protocol_checks.slice_whole_equals_forward(tiny, _inputs())


def test_split_slices(tiny, protocol_checks):
    protocol_checks.split_equals_whole(tiny, _inputs())


def test_unit_outputs(tiny, protocol_checks):
    out = protocol_checks.unit_outputs(tiny, _inputs())
    assert_close(tiny.norm(out.unit_outputs["En2"]), out.sequences["joint"])  # final LayerNorm
    assert [u.modality for u in tiny.units] == ["joint"] * 3


def test_attention_maps(tiny, protocol_checks):
    out = protocol_checks.attentions(tiny, _inputs())
    assert out.attentions["En1"][0].shape == (3, 4, 25, 25)


def test_replace_unit(tiny, protocol_checks):
    protocol_checks.replace_roundtrip(tiny, _inputs(), "En0")


def test_unknown_unit(tiny, protocol_checks):
    protocol_checks.unknown_unit(tiny)


def test_from_hf_is_a_copy():
    torch.manual_seed(3)
    hf = ViltModel(vilt_config(**TINY)).eval()
    ours = ViltBackbone.from_hf(hf)
    with torch.no_grad():
        ours.embeddings.cls_token.fill_(1.0)
    assert not torch.equal(hf.embeddings.cls_token, ours.embeddings.cls_token)


def test_direct_construction_matches_hf_shapes():
    cfg = vilt_config(**TINY)
    ours, hf = ViltBackbone(cfg), ViltModel(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    loaded = ViltBackbone.from_hf(hf)
    assert [tuple(p.shape) for p in loaded.parameters()] == [tuple(p.shape) for p in ours.parameters()]
