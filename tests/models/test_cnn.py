"""effnet-lite0: equivalence with the package's EfficientNet-Lite0 (real ImageNet weights), the
Table 1 stage layout, the protocol on 4-D streams, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlkit import efficiency as eff
from vlkit.models import PRESETS, build
from vlkit.models.cnn import (CELL_DIM, cell_features, efficientnet_lite0, grid_size, scale_pixels,
                              weights_file)
from vlkit.models.protocol import UnknownNameError



def assert_close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def model():
    return build("effnet-lite0")


@pytest.fixture(scope="module")
def reference():
    """The package's own loader (static SAME padding for 224 px), as its README shows."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_file())).eval()


def pixels(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).float()


def test_registered():
    assert PRESETS["effnet-lite0"] == "vlkit.models.cnn:build_effnet_lite0"


@pytest.mark.parametrize("batch,size", [(2, 64), (1, 224)])
@torch.no_grad()
def test_units_equal_package_model(model, reference, batch, size):
    """embed + Stage0..6 + finalize == extract_features + average pooling of the package model;
    the ImageNet classifier on our pooled vector gives the package's logits."""
    x = pixels(batch, size)
    out = model.finalize(model.run_units(model.embed(pixel_values=x)))
    maps = reference.extract_features(scale_pixels(x))
    g = grid_size(size)
    assert maps.shape == (batch, CELL_DIM, g, g)
    assert_close(out.sequences["vision"], maps.flatten(2).transpose(1, 2))
    assert_close(out.pooled, maps.mean((2, 3)))
    if size == 64:  # the rest once, at the cheap size
        assert_close(reference._fc(out.pooled), reference(scale_pixels(x)), atol=1e-4)
        assert_close(cell_features(efficientnet_lite0(), x), out.sequences["vision"])


def test_stage_layout_matches_table1(model):
    """Tan & Le, Table 1 (Lite0): channels and resolution after each stage at 224 px."""
    out = model(output_units=True, **model.dummy_inputs(1))
    shapes = {k: tuple(v.shape[1:]) for k, v in out.unit_outputs.items()}
    assert shapes == {"Stage0": (16, 112, 112), "Stage1": (24, 56, 56), "Stage2": (40, 28, 28),
                      "Stage3": (80, 14, 14), "Stage4": (112, 14, 14), "Stage5": (192, 7, 7), "Stage6": (320, 7, 7)}
    assert [len(model.unit(n).layers) for n in model.unit_names] == [1, 2, 2, 3, 3, 4, 1]
    assert {u.modality for u in model.units} == {"vision"}
    assert out.pooled.shape == (1, CELL_DIM) and out.sequences["vision"].shape == (1, 49, CELL_DIM)


def test_params_and_drop_connect(model, reference):
    # the backbone is the package model without its ImageNet classifier
    fc = sum(p.numel() for p in reference._fc.parameters())
    assert eff.params(model) == sum(p.numel() for p in reference.parameters()) - fc == 3_371_008
    # stochastic depth rate of block i is 0.2 * i / 16 (EfficientNet.extract_features)
    rates = [r for n in model.unit_names for r in model.unit(n).drop_rates]
    assert rates == pytest.approx([0.2 * i / 16 for i in range(16)])


def test_grid_size_and_scaling():
    assert [grid_size(s) for s in (32, 64, 100, 128, 224)] == [1, 2, 4, 4, 7]
    assert scale_pixels(torch.tensor([0.0, 127.0, 255.0])).tolist() == [-127 / 128, 0.0, 1.0]


def test_odd_size_uses_dynamic_padding(model):
    """100 px: maps of odd size on the way; TF SAME padding keeps ceil(100 / 32) = 4 cells."""
    out = model(pixel_values=pixels(1, 100))
    assert out.sequences["vision"].shape == (1, 16, CELL_DIM)


class ChannelMap(nn.Module):
    """A stand-in for a stage: a 1x1 conv with the stage's in/out channels and stride."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x, ctx=None):
        return self.conv(x)


def test_protocol(model, protocol_checks):
    inputs = {"pixel_values": pixels(2, 32)}  # 1 x 1 cells: cheap, every stage still runs
    protocol_checks.slice_whole_equals_forward(model, inputs)
    protocol_checks.split_equals_whole(model, inputs)
    # unit outputs (the generic check assumes a constant token count; CNN stages change shape)
    out = model(output_units=True, **inputs)
    assert list(out.unit_outputs) == model.unit_names
    state = model.embed(**inputs)
    for i, name in enumerate(model.unit_names):
        rec = {}
        model.run_units(state, 0, i + 1, record=rec)
        assert torch.equal(out.unit_outputs[name], rec[name])
    protocol_checks.unknown_unit(model)


@torch.no_grad()
def test_replace_stage_roundtrip(model):
    x = {"pixel_values": pixels(1, 64)}
    before = model(**x).pooled
    old = model.replace_unit("Stage4", ChannelMap(80, 112, 1))
    try:
        assert not torch.allclose(model(**x).pooled, before, atol=1e-4)
    finally:
        model.replace_unit("Stage4", old)
    assert torch.equal(model(**x).pooled, before)


def test_macs_count_the_convolutions(model):
    """Stem at 64 px: a 3x3x3 -> 32 conv on a 32x32 output = 27 * 32 * 1024 MACs."""
    x = pixels(1, 64)
    stem = eff.macs(lambda: model.embed(pixel_values=x))
    assert stem == 27 * 32 * 32 * 32
    # the whole backbone == the package's extract_features (same convolutions, pooling uncounted)
    assert eff.macs(model, {"pixel_values": x}) == eff.macs(lambda: efficientnet_lite0().extract_features(x))


def test_bad_input(model, tmp_path):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(3, 64, 64\)"):
        model(pixel_values=torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(2, 1, 64, 64\)"):
        model(pixel_values=torch.zeros(2, 1, 64, 64))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build("effnet-lite0", weights=tmp_path / "nowhere.pth")
    with pytest.raises(UnknownNameError, match="Stage0"):
        model.unit("Stage9")
    with pytest.raises(ValueError, match="image size"):
        grid_size(0)


def test_frozen_loader_has_no_grad_and_math():
    net = efficientnet_lite0()
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    assert math.isclose(sum(p.numel() for p in net.parameters()) / 1e6, 4.652, abs_tol=1e-3)
    cells = cell_features(net, pixels(1, 64))
    assert cells.min() >= 0 and cells.max() <= 6
