"""T5 backbone (``t5-base``) against HF ``T5Model``."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Model

from vlkit.models import build
from vlkit.models.protocol import UnknownNameError
from vlkit.models.t5 import T5Backbone, t5_config


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48, head_dim=8,
            vocab_size=101, relative_attention_num_buckets=8, relative_attention_max_distance=16)


def _inputs(batch=3, n=21, m=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, 15:] = 0
    dec = torch.randint(0, 101, (batch, m), generator=g)
    dmask = torch.ones(batch, m, dtype=torch.long)
    dmask[2, 11:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dmask}


@pytest.fixture(scope="module")
def tiny():
    return build("t5-base", **TINY)


@pytest.fixture(scope="module")
def tiny_hf_pair(tmp_path_factory):
    torch.manual_seed(1)
    hf = T5Model(t5_config(**TINY)).eval()
    folder = tmp_path_factory.mktemp("t5")
    hf.save_pretrained(folder)
    return hf, build("t5-base", weights=folder)


@torch.no_grad()
def test_equals_hf_t5_encoder_and_decoder(tiny_hf_pair):
    hf, ours = tiny_hf_pair
    x = _inputs()
    ref, out = hf(**x), ours(**x)
    assert_close(out.sequences["enc"], ref.encoder_last_hidden_state)
    assert_close(out.sequences["dec"], ref.last_hidden_state)
    # pooled = mean of the final decoder states over real decoder tokens
    assert_close(out.pooled[2], ref.last_hidden_state[2, :11].mean(0))
    assert_close(out.pooled[0], ref.last_hidden_state[0].mean(0))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())


@torch.no_grad()
def test_bias_survives_replacing_enc0(tiny_hf_pair):
    """Enc0 replaced by an identity == HF with block 0's attention and FFN outputs zeroed
    (block 0 then passes x through but still hands its relative bias to blocks 1..)."""
    hf, _ = tiny_hf_pair
    hf0 = T5Model(hf.config).eval()
    hf0.load_state_dict(hf.state_dict())
    ours = T5Backbone.from_hf(hf0)
    blk = hf0.encoder.block[0]
    blk.layer[0].SelfAttention.o.weight.zero_()
    blk.layer[-1].DenseReluDense.wo.weight.zero_()

    class Skip(torch.nn.Module):
        def forward(self, x, ctx=None):
            return x

    ours.replace_unit("Enc0", Skip())
    x = _inputs()
    ref, out = hf0(**x), ours(**x)
    assert_close(out.sequences["enc"], ref.encoder_last_hidden_state)
    assert_close(out.sequences["dec"], ref.last_hidden_state)


@torch.no_grad()
def test_relative_bias_matches_library(tiny_hf_pair):
    hf, ours = tiny_hf_pair
    state = ours.embed(**_inputs())
    enc_ref = hf.encoder.block[0].layer[0].SelfAttention.compute_bias(21, 21)
    assert_close(state.extra["bias:enc"], enc_ref)
    dec = state.extra["bias:dec"]
    dec_ref = hf.decoder.block[0].layer[0].SelfAttention.compute_bias(17, 17)
    lower = torch.ones(17, 17, dtype=torch.bool).tril()
    assert_close(dec[..., lower], dec_ref[..., lower])
    assert (dec[..., ~lower] == torch.finfo(dec.dtype).min).all()  # causal mask folded in
    assert not hasattr(ours.unit("Enc0").block.layer[0].SelfAttention, "relative_attention_bias")


@torch.no_grad()
def test_decoder_is_causal(tiny):
    x = _inputs()
    y = dict(x)
    y["decoder_input_ids"] = x["decoder_input_ids"].clone()
    y["decoder_input_ids"][:, 9:] = (y["decoder_input_ids"][:, 9:] + 1) % 101
    a, b = tiny(**x).sequences["dec"], tiny(**y).sequences["dec"]
    assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_units_streams_and_specs(tiny):
    assert tiny.unit_names == ["Enc0", "Enc1", "Dec0", "Dec1"]
    assert [s.stream for s in tiny.specs] == ["enc", "enc", "dec", "dec"]
    assert [s.context for s in tiny.specs] == [None, None, "enc", "enc"]
    assert {u.modality for u in tiny.units} == {"text"}


def test_t5_base_config():
    c = t5_config()
    assert (c.d_model, c.d_ff, c.num_layers, c.num_decoder_layers, c.num_heads, c.d_kv, c.vocab_size) == (
        768, 3072, 12, 12, 12, 64, 32128)
    assert t5_config(num_hidden_layers=3).num_decoder_layers == 3
    assert t5_config(num_layers=3, num_decoder_layers=1).num_decoder_layers == 1
    with pytest.raises(UnknownNameError, match="num_layer"):
        t5_config(num_layer=3)


def test_dummy_inputs(tiny):
    x = tiny.dummy_inputs(2)
    assert x["input_ids"].shape == x["decoder_input_ids"].shape == (2, 128)
    assert torch.equal(tiny.dummy_inputs(2)["input_ids"], x["input_ids"])


@torch.no_grad()
def test_default_decoder_input_is_start_token(tiny):
    x = _inputs()
    out = tiny(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
    start = torch.zeros(3, 1, dtype=torch.long)
    ref = tiny(input_ids=x["input_ids"], attention_mask=x["attention_mask"], decoder_input_ids=start)
    assert out.sequences["dec"].shape == (3, 1, 32)
    assert torch.equal(out.pooled, ref.pooled)


# ---------------------------------------------------------------------- protocol
def test_slice_equals_forward(tiny, protocol_checks):
    protocol_checks.slice_whole_equals_forward(tiny, _inputs())


def test_split_slices(tiny, protocol_checks):
    """Includes the split right after the encoder (k = 2), where the final encoder norm runs."""
    protocol_checks.split_equals_whole(tiny, _inputs())


def test_unit_outputs(tiny, protocol_checks):
    out = protocol_checks.unit_outputs(tiny, _inputs())
    assert_close(tiny.enc_norm(out.unit_outputs["Enc1"]), out.sequences["enc"])
    assert_close(tiny.dec_norm(out.unit_outputs["Dec1"]), out.sequences["dec"])


def test_attention_maps(tiny, protocol_checks):
    out = protocol_checks.attentions(tiny, _inputs())
    self_map, cross_map = out.attentions["Dec0"]
    assert self_map.shape == (3, 4, 17, 17) and cross_map.shape == (3, 4, 17, 21)
    assert torch.all(self_map.triu(1) == 0)  # causal
    assert cross_map[1, :, :, 15:].max() < 1e-6  # encoder padding
    assert len(out.attentions["Enc0"]) == 1


def test_replace_unit(tiny, protocol_checks):
    protocol_checks.replace_roundtrip(tiny, _inputs(), "Enc1")
    protocol_checks.replace_roundtrip(tiny, _inputs(), "Dec0")


def test_unknown_unit(tiny, protocol_checks):
    protocol_checks.unknown_unit(tiny)
