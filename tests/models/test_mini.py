"""Mini presets from real weights: CellEmbeddings (pixels == cached cells, the formula, bad
input), MiniLM inside vilt-mini / meter-mini / xvlm-mini (weights *and* outputs equal MiniLM's),
the xvlm-mini-half student (units = teacher units 1, 3, 5), the protocol, MACs with and without
the CNN, and strict checkpoint loading."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vlkit import efficiency as eff
from vlkit.models import PRESETS, build
from vlkit.models.cnn import CELL_DIM, cell_features
from vlkit.models.mini import CellEmbeddings, build_xvlm_mini_half
from vlkit.models.protocol import UnknownNameError
from vlkit.models.xvlm import XVLM

MINI = ("vilt-mini", "meter-mini", "xvlm-mini", "xvlm-mini-half")


def assert_close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def same_params(a: torch.nn.Module, b: torch.nn.Module, exclude: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    sa = {k: v for k, v in sa.items() if not k.startswith(exclude)}
    sb = {k: v for k, v in sb.items() if not k.startswith(exclude)}
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def minilm():
    return build("minilm")


@pytest.fixture(scope="module")
def models():
    teacher = build("xvlm-mini")
    return {"vilt-mini": build("vilt-mini"), "meter-mini": build("meter-mini"), "xvlm-mini": teacher,
            "xvlm-mini-half": build("xvlm-mini-half", teacher=teacher)}


def images(n: int = 3, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Random RGB images like the generated sets' (64 x 64 uint8)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def text_inputs(batch: int = 2, n: int = 9, seed: int = 0) -> dict:
    """[CLS] ... [SEP] ids; row 1 ends in two padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30522, (batch, n), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, -2:], mask[1, -2:] = 0, 0
        ids[1, -3] = 102
    return {"input_ids": ids, "attention_mask": mask}


def feats(batch: int = 2, cells: int = 16, seed: int = 1) -> torch.Tensor:
    return 6 * torch.rand(batch, cells, CELL_DIM, generator=torch.Generator().manual_seed(seed))


def inputs_for(name: str, batch: int = 2) -> dict:
    return {**text_inputs(batch), "image_feats": feats(batch)}


# ---------------------------------------------------------------------------- CellEmbeddings
@pytest.fixture(scope="module")
def cells_emb():
    torch.manual_seed(0)
    return CellEmbeddings(dim=32, image_size=128).eval()


def test_cell_embeddings_pixels_equal_cached_cells(cells_emb):
    """The cache is exactly the CNN output: embedding pixels == embedding image_features()."""
    from vlkit.data.features import image_features, to_pixels

    imgs = images(3)
    via_pixels = cells_emb(pixel_values=to_pixels(imgs, 128))
    cached = image_features(imgs, 128)
    assert cached.shape == (3, 16, CELL_DIM) and cached.dtype == torch.float32
    assert_close(via_pixels, cells_emb(image_feats=cached))
    # the float16 cache is what the DVC stage stores: close, not equal
    assert_close(via_pixels, cells_emb(image_feats=cached.half()), atol=2e-2)


def test_cell_embeddings_formula(cells_emb):
    """z = LN([v_cls; W c + b] + E_pos), by hand."""
    c = feats(2)
    e = cells_emb
    tokens = torch.cat([e.cls_token.expand(2, 1, -1), c @ e.proj.weight.T + e.proj.bias], 1)
    want = F.layer_norm(tokens + e.position_embeddings.weight, (32,), e.norm.weight, e.norm.bias, 1e-12)
    assert_close(e(image_feats=c), want)
    assert e(image_feats=c).shape == (2, 1 + 16, 32) and e.num_tokens == 17


def test_cnn_is_not_a_submodule(cells_emb):
    cells_emb(pixel_values=torch.zeros(1, 3, 128, 128))  # builds the frozen CNN
    assert cells_emb._frozen_cnn is not None
    names = [k for k, _ in cells_emb.named_parameters()] + list(cells_emb.state_dict())
    assert not any("conv" in k or "_bn" in k for k in names)
    assert eff.params(cells_emb) == 1280 * 32 + 32 + 32 + 17 * 32 + 2 * 32
    assert not any(p.requires_grad for p in cells_emb._frozen_cnn.parameters()) and not cells_emb._frozen_cnn.training
    cells_emb.train()
    x = torch.full((1, 3, 128, 128), 50.0)
    a = cells_emb(pixel_values=x)  # the CNN stays in eval mode (BatchNorm statistics frozen)
    assert_close(a, cells_emb.eval()(pixel_values=x))


def test_cell_embeddings_bad_input(cells_emb):
    with pytest.raises(ValueError, match="exactly one.*got both"):
        cells_emb(image_feats=feats(1), pixel_values=torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="exactly one.*got neither"):
        cells_emb()
    with pytest.raises(ValueError, match=r"\(B, 16, 1280\).*\(1, 16, 512\)"):
        cells_emb(image_feats=torch.zeros(1, 16, 512))
    with pytest.raises(ValueError, match=r"\(B, 16, 1280\).*\(1, 49, 1280\)"):
        cells_emb(image_feats=torch.zeros(1, 49, 1280))
    with pytest.raises(ValueError, match=r"7x7 cells.*4x4.*image_size=224"):
        cells_emb(pixel_values=torch.zeros(1, 3, 224, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 128, 128\)"):
        cells_emb(pixel_values=torch.zeros(1, 128, 128))


# ---------------------------------------------------------------------------- MiniLM inside
def test_registered():
    for name in MINI:
        assert PRESETS[name].startswith("vlkit.models.mini:")


def test_vilt_mini_is_minilm_inside(models, minilm):
    m = models["vilt-mini"]
    assert m.unit_names == [f"En{i}" for i in range(6)]
    assert same_params(m.text_embeddings, minilm.embeddings)
    assert same_params(m.pooler, minilm.pooler)
    for i in range(6):
        assert same_params(m.unit(f"En{i}"), minilm.unit(f"En{i}"))


@torch.no_grad()
def test_vilt_mini_text_path_equals_minilm(models, minilm):
    """With the text modality embedding zeroed and the image tokens masked out as keys, the text
    tokens' outputs are MiniLM's (text queries then see exactly MiniLM's keys and values)."""
    m = copy.deepcopy(models["vilt-mini"])
    m.modality_embeddings.weight[0].zero_()
    x = inputs_for("vilt-mini")
    state = m.embed(**x)
    n = x["input_ids"].shape[1]
    state.masks["joint"] = state.masks["joint"].clone()
    state.masks["joint"][:, n:] = 0
    out = m.finalize(m.run_units(state))
    ref = minilm(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
    keep = x["attention_mask"].bool()
    assert_close(out.sequences["joint"][:, :n][keep], ref.sequences["text"][keep], atol=1e-4)
    assert_close(out.pooled, minilm.pooler(ref.sequences["text"]), atol=1e-4)
    # the modality embedding does change the real model's output
    assert not torch.allclose(models["vilt-mini"](**x).pooled, m(**x).pooled, atol=1e-4)


@pytest.mark.parametrize("name", ["meter-mini", "xvlm-mini"])
@torch.no_grad()
def test_two_tower_text_tower_equals_minilm(models, minilm, name):
    m = models[name]
    assert same_params(m.text_embeddings, minilm.embeddings)
    for i in range(6):
        assert same_params(m.unit(f"LEn{i}"), minilm.unit(f"En{i}"))
    x = text_inputs()
    keep = x["attention_mask"].bool()
    ref = minilm(**x).sequences["text"]
    assert_close(m.text_features(**x)[keep], ref[keep], atol=1e-4)


def test_meter_mini_fusion_from_minilm_top_layers(models, minilm):
    m = models["meter-mini"]
    assert m.units_of("vision") == ["VEn0", "VEn1"]
    assert m.units_of("fusion") == ["FL0", "FV0", "FL1", "FV1", "FL2", "FV2"]
    for i in range(3):
        for side in ("FL", "FV"):  # self-attention + FFN = MiniLM layer 3 + i; cross-attention random
            assert same_params(m.unit(f"{side}{i}"), minilm.unit(f"En{3 + i}"), exclude=("cross_",))
            assert m.unit(f"{side}{i}").cross_attn.q.weight.std() < 0.03
    assert m(**inputs_for("meter-mini")).pooled.shape == (2, 768)
    fresh = build("meter-mini", fusion_init="random", vision_layers=1, text_layers=1)
    assert not torch.equal(fresh.unit("FL0").attn.q.weight, minilm.unit("En3").attn.q.weight)


def test_xvlm_mini_fusion_is_a_second_minilm(models, minilm):
    m = models["xvlm-mini"]
    assert [len(m.units_of(k)) for k in ("vision", "text", "fusion")] == [6, 6, 6]
    for i in range(6):
        assert same_params(m.unit(f"F{i}"), minilm.unit(f"En{i}"), exclude=("cross_",))
        assert m.unit(f"F{i}").cross_attn.k.in_features == 384
    assert same_params(m.pooler, minilm.pooler)


def test_vision_units_are_random_and_seeded():
    a = build("xvlm-mini", seed=3, text_layers=1, fusion_layers=1, vision_layers=1)
    b = build("xvlm-mini", seed=3, text_layers=1, fusion_layers=1, vision_layers=1)
    c = build("xvlm-mini", seed=4, text_layers=1, fusion_layers=1, vision_layers=1)
    assert same_params(a, b)
    assert not torch.equal(a.unit("VEn0").attn.q.weight, c.unit("VEn0").attn.q.weight)
    assert torch.equal(a.unit("LEn0").attn.q.weight, c.unit("LEn0").attn.q.weight)  # MiniLM either way


# ---------------------------------------------------------------------------- student
def test_xvlm_mini_half_units_are_teacher_units_1_3_5(models):
    s, t = models["xvlm-mini-half"], models["xvlm-mini"]
    assert s.unit_names == ["VEn0", "VEn1", "VEn2", "LEn0", "LEn1", "LEn2", "F0", "F1", "F2"]
    pairs = {"VEn0": "VEn1", "VEn1": "VEn3", "VEn2": "VEn5", "LEn0": "LEn1", "LEn1": "LEn3", "LEn2": "LEn5",
             "F0": "F1", "F1": "F3", "F2": "F5"}
    for su, tu in pairs.items():
        assert same_params(s.unit(su), t.unit(tu)), su
        assert s.unit(su) is not t.unit(tu)  # copies, not shared modules
    for part in ("vision_embeddings", "vision_norm", "text_embeddings", "pooler", "vision_proj", "text_proj"):
        assert same_params(getattr(s, part), getattr(t, part)), part
    assert s.preset == "xvlm-mini-half"


def test_xvlm_mini_half_without_teacher_uses_same_seed(models):
    """teacher=None builds xvlm-mini with the same seed: same student as from the default teacher."""
    assert same_params(build("xvlm-mini-half"), models["xvlm-mini-half"])


def test_xvlm_mini_half_bad_teacher(models):
    with pytest.raises(TypeError, match="xvlm-mini"):
        build_xvlm_mini_half(teacher=models["vilt-mini"])
    odd = build("xvlm-mini", vision_layers=3, text_layers=2, fusion_layers=2)
    with pytest.raises(ValueError, match="vision units.*n_teacher=2"):
        build_xvlm_mini_half(teacher=odd)


# ---------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("name,unit", [("vilt-mini", "En3"), ("meter-mini", "FL1"), ("xvlm-mini", "F2"),
                                       ("xvlm-mini-half", "LEn1")])
def test_protocol(models, protocol_checks, name, unit):
    m, x = models[name], inputs_for(name)
    protocol_checks.slice_whole_equals_forward(m, x)
    protocol_checks.split_equals_whole(m, x)
    protocol_checks.unit_outputs(m, x)
    protocol_checks.attentions(m, x)
    protocol_checks.replace_roundtrip(m, x, unit)
    protocol_checks.unknown_unit(m)


@pytest.mark.parametrize("name", MINI)
@torch.no_grad()
def test_pixels_equal_cells_end_to_end(models, name):
    m = models[name]
    px = torch.randint(0, 256, (2, 3, 128, 128), generator=torch.Generator().manual_seed(0)).float()
    cells = cell_features(m.vision_embeddings.cnn, px)
    a, b = m(**text_inputs(), pixel_values=px), m(**text_inputs(), image_feats=cells)
    assert_close(a.pooled, b.pooled)
    if name != "vilt-mini":  # single-tower encoders (contrastive use) take cells too
        assert_close(m.encode_image(pixel_values=px), m.encode_image(image_feats=cells))
        assert m.encode_image(image_feats=cells).shape == (2, 256 if name.startswith("xvlm") else 384)


@pytest.mark.parametrize("name", MINI)
def test_macs_exclude_the_cnn_with_cached_cells(models, name):
    """MACs(pixels) - MACs(cells) == MACs of the frozen CNN, exactly."""
    m = models[name]
    x_cells, x_pixels = m.dummy_inputs(1), m.dummy_inputs(1, pixels=True)
    assert set(x_cells) - {"input_ids", "attention_mask"} == {"image_feats"}
    assert x_pixels["pixel_values"].shape == (1, 3, 128, 128)
    with_cells, with_pixels = eff.macs(m, x_cells), eff.macs(m, x_pixels)
    cnn = eff.macs(lambda: cell_features(m.vision_embeddings.cnn, x_pixels["pixel_values"]))
    assert with_cells < with_pixels and with_pixels - with_cells == cnn
    assert 0.12e9 < cnn < 0.13e9  # EfficientNet-Lite0 at 128 px (0.39 GMACs at 224 px, Tan & Le)


def test_mini_macs_by_hand(models):
    """vilt-mini: 6 layers of 12ND^2 + 2N^2D at N = 40 text + 17 image tokens, D = 384, plus the
    cell projection 16 * 1280 * 384 and the pooler 384^2 (DESIGN.md accounting)."""
    n, d = 40 + 17, 384
    want = 6 * (12 * n * d * d + 2 * n * n * d) + 16 * 1280 * d + d * d
    assert eff.macs(models["vilt-mini"]) == want


def test_nlvr_second_image_type(models):
    m, x = models["vilt-mini"], inputs_for("vilt-mini")
    with torch.no_grad():
        assert not torch.allclose(m(**x).pooled, m(**x, image_token_type_idx=2).pooled, atol=1e-5)
        assert not torch.allclose(models["meter-mini"](**x).pooled,
                                  models["meter-mini"](**x, image_token_type_idx=2).pooled, atol=1e-5)
    with pytest.raises(ValueError, match="image_token_type_idx=3"):
        m(**x, image_token_type_idx=3)


def test_bad_input(models):
    m = models["vilt-mini"]
    t = text_inputs()
    with pytest.raises(ValueError, match="exactly one.*neither"):
        m(**t)
    with pytest.raises(ValueError, match="batch sizes differ: 2 texts, 3 images"):
        m(**t, image_feats=feats(3))
    with pytest.raises(ValueError, match=r"\(B, 16, 1280\)"):
        models["xvlm-mini"](**t, image_feats=feats(2)[..., :100])
    with pytest.raises(ValueError, match="batch"):
        models["meter-mini"](**t, image_feats=feats(3))
    with pytest.raises(ValueError, match="input_ids is required"):
        models["xvlm-mini"](image_feats=feats(2))
    with pytest.raises(ValueError, match="takes no image_feats"):
        build("xvlm-clip", image_size=32, patch_size=16, vision_dim=8, vision_heads=2, vision_ffn_dim=8,
              vision_layers=1, text_dim=8, text_heads=2, text_ffn_dim=8, text_layers=1, fusion_layers=1,
              vocab_size=99, max_positions=20, bos_token_id=2, eos_token_id=3)(**t, image_feats=feats(2))


def test_bad_builds():
    with pytest.raises(UnknownNameError, match="vision_layerz"):
        build("xvlm-mini", vision_layerz=2)
    with pytest.raises(ValueError, match="text_dim=32.*384.*pretrained_text=False"):
        build("meter-mini", text_dim=32)
    with pytest.raises(ValueError, match="layers=7.*at most 6"):
        build("vilt-mini", layers=7)
    with pytest.raises(UnknownNameError, match="minilm, random"):
        build("meter-mini", fusion_init="bert")
    tiny = build("xvlm-mini", pretrained_text=False, text_dim=32, text_heads=4, text_ffn_dim=64, vision_dim=16,
                 vision_heads=2, vision_ffn_dim=32, vision_layers=2, text_layers=2, fusion_layers=2, vocab_size=99,
                 max_positions=20, bos_token_id=2, eos_token_id=3, embed_dim=8, image_size=64, text_len=5)
    x = tiny.dummy_inputs(2)
    assert x["image_feats"].shape == (2, 4, CELL_DIM)
    assert tiny(**x).pooled.shape == (2, 32)


# ---------------------------------------------------------------------------- weights
def test_weights_roundtrip_and_strict_errors(models, tmp_path):
    from vlkit.checkpoint import save_checkpoint

    src = build("vilt-mini", seed=5, layers=2)
    with torch.no_grad():
        src.unit("En1").ffn.fc1.bias.add_(1.0)  # "trained"
    folder = save_checkpoint(tmp_path / "run", 10, src)
    for where in (folder, tmp_path / "run", folder / "model.safetensors"):  # ckpt dir, run dir, file
        assert same_params(build("vilt-mini", layers=2, weights=where), src)

    sd = src.state_dict()
    save_file({k: v for k, v in sd.items() if k != "pooler.dense.bias"}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="missing pooler.dense.bias"):
        build("vilt-mini", layers=2, weights=tmp_path / "missing.safetensors")
    save_file({**sd, "extra.weight": torch.zeros(1)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="unexpected extra.weight"):
        build("vilt-mini", layers=2, weights=tmp_path / "extra.safetensors")
    with pytest.raises(ValueError, match=r"missing blocks\.En2\."):
        build("vilt-mini", layers=3, weights=folder)
    save_file({f"backbone.{k}": v for k, v in sd.items()}, str(tmp_path / "task.safetensors"))
    assert same_params(build("vilt-mini", layers=2, weights=tmp_path / "task.safetensors",
                             weights_prefix="backbone."), src)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build("vilt-mini", weights=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        build("vilt-mini", weights=tmp_path / "empty")


def test_student_from_weights(models, tmp_path):
    s = models["xvlm-mini-half"]
    save_file(s.state_dict(), str(tmp_path / "student.safetensors"))
    again = build("xvlm-mini-half", weights=tmp_path / "student.safetensors", seed=7)
    assert same_params(again, s)
    assert isinstance(again, XVLM)
