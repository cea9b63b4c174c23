"""Mini vision-language backbones built from real weights: ``vilt-mini``, ``meter-mini``,
``xvlm-mini`` and its layer-halved student ``xvlm-mini-half``.

Real weights come from two packages: MiniLM-L6 (all-MiniLM-L6-v2: 6 post-norm BERT layers,
width 384, 12 heads, FFN 1536) for everything textual, and EfficientNet-Lite0 (ImageNet) for
the image tokens. Everything else (vision Transformer layers, cross-attention, poolers of the
two-tower presets, projections) is randomly initialised, BERT-style N(0, 0.02) under
``seed``, and pre-trained in-repo later (``weights=`` then loads that checkpoint).

Image tokens (:class:`CellEmbeddings`, shared by all three presets)
-------------------------------------------------------------------
The frozen EfficientNet-Lite0 turns an image into a ``h x w`` grid of 1280-d cells
(:func:`vlkit.models.cnn.cell_features`; 128 px -> 4 x 4). The cells play the role of ViT
patches (the "grid features" of Jiang et al. 2020, "In Defense of Grid Features for VQA"; a
CNN backbone under a Transformer as in Pixel-BERT, Huang et al. 2020)::

    z = LN([v_cls; W c_1 + b; ...; W c_n + b] + E_pos)        (B, 1 + n, D)

with a learned image [CLS] ``v_cls`` and one learned position per cell (ViT's input, Dosovitskiy
et al. 2021, Eq. 1, with CLIP's ``ln_pre`` and the patch projection applied to CNN cells). The
input is either ``image_feats`` (B, n, 1280) -- cells cached once per dataset by
:mod:`vlkit.data.features` -- or ``pixel_values`` (B, 3, H, W) in 0..255, for which the frozen
CNN runs (eval mode, no grad). The CNN is *not* a sub-module: it is not in ``parameters()``,
``state_dict()`` or parameter counts, checkpoints do not carry it, and it follows the
projection's device and dtype at each call. MACs measured with ``image_feats`` therefore
exclude the CNN; with ``pixel_values`` they include it (the tables say which).

Presets (layer names follow the protocol; ``D = 384`` everywhere)
-----------------------------------------------------------------
``vilt-mini`` (ViLT, Kim et al. 2021, Eqs. 1-5, single stream): ``[t_cls; t_1..t_L] +
type_0`` (MiniLM's word/position/segment embeddings) concatenated with ``CellEmbeddings +
type_1`` (``type_2`` for the second image of an NLVR pair); units ``En0..En5`` = MiniLM's 6
layers; pooled = ``tanh(W z_0 + b)`` on the first (text [CLS]) token, initialised from
MiniLM's pooler. MiniLM's layers are post-norm, so no final LayerNorm is added.

``meter-mini`` (:class:`vlkit.models.meter.METER` with cell embeddings): text ``LEn0..5`` =
MiniLM; vision ``VEn0..VEn1`` = 2 pre-norm layers over the cells (width 384, 6 heads, FFN
1536, GELU; random); co-attention fusion ``FL0..FL2`` / ``FV0..FV2`` (width 384, 12 heads,
FFN 1536). Fusion initialisation (``fusion_init``): ``"minilm"`` (default) copies MiniLM
layers 3, 4, 5 into the self-attention + FFN of both ``FL_i`` and ``FV_i`` (their
cross-attention stays random) -- the upper text layers are the best available start for a
layer that reads 384-d LayerNormed tokens, as X-VLM starts its fusion from BERT layers 6-11;
METER itself initialises its fusion randomly (``fusion_init="random"``).

``xvlm-mini`` (:class:`vlkit.models.xvlm.XVLM` with cell embeddings): vision ``VEn0..VEn5``
(6 pre-norm layers, width 384, 6 heads, random), text ``LEn0..LEn5`` = MiniLM, fusion
``F0..F5`` = a second copy of MiniLM's 6 layers plus fresh cross-attention (X-VLM's recipe:
the fusion starts from BERT layers with new cross-attention); pooler from MiniLM's.

``xvlm-mini-half`` (EfficientVLM's student, Wang et al. 2023, Sec. 3.1): 3/3/3 layers; student
layer ``i`` is a copy of teacher layer ``2i + 1`` of the same encoder
(:func:`vlkit.models.xvlm.student_unit_map`: layers 1, 3, 5 counting from 0), plus the
teacher's embeddings, norms, pooler and projections.

Every builder takes ``seed`` (random parts), ``weights`` (a vlkit checkpoint folder or a
``.safetensors`` file: loaded strictly, see :func:`load_weights`), ``pretrained_text``
(``False``: random text weights, so text widths may change -- tiny test configurations) and
``**overrides`` (fields of the preset's config: layer counts, widths, ``image_size``,
``text_len``). Builders return eval mode.

Parameters (the CNN excluded): ``vilt-mini`` 23,213,952; ``meter-mini`` 41,406,720;
``xvlm-mini`` 48,257,024; ``xvlm-mini-half`` 30,510,464. GMACs per example at 128 px with 40
text tokens (``dummy_inputs``): 0.628 / 0.920 / 1.158 / 0.583 with cached cells; the frozen
CNN adds 0.125 GMACs when the presets take pixels.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import cnn as _cnn
from .meter import METER, METERConfig
from .protocol import Backbone, BackboneOutput, State, UnitSpec
from .towers import Pooler, TextEmbeddings, bert_layers, build_seeded, config_from_overrides, init_bert_style
from .xvlm import XVLM, XVLMConfig, student_unit_map

__all__ = ["CellEmbeddings", "MiniViltConfig", "MiniVilt", "build_vilt_mini", "build_meter_mini",
           "build_xvlm_mini", "build_xvlm_mini_half", "load_weights", "MINILM", "IMAGE_SIZE"]

IMAGE_SIZE = 128  # default input resolution of the mini presets: 4 x 4 cells
FUSION_INITS = ("minilm", "random")
# the shapes all-MiniLM-L6-v2's weights fix (checked when pretrained_text=True)
MINILM = dict(vocab_size=30522, dim=384, heads=12, ffn_dim=1536, layers=6, max_positions=512,
              type_vocab_size=2, eps=1e-12)


# ---------------------------------------------------------------------------- image tokens
class CellEmbeddings(nn.Module):
    """``LN([v_cls; W c_1 + b; ...; W c_n + b] + E_pos)``: EfficientNet cells as image tokens
    (module docstring). Output ``(B, 1 + num_cells, dim)``.

    Called as ``emb(image_feats=...)`` with cached cells (B, num_cells, cell_dim) or
    ``emb(pixel_values=...)`` with 0..255 pixels (B, 3, H, W), which runs the frozen CNN;
    exactly one of the two. ``num_cells = grid_size(image_size) ** 2``.
    """

    takes_features = True  # TwoTowerBackbone passes image_feats / pixel_values by keyword

    def __init__(self, dim: int, image_size: int = IMAGE_SIZE, cell_dim: int = _cnn.CELL_DIM, eps: float = 1e-12):
        super().__init__()
        self.dim, self.image_size, self.cell_dim = dim, image_size, cell_dim
        self.grid = _cnn.grid_size(image_size)
        self.num_cells = self.grid * self.grid
        self.proj = nn.Linear(cell_dim, dim)
        self.cls_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.position_embeddings = nn.Embedding(1 + self.num_cells, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        object.__setattr__(self, "_frozen_cnn", None)  # frozen CNN, built on first pixel input; not a sub-module

    @property
    def num_tokens(self) -> int:
        return 1 + self.num_cells

    @property
    def cnn(self) -> nn.Module:
        """The frozen EfficientNet-Lite0 (built on first use; on the projection's device/dtype)."""
        w = self.proj.weight
        if self._frozen_cnn is None:
            object.__setattr__(self, "_frozen_cnn", _cnn.efficientnet_lite0(frozen=True))
        self._frozen_cnn.to(device=w.device, dtype=w.dtype)
        return self._frozen_cnn

    def cells(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, n, cell_dim) cells of 0..255 pixels from the frozen CNN (eval, no grad)."""
        with torch.no_grad():
            return _cnn.cell_features(self.cnn.eval(), pixel_values)

    def forward(self, image_feats: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        if (image_feats is None) == (pixel_values is None):
            got = "both" if image_feats is not None else "neither"
            raise ValueError(f"pass exactly one of image_feats (B, {self.num_cells}, {self.cell_dim}) cached cells or "
                             f"pixel_values (B, 3, H, W) 0..255 pixels; got {got}")
        if pixel_values is not None:
            _cnn.check_pixels(pixel_values)
            grid = tuple(_cnn.grid_size(s) for s in pixel_values.shape[-2:])
            if grid != (self.grid, self.grid):
                raise ValueError(f"pixel_values of {tuple(pixel_values.shape[-2:])} pixels give {grid[0]}x{grid[1]} "
                                 f"cells; this model was built for {self.grid}x{self.grid} (image_size="
                                 f"{self.image_size}): resize the images or build with "
                                 f"image_size={pixel_values.shape[-1]}")
            image_feats = self.cells(pixel_values)
        if not isinstance(image_feats, torch.Tensor) or image_feats.dim() != 3 or \
                tuple(image_feats.shape[1:]) != (self.num_cells, self.cell_dim):
            shape = tuple(image_feats.shape) if isinstance(image_feats, torch.Tensor) else type(image_feats).__name__
            raise ValueError(f"image_feats must be (B, {self.num_cells}, {self.cell_dim}) EfficientNet cells for "
                             f"image_size={self.image_size}; got {shape}")
        w = self.proj.weight  # cached cells may come as float16 from a CPU memory map
        x = self.proj(image_feats.to(device=w.device, dtype=w.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)
        return self.norm(x + self.position_embeddings.weight[None])

    def dummy_inputs(self, batch_size: int, generator: torch.Generator, pixels: bool = False) -> dict:
        """Random cached cells in ReLU6's range [0, 6) or, with ``pixels``, 0..255 pixels."""
        if pixels:
            s = self.image_size
            return {"pixel_values": torch.randint(0, 256, (batch_size, 3, s, s), generator=generator).float()}
        return {"image_feats": 6 * torch.rand(batch_size, self.num_cells, self.cell_dim, generator=generator)}


# ---------------------------------------------------------------------------- MiniLM weights
@functools.lru_cache(maxsize=1)
def _minilm():
    from .text import build_minilm

    return build_minilm()


def _check_minilm(preset: str, fields: dict) -> None:
    """``fields``: our name -> (value, MiniLM's value or max); a clear error if MiniLM can't fill it."""
    for name, (ours, theirs, how) in fields.items():
        bad = ours > theirs if how == "max" else ours != theirs
        if bad:
            need = f"at most {theirs}" if how == "max" else f"{theirs}"
            raise ValueError(f"{preset}: {name}={ours!r} does not fit MiniLM-L6's weights (needs {need}); "
                             "pass pretrained_text=False for random text weights")


@torch.no_grad()
def _copy_minilm_layer(ours: nn.Module, i: int) -> None:
    """MiniLM layer ``i`` -> ``ours`` (self-attention + FFN; a cross-attention stays as it is)."""
    missing, unexpected = ours.load_state_dict(_minilm().unit(f"En{i}").state_dict(), strict=False)
    bad = [k for k in missing if not k.startswith(("cross_attn.", "cross_norm."))] + list(unexpected)
    if bad:  # pragma: no cover - shapes are checked before
        raise ValueError(f"MiniLM layer {i} does not fit: {bad}")


@torch.no_grad()
def _copy_minilm_text(embeddings: TextEmbeddings, pooler: Pooler | None = None) -> None:
    embeddings.load_state_dict(_minilm().embeddings.state_dict())
    if pooler is not None:
        pooler.load_state_dict(_minilm().pooler.state_dict())


# ---------------------------------------------------------------------------- weights
def _weights_file(path: Path) -> Path:
    from vlkit.checkpoint import META_FILE, MODEL_FILE, latest_checkpoint, verify_files

    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"weights {str(path)!r}: no such file or folder (a vlkit checkpoint folder or a "
                                ".safetensors file)")
    folder = path if (path / MODEL_FILE).is_file() else latest_checkpoint(path)
    if folder is None or not (folder / MODEL_FILE).is_file():
        raise FileNotFoundError(f"weights {str(path)!r}: no {MODEL_FILE} in it and no complete checkpoint "
                                "(ckpt-*/ with meta.json) under it")
    if (folder / META_FILE).is_file():
        verify_files(folder)  # sizes + sha256 recorded at save time
    return folder / MODEL_FILE


@torch.no_grad()
def load_weights(model: nn.Module, weights: str | Path, prefix: str = "") -> None:
    """Load a vlkit checkpoint into ``model`` strictly: ``weights`` is a ``.safetensors`` file,
    a checkpoint folder holding ``model.safetensors`` (checked against its ``meta.json``), or a
    run folder (its latest checkpoint). ``prefix``: keep only the tensors whose names start
    with it, stripped (e.g. ``"backbone."`` for a task model's checkpoint). Missing,
    unexpected and mis-shaped tensors are all named in one error."""
    from safetensors.torch import load_file

    file = _weights_file(Path(weights))
    sd = load_file(str(file))
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {list(sd[k].shape)} vs model {list(own[k].shape)}" for k in sd
              if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        few = lambda xs: ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")  # noqa: E731
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"shape mismatch {few(shapes)}" if shapes else ""]
        raise ValueError(f"weights {file} do not fit preset {getattr(model, 'preset', '?')!r} "
                         f"(prefix {prefix!r}): " + "; ".join(p for p in parts if p))
    model.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------- vilt-mini
@dataclass(frozen=True)
class MiniViltConfig:
    """``vilt-mini`` hyper-parameters (MiniLM-L6's text side; 128 px -> 4 x 4 cells)."""

    vocab_size: int = 30522
    dim: int = 384
    layers: int = 6
    heads: int = 12
    ffn_dim: int = 1536
    eps: float = 1e-12
    max_positions: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    bos_token_id: int = 101  # [CLS]
    eos_token_id: int = 102  # [SEP]
    image_size: int = IMAGE_SIZE
    cell_dim: int = _cnn.CELL_DIM
    num_modality_types: int = 3  # 0 text, 1 image, 2 second image (NLVR)
    text_len: int = 40
    seed: int = 0

    def __post_init__(self):
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        if self.num_modality_types < 2:
            raise ValueError(f"num_modality_types must be >= 2 (text, image), got {self.num_modality_types}")


class MiniVilt(Backbone):
    """Single-stream ViLT over MiniLM tokens and EfficientNet cells (module docstring).

    Inputs: ``input_ids`` (B, L), optional ``attention_mask`` / ``token_type_ids`` (B, L), and
    exactly one of ``image_feats`` (B, n, 1280) or ``pixel_values`` (B, 3, H, W) 0..255;
    ``image_token_type_idx`` 1 (2 for the second image of an NLVR pair). Stream ``"joint"`` =
    ``[text tokens; image CLS; cells]``; ``state.extra["num_text"]`` holds ``L``.
    """

    stream = "joint"

    def __init__(self, config: MiniViltConfig):
        super().__init__()
        c = self.config = config
        self.text_embeddings = TextEmbeddings(c.vocab_size, c.dim, c.max_positions, c.type_vocab_size,
                                              c.pad_token_id, eps=c.eps)
        self.vision_embeddings = CellEmbeddings(c.dim, c.image_size, c.cell_dim, eps=c.eps)
        self.modality_embeddings = nn.Embedding(c.num_modality_types, c.dim)  # ViLT's token_type_embeddings
        self.pooler = Pooler(c.dim)
        layers = bert_layers(c.layers, c.dim, c.heads, c.ffn_dim, eps=c.eps)
        self._register_units([UnitSpec(f"En{i}", "joint", self.stream) for i in range(c.layers)], layers)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None, image_feats: torch.Tensor | None = None,
              pixel_values: torch.Tensor | None = None, image_token_type_idx: int = 1) -> State:
        """``z0 = [T(ids) + m_0; V(image) + m_idx]`` (Kim et al., Eq. 2) and its keep-mask."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens); got {getattr(input_ids, 'shape', input_ids)}")
        n_types = self.modality_embeddings.num_embeddings
        if not 1 <= image_token_type_idx < n_types:
            raise ValueError(f"image_token_type_idx={image_token_type_idx} must be in [1, {n_types})")
        b, n = input_ids.shape
        t = self.text_embeddings(input_ids, token_type_ids) + self.modality_embeddings.weight[0]
        v = self.vision_embeddings(image_feats=image_feats, pixel_values=pixel_values)
        if v.shape[0] != b:
            raise ValueError(f"batch sizes differ: {b} texts, {v.shape[0]} images")
        v = v + self.modality_embeddings.weight[image_token_type_idx]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([attention_mask.to(torch.long), attention_mask.new_ones(b, v.shape[1], dtype=torch.long)], 1)
        return State(streams={self.stream: torch.cat([t, v], 1)}, masks={self.stream: mask}, extra={"num_text": n})

    def finalize(self, state: State) -> BackboneOutput:
        """Pooled: ``tanh(W z_0 + b)`` on the text [CLS] (ViLT pools the first token)."""
        z, mask = state.streams[self.stream], state.masks.get(self.stream)
        return BackboneOutput(pooled=self.pooler(z), sequences={self.stream: z}, masks={self.stream: mask})

    def dummy_inputs(self, batch_size: int = 1, text_len: int | None = None, seed: int = 0,
                     pixels: bool = False) -> dict:
        """``text_len`` (40) random ids ([CLS] ... [SEP]) and random cached cells (``pixels=True``:
        0..255 pixels at ``image_size``), seeded."""
        c = self.config
        g = torch.Generator().manual_seed(seed)
        images = self.vision_embeddings.dummy_inputs(batch_size, g, pixels=pixels)
        ids = torch.randint(max(c.bos_token_id, c.eos_token_id) + 1, c.vocab_size,
                            (batch_size, min(text_len or c.text_len, c.max_positions)), generator=g)
        ids[:, 0], ids[:, -1] = c.bos_token_id, c.eos_token_id
        device = self.pooler.dense.weight.device
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                **{k: v.to(device) for k, v in images.items()}}


def build_vilt_mini(weights: str | Path | None = None, seed: int = 0, pretrained_text: bool = True,
                    weights_prefix: str = "", **overrides) -> MiniVilt:
    """``vilt-mini``: MiniLM's embeddings, layers (``En0..En{layers-1}`` = MiniLM layers
    ``0..layers-1``) and pooler; random cell embeddings and modality embeddings (seeded).
    ``overrides``: :class:`MiniViltConfig` fields."""
    config = config_from_overrides(MiniViltConfig, {"seed": seed, **overrides}, "vilt-mini")
    if pretrained_text:
        _check_minilm("vilt-mini", {"dim": (config.dim, MINILM["dim"], "eq"),
                                    "heads": (config.heads, MINILM["heads"], "eq"),
                                    "ffn_dim": (config.ffn_dim, MINILM["ffn_dim"], "eq"),
                                    "vocab_size": (config.vocab_size, MINILM["vocab_size"], "eq"),
                                    "max_positions": (config.max_positions, MINILM["max_positions"], "eq"),
                                    "type_vocab_size": (config.type_vocab_size, MINILM["type_vocab_size"], "eq"),
                                    "layers": (config.layers, MINILM["layers"], "max")})

    def make() -> MiniVilt:
        model = MiniVilt(config)
        init_bert_style(model)
        return model

    model = build_seeded(make, config.seed)
    if pretrained_text:
        _copy_minilm_text(model.text_embeddings, model.pooler)
        for i in range(config.layers):
            _copy_minilm_layer(model.unit(f"En{i}"), i)
    model.preset = "vilt-mini"
    if weights is not None:
        load_weights(model, weights, weights_prefix)
    return model.eval()


# ---------------------------------------------------------------------------- meter-mini / xvlm-mini
_TEXT_MINI = dict(vocab_size=30522, text_dim=384, text_layers=6, text_heads=12, text_ffn_dim=1536, text_eps=1e-12,
                  max_positions=512, type_vocab_size=2, pad_token_id=0, bos_token_id=101, eos_token_id=102)
_VISION_MINI = dict(image_size=IMAGE_SIZE, vision_dim=384, vision_heads=6, vision_ffn_dim=1536, vision_act="gelu",
                    vision_eps=1e-12)
METER_MINI = dict(**_TEXT_MINI, **_VISION_MINI, vision_layers=2, hidden_dim=384, fusion_layers=3, fusion_heads=12,
                  fusion_ffn_dim=1536, num_token_types=3, text_len=40)
XVLM_MINI = dict(**_TEXT_MINI, **_VISION_MINI, vision_layers=6, fusion_layers=6, embed_dim=256, text_len=40)


def _text_checks(preset: str, c, extra: dict | None = None) -> None:
    _check_minilm(preset, {"text_dim": (c.text_dim, MINILM["dim"], "eq"),
                           "text_heads": (c.text_heads, MINILM["heads"], "eq"),
                           "text_ffn_dim": (c.text_ffn_dim, MINILM["ffn_dim"], "eq"),
                           "vocab_size": (c.vocab_size, MINILM["vocab_size"], "eq"),
                           "max_positions": (c.max_positions, MINILM["max_positions"], "eq"),
                           "type_vocab_size": (c.type_vocab_size, MINILM["type_vocab_size"], "eq"),
                           "text_eps": (c.text_eps, MINILM["eps"], "eq"),
                           "text_layers": (c.text_layers, MINILM["layers"], "max"), **(extra or {})})


def _cells(c) -> CellEmbeddings:
    return CellEmbeddings(c.vision_dim, c.image_size, eps=c.vision_eps)


def build_meter_mini(weights: str | Path | None = None, seed: int = 0, pretrained_text: bool = True,
                     fusion_init: str = "minilm", weights_prefix: str = "", **overrides) -> METER:
    """``meter-mini``: METER over MiniLM text and EfficientNet cells (module docstring).
    ``overrides``: :class:`~vlkit.models.meter.METERConfig` fields on top of the mini defaults;
    ``fusion_init``: ``"minilm"`` (FL_i / FV_i self-attention + FFN from MiniLM layers
    ``6 - fusion_layers + i``) or ``"random"``."""
    if fusion_init not in FUSION_INITS:
        from .protocol import UnknownNameError

        raise UnknownNameError("fusion_init", fusion_init, FUSION_INITS)
    config = config_from_overrides(METERConfig, {**METER_MINI, "seed": seed, **overrides}, "meter-mini")
    c = config
    if pretrained_text:
        _text_checks("meter-mini", c)
    if fusion_init == "minilm":
        _check_minilm("meter-mini", {"hidden_dim": (c.hidden_dim, MINILM["dim"], "eq"),
                                     "fusion_heads": (c.fusion_heads, MINILM["heads"], "eq"),
                                     "fusion_ffn_dim": (c.fusion_ffn_dim, MINILM["ffn_dim"], "eq"),
                                     "fusion_eps": (c.fusion_eps, MINILM["eps"], "eq"),
                                     "fusion_layers": (c.fusion_layers, MINILM["layers"], "max")})

    def make() -> METER:
        text = TextEmbeddings(c.vocab_size, c.text_dim, c.max_positions, c.type_vocab_size, c.pad_token_id,
                              eps=c.text_eps)
        model = METER(c, vision_embeddings=_cells(c), text_embeddings=text)
        init_bert_style(model)
        return model

    model = build_seeded(make, c.seed)
    if pretrained_text:
        _copy_minilm_text(model.text_embeddings)
        for i in range(c.text_layers):
            _copy_minilm_layer(model.unit(f"LEn{i}"), i)
    if fusion_init == "minilm":
        first = MINILM["layers"] - c.fusion_layers
        for i in range(c.fusion_layers):
            _copy_minilm_layer(model.unit(f"FL{i}"), first + i)
            _copy_minilm_layer(model.unit(f"FV{i}"), first + i)
    model.preset = "meter-mini"
    if weights is not None:
        load_weights(model, weights, weights_prefix)
    return model.eval()


def _xvlm_mini(config: XVLMConfig, pretrained_text: bool) -> XVLM:
    c = config
    if pretrained_text:
        _text_checks("xvlm-mini", c, {"fusion_layers": (c.fusion_layers, MINILM["layers"], "max")})

    def make() -> XVLM:
        model = XVLM(c, vision_embeddings=_cells(c))
        init_bert_style(model)
        return model

    model = build_seeded(make, c.seed)
    if pretrained_text:
        _copy_minilm_text(model.text_embeddings, model.pooler)
        for i in range(c.text_layers):
            _copy_minilm_layer(model.unit(f"LEn{i}"), i)
        for i in range(c.fusion_layers):  # a second copy of MiniLM's layers; cross-attention stays random
            _copy_minilm_layer(model.unit(f"F{i}"), i)
    return model


def build_xvlm_mini(weights: str | Path | None = None, seed: int = 0, pretrained_text: bool = True,
                    weights_prefix: str = "", **overrides) -> XVLM:
    """``xvlm-mini``: the EfficientVLM teacher at mini scale (vision 6 / text 6 / fusion 6, module
    docstring). ``overrides``: :class:`~vlkit.models.xvlm.XVLMConfig` fields on top of the mini
    defaults."""
    config = config_from_overrides(XVLMConfig, {**XVLM_MINI, "seed": seed, **overrides}, "xvlm-mini")
    model = _xvlm_mini(config, pretrained_text)
    model.preset = "xvlm-mini"
    if weights is not None:
        load_weights(model, weights, weights_prefix)
    return model.eval()


_HALVED = ("vision_layers", "text_layers", "fusion_layers")


@torch.no_grad()
def build_xvlm_mini_half(weights: str | Path | None = None, seed: int = 0, teacher: XVLM | None = None,
                         pretrained_text: bool = True, weights_prefix: str = "", **overrides) -> XVLM:
    """``xvlm-mini-half``: EfficientVLM's layer-halved student of ``xvlm-mini`` (3/3/3).

    ``teacher``: an ``xvlm-mini`` backbone to copy from; ``None`` builds one with the same
    ``seed`` (and ``pretrained_text``), whose layer counts are twice the student's. The
    student's config is the teacher's with halved layer counts (``overrides``: the student's
    :class:`~vlkit.models.xvlm.XVLMConfig` fields, e.g. ``vision_layers=2`` for a 4-layer
    teacher). Student unit ``i`` of each encoder = teacher unit ``2i + 1``
    (:func:`~vlkit.models.xvlm.student_unit_map`); embeddings, ``vision_norm``, pooler and
    contrastive projections are the teacher's too. ``weights`` loads a trained student
    instead (no teacher is built then)."""
    if teacher is None:
        student_cfg = config_from_overrides(XVLMConfig, {**XVLM_MINI, **{k: XVLM_MINI[k] // 2 for k in _HALVED},
                                                         "seed": seed, **overrides}, "xvlm-mini-half")
        if weights is None:
            doubled = {k: 2 * getattr(student_cfg, k) for k in _HALVED}
            teacher = _xvlm_mini(dataclasses.replace(student_cfg, **doubled), pretrained_text)
    else:
        if not isinstance(teacher, XVLM) or not isinstance(teacher.vision_embeddings, CellEmbeddings):
            raise TypeError(f"teacher must be an xvlm-mini backbone (XVLM with cell embeddings), got "
                            f"{type(teacher).__name__} (preset {getattr(teacher, 'preset', '?')!r})")
        halved = {k: getattr(teacher.config, k) // 2 for k in _HALVED}
        fields = {**dataclasses.asdict(teacher.config), **halved, "seed": seed, **overrides}
        student_cfg = config_from_overrides(XVLMConfig, fields, "xvlm-mini-half")

    def make() -> XVLM:
        model = XVLM(student_cfg, vision_embeddings=_cells(student_cfg))
        init_bert_style(model)
        return model

    student = build_seeded(make, student_cfg.seed)
    student.preset = "xvlm-mini-half"
    if weights is not None:
        load_weights(student, weights, weights_prefix)
        return student.eval()
    for name in ("vision_embeddings", "vision_norm", "text_embeddings", "pooler", "vision_proj", "text_proj"):
        getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
    for s, t in student_unit_map(student, teacher).items():
        student.unit(s).load_state_dict(teacher.unit(t).state_dict())
    return student.eval()
