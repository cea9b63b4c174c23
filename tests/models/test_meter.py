"""meter-clip16-roberta: structure at paper size (on the meta device: no memory, no time),
equivalence of the towers with Hugging Face CLIP / RoBERTa, METER's co-attention semantics,
and the protocol (slicing, attention maps, single-tower encoders) on a tiny configuration."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertLayer, CLIPVisionConfig, CLIPVisionModel, RobertaConfig, RobertaModel

from vlkit.models import build
from vlkit.models.convert import bert_layer_state, load_layer
from vlkit.models.meter import METER, build_meter_clip16_roberta
from vlkit.models.protocol import UnitContext, UnknownNameError
from vlkit.models.towers import count_params, init_bert_style, interpolate_position_embedding



def assert_close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def assert_outputs_equal(o1, o2):
    assert_close(o1.pooled, o2.pooled)
    assert set(o1.sequences) == set(o2.sequences)
    for k in o1.sequences:
        assert_close(o1.sequences[k], o2.sequences[k])


# different widths per part, so a transform or a context width cannot be confused
TINY = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=48, vision_layers=2,
            text_dim=40, text_heads=4, text_ffn_dim=80, text_layers=2, vocab_size=99, max_positions=20,
            hidden_dim=32, fusion_heads=4, fusion_ffn_dim=64, fusion_layers=3, text_len=7)


def tiny(**kw) -> METER:
    """A tiny METER; without checkpoint its weights are re-drawn with std 0.3 (BERT's 0.02 makes
    tiny layers near-identities, too weak for "this unit changes the output" checks)."""
    model = build_meter_clip16_roberta(**{**TINY, **kw}).eval()
    if kw.get("weights") is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(kw.get("seed", 0))
            init_bert_style(model, std=0.3)
    return model


def padded_inputs(model: METER, batch: int = 2) -> dict:
    """Dummy inputs whose second row ends in two padding tokens (RoBERTa pad id 1)."""
    inputs = model.dummy_inputs(batch)
    inputs["input_ids"][1, -2:] = model.config.pad_token_id
    inputs["attention_mask"][1, -2:] = 0
    return inputs


@pytest.fixture(scope="module")
def paper():
    with torch.device("meta"):
        return build("meter-clip16-roberta")


@pytest.fixture(scope="module")
def model():
    return tiny()


# ----------------------------------------------------------------------------- paper size
def test_paper_unit_names_order_and_specs(paper):
    names = [f"VEn{i}" for i in range(12)] + [f"LEn{i}" for i in range(12)]
    names += [n for i in range(6) for n in (f"FL{i}", f"FV{i}")]
    assert paper.unit_names == names
    assert paper.units_of("vision") == names[:12]
    assert paper.units_of("text") == names[12:24]
    assert paper.units_of("fusion") == names[24:]
    for i in range(6):
        fl, fv = paper.spec(f"FL{i}"), paper.spec(f"FV{i}")
        assert (fl.stream, fl.context, fl.depth) == ("text", "vision", i)
        assert (fv.stream, fv.context, fv.depth) == ("vision", "text", i)
    assert {paper.spec(n).stream for n in names[:12]} == {"vision"}
    assert {paper.spec(n).stream for n in names[12:24]} == {"text"}
    assert paper.preset == "meter-clip16-roberta"


def test_paper_layer_layout(paper):
    ven, len_, fl = paper.unit("VEn0"), paper.unit("LEn0"), paper.unit("FL0")
    assert (ven.norm, ven.ffn.act_name, ven.attn.num_heads, ven.ffn.fc1.out_features) == ("pre", "quick_gelu", 12, 3072)
    assert (len_.norm, len_.ffn.act_name, len_.cross_attn) == ("post", "gelu", None)
    assert (fl.norm, fl.ffn.act_name, fl.cross_attn.num_heads) == ("post", "gelu", 12)
    assert paper.text_embeddings.word_embeddings.num_embeddings == 50265


def test_paper_shapes(paper):
    inputs = paper.dummy_inputs(2)
    assert inputs["pixel_values"].shape == (2, 3, 384, 384)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (2, 40)
    out = paper(**inputs)  # on the meta device: shapes only
    assert out.sequences["vision"].shape == (2, 577, 768)  # 24 x 24 patches + CLS
    assert out.sequences["text"].shape == (2, 40, 768)
    assert out.pooled.shape == (2, 1536)


def test_paper_parameter_counts_match_hf(paper):
    """Vision tower == HF CLIPVisionModel (embeddings, pre_layrnorm, 12 layers, post_layernorm);
    text tower == HF RobertaModel(add_pooling_layer=False); fusion counted by hand from HF's
    BertLayer with cross-attention."""
    parts = paper.parts()
    with torch.device("meta"):
        clip = CLIPVisionModel(CLIPVisionConfig(image_size=384, patch_size=16, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12))
        roberta = RobertaModel(RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                                             layer_norm_eps=1e-5), add_pooling_layer=False)
        cross_layer = BertLayer(BertConfig(is_decoder=True, add_cross_attention=True))
    assert count_params(parts["vision"]) == count_params([clip])
    assert count_params(parts["text"]) == count_params([roberta])
    d = 768
    # 12 cross layers, 2 transforms, 2 token types, 2 poolers
    fusion = 12 * count_params([cross_layer]) + 2 * (d * d + d) + 2 * d + 2 * (d * d + d)
    assert count_params(parts["fusion"]) == fusion
    # the parts cover every parameter exactly once
    ids = [id(p) for ms in parts.values() for m in ms for p in m.parameters()]
    assert len(ids) == len(set(ids)) == len(list(paper.parameters()))


# ----------------------------------------------------------------------------- HF equivalence
@pytest.fixture(scope="module")
def hf_towers(tmp_path_factory):
    """Tiny HF CLIP vision + RoBERTa models (seeded) saved as a METER weights folder."""
    torch.manual_seed(1)
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=24, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4)).eval()
    roberta = RobertaModel(RobertaConfig(vocab_size=99, hidden_size=40, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=80, max_position_embeddings=20, type_vocab_size=1,
                                         layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2),
                           add_pooling_layer=False).eval()
    root = tmp_path_factory.mktemp("meter_weights")
    clip.save_pretrained(root / "vision")
    roberta.save_pretrained(root / "text")
    return root, clip, roberta


@torch.no_grad()
def test_vision_tower_equals_hf_clip(hf_towers):
    root, clip, _ = hf_towers
    model = tiny(weights=root)
    inputs = model.dummy_inputs(2)
    ref = clip(pixel_values=inputs["pixel_values"])
    out = model(output_units=True, **inputs)
    assert_close(out.unit_outputs["VEn1"], ref.last_hidden_state)
    assert_close(model.encode_image(inputs["pixel_values"]), ref.pooler_output)  # post_layernorm(CLS)
    assert_close(model.vision_features(inputs["pixel_values"]), clip.post_layernorm(ref.last_hidden_state))


@torch.no_grad()
def test_text_tower_equals_hf_roberta(hf_towers):
    root, _, roberta = hf_towers
    model = tiny(weights=root)
    inputs = padded_inputs(model)
    ref = roberta(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    out = model(output_units=True, **inputs)
    keep = inputs["attention_mask"].bool()
    assert_close(out.unit_outputs["LEn1"][keep], ref[keep])
    assert_close(model.encode_text(inputs["input_ids"], inputs["attention_mask"]), ref[:, 0])


def test_fusion_layer_equals_hf_bert_cross_layer(model):
    """FL0 is BERT's cross layer (METER's BertCrossLayer): self-attn -> cross-attn -> FFN, post-norm."""
    cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, is_decoder=True,
                     add_cross_attention=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation="eager")
    torch.manual_seed(2)
    hf = BertLayer(cfg).eval()
    layer = load_layer(tiny().unit("FL0"), bert_layer_state(hf.state_dict()))
    x, c = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = torch.ones(2, 7)
    mask[1, -2:] = 0
    add = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
    with torch.no_grad():
        ref = hf(x, attention_mask=add, encoder_hidden_states=c, encoder_attention_mask=torch.zeros(2, 1, 1, 5))
        ours = layer(x, UnitContext(mask=mask, context=c))
    assert_close(ours, ref)


def test_position_table_interpolation():
    w = torch.randn(1 + 4, 6)
    assert torch.equal(interpolate_position_embedding(w, 4), w)
    up = interpolate_position_embedding(w, 16)
    assert up.shape == (17, 6) and torch.equal(up[0], w[0])
    const = torch.ones(5, 6)  # bicubic interpolation of a constant grid stays constant
    assert_close(interpolate_position_embedding(const, 36), torch.ones(37, 6))
    with pytest.raises(ValueError, match="square"):
        interpolate_position_embedding(torch.randn(6, 6), 16)


@torch.no_grad()
def test_weights_at_another_resolution_interpolate_positions(hf_towers):
    root, clip, _ = hf_towers  # a 32-px checkpoint (2 x 2 grid) into a 64-px model (4 x 4 grid)
    model = tiny(weights=root, image_size=64)
    table = clip.embeddings.position_embedding.weight
    assert torch.equal(model.vision_embeddings.position_embedding.weight, interpolate_position_embedding(table, 16))
    assert model(**model.dummy_inputs()).sequences["vision"].shape == (1, 17, 32)


# ----------------------------------------------------------------------------- co-attention
@torch.no_grad()
def test_fusion_by_hand_equals_backbone(model):
    """METER's infer(): transforms + token types, then per depth
    x1 = text_layer(x, y); y1 = image_layer(y, x); x, y = x1, y1; cls_feats = cat(poolers)."""
    inputs = padded_inputs(model)
    mask = inputs["attention_mask"]
    out = model(output_units=True, **inputs)
    types = model.token_type_embeddings.weight
    y = model.image_transform(model.vision_norm(out.unit_outputs["VEn1"])) + types[1]
    x = model.text_transform(out.unit_outputs["LEn1"]) + types[0]
    for i in range(3):
        x1 = model.unit(f"FL{i}")(x, UnitContext(mask=mask, context=y, context_mask=None))
        y1 = model.unit(f"FV{i}")(y, UnitContext(mask=None, context=x, context_mask=mask))
        x, y = x1, y1
        assert_close(out.unit_outputs[f"FL{i}"], x)
        assert_close(out.unit_outputs[f"FV{i}"], y)
    assert_close(out.sequences["text"], x)
    assert_close(out.sequences["vision"], y)
    assert_close(out.pooled, torch.cat([model.text_pooler(x), model.image_pooler(y)], -1))
    assert out.pooled.shape == (2, 64)


class Garbage(nn.Module):
    def forward(self, x, ctx=None):
        return x * 3.0 + 1.0


@pytest.mark.parametrize("depth", [0, 1, 2])
@torch.no_grad()
def test_image_side_reads_text_from_before_its_depth(depth):
    """FV_i reads the depth-(i-1) text stream: replacing FL_i cannot change FV_i's output,
    though it changes everything after."""
    model = tiny()
    inputs = model.dummy_inputs(2)
    ref = model(output_units=True, **inputs).unit_outputs
    model.replace_unit(f"FL{depth}", Garbage())
    got = model(output_units=True, **inputs).unit_outputs
    assert torch.equal(got[f"FV{depth}"], ref[f"FV{depth}"])
    assert not torch.allclose(got[f"FL{depth}"], ref[f"FL{depth}"])
    if depth < 2:
        assert not torch.allclose(got[f"FV{depth + 1}"], ref[f"FV{depth + 1}"])


@torch.no_grad()
def test_order_within_a_depth_does_not_matter(model):
    """Running FV_i before FL_i (through the protocol's run_unit) gives METER's result too."""
    inputs = padded_inputs(model)
    ref = model(**inputs)
    state = model.run_units(model.embed(**inputs), 0, "FL0")
    for i in range(3):
        model.run_unit(model.index(f"FV{i}"), state)
        model.run_unit(model.index(f"FL{i}"), state)
    assert_outputs_equal(model.finalize(state), ref)


@torch.no_grad()
def test_padding_is_invisible(model):
    """Token ids under mask 0 change neither the real tokens' outputs nor the pooled vector
    (the image side's cross-attention honours the text mask)."""
    a = padded_inputs(model)
    b = {k: v.clone() for k, v in a.items()}
    b["input_ids"][1, -2:] = 50
    oa, ob = model(**a), model(**b)
    keep = a["attention_mask"].bool()
    assert_close(oa.sequences["text"][keep], ob.sequences["text"][keep])
    assert_close(oa.sequences["vision"], ob.sequences["vision"])
    assert_close(oa.pooled, ob.pooled)


# ----------------------------------------------------------------------------- protocol
@torch.no_grad()
def test_run_units_every_cut_point(model):
    inputs = padded_inputs(model)
    ref = model(**inputs)
    names, n = model.unit_names, len(model.unit_names)
    state = model.embed(**inputs)
    for k in range(n + 1):
        by_int = model.finalize(model.run_units(model.run_units(state, 0, k), k, n))
        assert_outputs_equal(by_int, ref)
        if k < n:  # a frozen prefix without graph, then the rest (SHERL / LST style)
            prefix = model.run_units(state, None, names[k]).detach()
            assert_outputs_equal(model.finalize(model.run_units(prefix, names[k], None)), ref)


def test_protocol_checks(model, protocol_checks):
    inputs = padded_inputs(model)
    protocol_checks.slice_whole_equals_forward(model, inputs)
    protocol_checks.unit_outputs(model, inputs)
    protocol_checks.unknown_unit(model)
    for name in ("VEn0", "LEn1", "FL0", "FV2"):
        protocol_checks.replace_roundtrip(model, inputs, name)


@torch.no_grad()
def test_attention_maps(model, protocol_checks):
    inputs = padded_inputs(model)
    out = protocol_checks.attentions(model, inputs)
    for name in model.units_of("vision", "text"):
        assert len(out.attentions[name]) == 1
    for i in range(3):
        fl, fv = out.attentions[f"FL{i}"], out.attentions[f"FV{i}"]
        assert [m.shape for m in fl] == [(2, 4, 7, 7), (2, 4, 7, 5)]  # self, cross (text -> image)
        assert [m.shape for m in fv] == [(2, 4, 5, 5), (2, 4, 5, 7)]  # self, cross (image -> text)
        assert fv[1][1, :, :, -2:].abs().max() < 1e-6  # padded text tokens get no attention


@torch.no_grad()
def test_encoders_use_only_their_tower(model):
    inputs = padded_inputs(model)
    px, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    img, txt = model.encode_image(px), model.encode_text(ids, mask)
    assert img.shape == (2, 24) and txt.shape == (2, 40)
    m = tiny()
    for name in ("LEn0", "FL0", "FV0"):
        m.replace_unit(name, Garbage())
    assert torch.equal(m.encode_image(px), img)
    assert not torch.allclose(m.encode_text(ids, mask), txt)
    m = tiny()
    for name in ("VEn1", "FL0", "FV0"):
        m.replace_unit(name, Garbage())
    assert torch.equal(m.encode_text(ids, mask), txt)
    assert not torch.allclose(m.encode_image(px), img)
    # one image's feature does not depend on the other images or on the text batch
    assert_close(model.encode_image(px[1:]), img[1:])


# ----------------------------------------------------------------------------- building, bad input
def test_seeded_build():
    state = torch.random.get_rng_state()
    a, b, c = (build_meter_clip16_roberta(**TINY, **kw) for kw in ({}, {}, {"seed": 1}))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["image_transform.weight"], sc["image_transform.weight"])
    assert torch.equal(a.dummy_inputs(2)["pixel_values"], b.dummy_inputs(2)["pixel_values"])


def test_zero_layer_towers_still_reach_the_fusion_width():
    m = tiny(vision_layers=0, text_layers=0)
    assert m.unit_names == ["FL0", "FV0", "FL1", "FV1", "FL2", "FV2"]
    out = m(**m.dummy_inputs())
    assert out.sequences["vision"].shape == (1, 5, 32) and out.sequences["text"].shape == (1, 7, 32)


def test_bad_input(tmp_path, hf_towers, model):
    with pytest.raises(UnknownNameError, match="vision_layer") as err:
        build("meter-clip16-roberta", vision_layer=2)
    assert "vision_layers" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tiny(weights=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="vision/ and text/"):
        tiny(weights=tmp_path)
    with pytest.raises(ValueError, match="vision_layers"):  # checkpoint has 2 CLIP layers
        tiny(weights=hf_towers[0], vision_layers=3)
    inputs = model.dummy_inputs()
    with pytest.raises(ValueError, match=r"\(B, C, 32, 32\)"):
        model.embed(torch.zeros(1, 3, 48, 48), inputs["input_ids"])
    with pytest.raises(ValueError, match="batch"):
        model.embed(inputs["pixel_values"], inputs["input_ids"].repeat(2, 1))
    with pytest.raises(ValueError, match="image_token_type_idx=2"):
        model.embed(**inputs, image_token_type_idx=2)
    with pytest.raises(ValueError, match="position"):
        model.embed(inputs["pixel_values"], torch.full((1, 30), 5))
    with pytest.raises(ValueError, match="pad_token_id"):
        tiny(vocab_size=1)
