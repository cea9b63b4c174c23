"""xvlm-clip and xvlm-clip-small: structure at paper size (meta device), equivalence of the towers
with Hugging Face CLIP / BERT, the text-side fusion, the protocol on a tiny configuration, and
EfficientVLM's student layer map."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (BertConfig, BertLayer, BertModel, CLIPConfig, CLIPModel, CLIPVisionConfig,
                          CLIPVisionModel)

from vlkit.models import build
from vlkit.models.convert import bert_layer_state, load_layer
from vlkit.models.protocol import UnitContext, UnknownNameError
from vlkit.models.towers import count_params, init_bert_style
from vlkit.models.xvlm import XVLM, build_xvlm_clip, build_xvlm_clip_small, student_layer_map, student_unit_map

# vision width != text width, so the fusion's cross-attention must read the vision width
TINY = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=48, vision_layers=2,
            vocab_size=99, text_dim=32, text_heads=4, text_ffn_dim=64, text_layers=2, fusion_layers=2,
            max_positions=20, bos_token_id=2, eos_token_id=3, embed_dim=16, text_len=7)


def assert_close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def assert_outputs_equal(o1, o2):
    assert_close(o1.pooled, o2.pooled)
    assert set(o1.sequences) == set(o2.sequences)
    for k in o1.sequences:
        assert_close(o1.sequences[k], o2.sequences[k])


def tiny(**kw) -> XVLM:
    """A tiny XVLM; without checkpoint its weights are re-drawn with std 0.3 (BERT's 0.02 makes
    tiny layers near-identities, too weak for "this unit changes the output" checks)."""
    model = build_xvlm_clip(**{**TINY, **kw}).eval()
    if kw.get("weights") is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(kw.get("seed", 0))
            init_bert_style(model, std=0.3)
    return model


def padded_inputs(model: XVLM, batch: int = 2) -> dict:
    inputs = model.dummy_inputs(batch)
    inputs["input_ids"][1, -2:] = model.config.pad_token_id
    inputs["attention_mask"][1, -2:] = 0
    return inputs


class Garbage(nn.Module):
    def forward(self, x, ctx=None):
        return x * 3.0 + 1.0


@pytest.fixture(scope="module")
def paper():
    with torch.device("meta"):
        return build("xvlm-clip"), build("xvlm-clip-small")


@pytest.fixture(scope="module")
def model():
    return tiny()


# ----------------------------------------------------------------------------- paper size
def names(v, t, f):
    return [f"VEn{i}" for i in range(v)] + [f"LEn{i}" for i in range(t)] + [f"F{i}" for i in range(f)]


def test_paper_unit_names_order_and_specs(paper):
    teacher, student = paper
    assert teacher.unit_names == names(12, 6, 6)
    assert student.unit_names == names(6, 3, 3)
    assert type(student) is type(teacher) is XVLM
    assert (teacher.preset, student.preset) == ("xvlm-clip", "xvlm-clip-small")
    for m in paper:
        assert [len(m.units_of(x)) for x in ("vision", "text", "fusion")] == [
            m.config.vision_layers, m.config.text_layers, m.config.fusion_layers]
        for name in m.units_of("fusion"):
            s = m.spec(name)
            assert (s.modality, s.stream, s.context, s.depth) == ("fusion", "text", "vision", None)
        assert {m.spec(n).stream for n in m.units_of("vision")} == {"vision"}
        assert {m.spec(n).stream for n in m.units_of("text")} == {"text"}
    assert teacher.unit("VEn0").norm == "pre" and teacher.unit("VEn0").ffn.act_name == "quick_gelu"
    assert teacher.unit("LEn0").norm == "post" and teacher.unit("LEn0").cross_attn is None
    assert teacher.unit("F0").cross_attn.k.in_features == 768


def test_paper_shapes(paper):
    for m in paper:
        inputs = m.dummy_inputs(2)
        assert inputs["pixel_values"].shape == (2, 3, 224, 224)
        assert inputs["input_ids"].shape == (2, 35)
        out = m(**inputs)  # meta device: shapes only
        assert out.sequences["vision"].shape == (2, 197, 768)
        assert out.sequences["text"].shape == (2, 35, 768)
        assert out.pooled.shape == (2, 768)
        assert m.encode_image(inputs["pixel_values"]).shape == m.encode_text(inputs["input_ids"]).shape == (2, 256)


def test_paper_parameter_counts_match_hf(paper):
    """Vision == HF CLIPVisionModel (embeddings, pre_layrnorm, layers, post_layernorm); text ==
    HF BertModel with the text layers (no pooler); each fusion unit == HF BertLayer with
    cross-attention; pooler == BertPooler; contrastive projections 768 -> 256 by hand."""
    for m in paper:
        c = m.config
        parts = m.parts()
        with torch.device("meta"):
            clip = CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=768,
                                                    intermediate_size=3072, num_hidden_layers=c.vision_layers,
                                                    num_attention_heads=12))
            bert = BertModel(BertConfig(num_hidden_layers=c.text_layers), add_pooling_layer=False)
            layer = BertLayer(BertConfig(is_decoder=True, add_cross_attention=True))
        assert count_params(parts["vision"]) == count_params([clip])
        assert count_params(parts["text"]) == count_params([bert])
        assert count_params(parts["fusion"]) == c.fusion_layers * count_params([layer]) + 768 * 768 + 768
        assert count_params(parts["contrastive"]) == 2 * (768 * 256 + 256)
        ids = [id(p) for ms in parts.values() for mod in ms for p in mod.parameters()]
        assert len(ids) == len(set(ids)) == len(list(m.parameters()))


# ----------------------------------------------------------------------------- HF equivalence
@pytest.fixture(scope="module")
def hf_towers(tmp_path_factory):
    """Tiny HF CLIP vision model and 4-layer BERT (2 text + 2 fusion), saved as a weights folder."""
    torch.manual_seed(3)
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=24, intermediate_size=48,
                                            num_hidden_layers=2, num_attention_heads=4)).eval()
    bert = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=20)).eval()
    root = tmp_path_factory.mktemp("xvlm_weights")
    clip.save_pretrained(root / "vision")
    bert.save_pretrained(root / "text")
    return root, clip, bert


@pytest.fixture(scope="module")
def loaded(hf_towers):
    return tiny(weights=hf_towers[0])


@torch.no_grad()
def test_vision_tower_equals_hf_clip(hf_towers, loaded):
    _, clip, _ = hf_towers
    inputs = loaded.dummy_inputs(2)
    ref = clip(pixel_values=inputs["pixel_values"])
    out = loaded(output_units=True, **inputs)
    assert_close(out.unit_outputs["VEn1"], ref.last_hidden_state)
    # X-VLM's CLIPVisionTransformer applies post_layernorm to every token before the fusion
    assert_close(out.sequences["vision"], clip.post_layernorm(ref.last_hidden_state))
    feats = loaded.vision_proj(ref.pooler_output)
    assert_close(loaded.encode_image(inputs["pixel_values"]), F.normalize(feats, dim=-1))


@torch.no_grad()
def test_text_tower_equals_first_bert_layers(hf_towers, loaded):
    _, _, bert = hf_towers
    inputs = padded_inputs(loaded)
    ref = bert(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], output_hidden_states=True)
    out = loaded(output_units=True, **inputs)
    keep = inputs["attention_mask"].bool()
    assert_close(out.unit_outputs["LEn0"][keep], ref.hidden_states[1][keep])
    assert_close(out.unit_outputs["LEn1"][keep], ref.hidden_states[2][keep])
    cls = ref.hidden_states[2][:, 0]
    assert_close(loaded.encode_text(inputs["input_ids"], inputs["attention_mask"]),
                 F.normalize(loaded.text_proj(cls), dim=-1))


@torch.no_grad()
def test_full_clip_checkpoint_as_vision_folder(tmp_path, hf_towers):
    """``vision/`` may hold a whole CLIPModel (as openai/clip-vit-base-patch16 ships)."""
    torch.manual_seed(5)
    vision = dict(image_size=32, patch_size=16, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    clip = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)).eval()
    clip.save_pretrained(tmp_path / "vision")
    shutil.copytree(hf_towers[0] / "text", tmp_path / "text")
    model = tiny(weights=tmp_path)
    px = model.dummy_inputs(2)["pixel_values"]
    assert_close(model.vision_features(px)[:, 0], clip.vision_model(pixel_values=px).pooler_output)


def test_fusion_units_start_from_the_next_bert_layers(hf_towers, loaded):
    """F_i's self-attention and FFN are BERT layer text_layers + i; the cross-attention is new;
    the pooler is BERT's."""
    _, _, bert = hf_towers
    for i in range(2):
        ref = bert_layer_state(bert.state_dict(), prefix=f"encoder.layer.{2 + i}.")
        state = loaded.unit(f"F{i}").state_dict()
        for k, v in ref.items():
            assert torch.equal(state[k], v), k
        assert state["cross_attn.k.weight"].shape == (32, 24)
    assert torch.equal(loaded.pooler.dense.weight, bert.pooler.dense.weight)


def test_fusion_layer_equals_hf_bert_cross_layer():
    """F0 == HF BertLayer with cross-attention whose keys/values read the vision width
    (X-VLM's xbert: ``encoder_width = vision_width``)."""
    cfg = BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, is_decoder=True,
                     add_cross_attention=True, attn_implementation="eager")
    torch.manual_seed(4)
    hf = BertLayer(cfg).eval()
    for proj in ("key", "value"):  # xbert: nn.Linear(config.encoder_width, all_head_size)
        setattr(hf.crossattention.self, proj, nn.Linear(24, 32))
    layer = load_layer(tiny().unit("F0"), bert_layer_state(hf.state_dict()))
    x, c = torch.randn(2, 7, 32), torch.randn(2, 5, 24)
    mask = torch.ones(2, 7)
    mask[1, -2:] = 0
    add = (1.0 - mask)[:, None, None, :] * torch.finfo(torch.float32).min
    with torch.no_grad():
        ref = hf(x, attention_mask=add, encoder_hidden_states=c, encoder_attention_mask=torch.zeros(2, 1, 1, 5))
        ours = layer(x, UnitContext(mask=mask, context=c))
    assert_close(ours, ref)


@torch.no_grad()
def test_fusion_by_hand_equals_backbone(model):
    inputs = padded_inputs(model)
    mask = inputs["attention_mask"]
    out = model(output_units=True, **inputs)
    y = model.vision_norm(out.unit_outputs["VEn1"])
    x = out.unit_outputs["LEn1"]
    for i in range(2):
        x = model.unit(f"F{i}")(x, UnitContext(mask=mask, context=y))
        assert_close(out.unit_outputs[f"F{i}"], x)
    assert_close(out.sequences["text"], x)
    assert_close(out.sequences["vision"], y)
    assert_close(out.pooled, torch.tanh(model.pooler.dense(x[:, 0])))


# ----------------------------------------------------------------------------- protocol
@torch.no_grad()
def test_run_units_every_cut_point(model):
    inputs = padded_inputs(model)
    ref = model(**inputs)
    unit_names, n = model.unit_names, len(model.unit_names)
    state = model.embed(**inputs)
    for k in range(n + 1):
        assert_outputs_equal(model.finalize(model.run_units(model.run_units(state, 0, k), k, n)), ref)
        if k < n:
            prefix = model.run_units(state, None, unit_names[k]).detach()
            assert_outputs_equal(model.finalize(model.run_units(prefix, unit_names[k], None)), ref)


def test_protocol_checks(model, protocol_checks):
    inputs = padded_inputs(model)
    protocol_checks.slice_whole_equals_forward(model, inputs)
    protocol_checks.unit_outputs(model, inputs)
    protocol_checks.unknown_unit(model)
    for name in ("VEn1", "LEn0", "F1"):
        protocol_checks.replace_roundtrip(model, inputs, name)


@torch.no_grad()
def test_attention_maps(model, protocol_checks):
    inputs = padded_inputs(model)
    out = protocol_checks.attentions(model, inputs)
    for name in model.units_of("vision"):
        assert [m.shape for m in out.attentions[name]] == [(2, 4, 5, 5)]
    for name in model.units_of("text"):
        assert [m.shape for m in out.attentions[name]] == [(2, 4, 7, 7)]
    for name in model.units_of("fusion"):  # self-attention, then cross-attention to the image
        assert [m.shape for m in out.attentions[name]] == [(2, 4, 7, 7), (2, 4, 7, 5)]


@torch.no_grad()
def test_encoders_use_only_their_tower(model):
    inputs = padded_inputs(model)
    px, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    img, txt = model.encode_image(px), model.encode_text(ids, mask)
    assert img.shape == txt.shape == (2, 16)
    assert_close(img.norm(dim=-1), torch.ones(2))
    assert_close(txt.norm(dim=-1), torch.ones(2))
    m = tiny()
    for name in ("LEn0", "F0"):
        m.replace_unit(name, Garbage())
    assert torch.equal(m.encode_image(px), img)
    assert not torch.allclose(m.encode_text(ids, mask), txt)
    m = tiny()
    for name in ("VEn0", "F1"):
        m.replace_unit(name, Garbage())
    assert torch.equal(m.encode_text(ids, mask), txt)
    assert not torch.allclose(m.encode_image(px), img)
    # padding is invisible to the text encoder
    ids2 = ids.clone()
    ids2[1, -2:] = 50
    assert_close(model.encode_text(ids2, mask), txt)


def test_small_is_the_same_class_with_fewer_layers():
    small = build_xvlm_clip_small(**{k: v for k, v in TINY.items() if not k.endswith("_layers")})
    assert type(small) is XVLM
    assert small.unit_names == names(6, 3, 3)
    assert build_xvlm_clip_small(**TINY).unit_names == names(2, 2, 2)  # overrides win


# ----------------------------------------------------------------------------- layer map
def test_student_layer_map():
    assert student_layer_map(3, 6) == [1, 3, 5]
    assert student_layer_map(6, 12) == [1, 3, 5, 7, 9, 11]
    assert student_layer_map(1, 2) == [1]
    for n in range(1, 9):
        m = student_layer_map(n, 2 * n)
        assert m[-1] == 2 * n - 1 and len(set(m)) == n  # last to last, one-to-one
    for bad in [(3, 7), (3, 5), (6, 6), (0, 0), (-1, -2)]:
        with pytest.raises(ValueError, match=str(bad[1])):
            student_layer_map(*bad)
    with pytest.raises(ValueError, match="n_teacher=12"):
        student_layer_map(6, 11)


def test_student_unit_map(paper):
    teacher, student = paper
    m = student_unit_map(student, teacher)
    assert m == {**{f"VEn{i}": f"VEn{2 * i + 1}" for i in range(6)},
                 **{f"LEn{i}": f"LEn{2 * i + 1}" for i in range(3)},
                 **{f"F{i}": f"F{2 * i + 1}" for i in range(3)}}
    with pytest.raises(ValueError, match="vision units"):
        student_unit_map(teacher, teacher)


# ----------------------------------------------------------------------------- building, bad input
def test_seeded_build():
    a, b, c = (build_xvlm_clip(**TINY, **kw) for kw in ({}, {}, {"seed": 7}))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["vision_proj.weight"], sc["vision_proj.weight"])


def test_bad_input(tmp_path, hf_towers, model):
    with pytest.raises(UnknownNameError, match="fusion_layer") as err:
        build("xvlm-clip", fusion_layer=2)
    assert "fusion_layers" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing"):
        tiny(weights=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="vision/ and text/"):
        tiny(weights=tmp_path)
    with pytest.raises(ValueError, match="text .*layers"):  # 4 BERT layers for 2 + 3 units
        tiny(weights=hf_towers[0], fusion_layers=3)
    with pytest.raises(ValueError, match="layers must be >= 0"):
        tiny(text_layers=-1)
    with pytest.raises(ValueError, match="batch"):
        inputs = model.dummy_inputs(2)
        model.embed(inputs["pixel_values"][:1], inputs["input_ids"])
