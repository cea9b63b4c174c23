"""X-VLM-clip (Zeng et al., "Multi-Grained Vision Language Pre-Training", ICML 2022), the
teacher of EfficientVLM (Wang et al., ACL Findings 2023), and its 6/3/3 student, behind the
backbone protocol.

Architecture (code: zengyan-97/X-VLM ``models/xvlm.py``, ``models/clip_vit.py``,
``models/xbert.py``; configs ``config_clipvitB.json`` and ``config_bert.json``):

* vision: CLIP ViT-B/16 at 224x224 -> 196 patches + CLS; ``pre_layrnorm``, 12 pre-norm
  quick-GELU layers (units ``VEn0..VEn11``), ``post_layernorm`` on every token
  (``CLIPVisionTransformer.forward``), applied by :meth:`XVLM._after_unit` after the last
  vision unit;
* text: BERT-base split at ``fusion_layer = 6``: layers 0-5 encode the text (units
  ``LEn0..LEn5``), layers 6-11 are the fusion (units ``F0..F5``): self-attention over the
  text -> cross-attention to the image tokens -> FFN, post-norm (xbert ``BertLayer`` with
  ``has_cross_attention``). Only the text stream is updated, so no depth snapshot is needed.
  Cross-attention keys/values read the vision width directly (xbert sets
  ``encoder_width = vision_width``), so no extra projection appears when widths differ;
* pooled output: BERT's pooler ``tanh(W h_CLS + b)`` on the fusion output's ``[CLS]``
  (X-VLM's own heads read the raw fusion ``[CLS]``; the pooler keeps the task heads uniform);
* contrastive heads (X-VLM ``get_features``): ``encode_image`` = ``normalize(vision_proj(
  h_CLS^vision))`` and ``encode_text`` = ``normalize(text_proj(h_CLS^text))``, (B, 256), unit
  L2 norm -- ready for the ITC loss ``sim = img @ txt.T / temp``.

``xvlm-clip-small`` is EfficientVLM's layer-halved student (vision 6, text 3, fusion 3; same
widths). :func:`student_layer_map` gives the teacher layer each student layer is initialised
from and distilled against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .protocol import BackboneOutput, State, UnitSpec
from .towers import (CLIPVisionEmbeddings, Pooler, TextEmbeddings, TwoTowerBackbone, bert_layers,
                     build_seeded, check_token_ids, clip_vision_layers, config_from_overrides, init_bert_style,
                     load_clip_vision, load_text_tower, require_folder)


@dataclass(frozen=True)
class XVLMConfig:
    """X-VLM-clip hyper-parameters (``config_clipvitB.json``, BERT-base ``config_bert.json``
    with ``fusion_layer=6``, ``embed_dim=256``, ``image_res=224``, 35 text tokens as in
    EfficientVLM's setting)."""

    # vision tower: CLIP ViT-B/16
    image_size: int = 224
    patch_size: int = 16
    vision_dim: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_ffn_dim: int = 3072
    vision_act: str = "quick_gelu"
    vision_eps: float = 1e-5
    # text tower + fusion: BERT-base (uncased)
    vocab_size: int = 30522
    text_dim: int = 768
    text_layers: int = 6
    fusion_layers: int = 6
    text_heads: int = 12
    text_ffn_dim: int = 3072
    text_eps: float = 1e-12
    max_positions: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    bos_token_id: int = 101  # [CLS]
    eos_token_id: int = 102  # [SEP]
    # contrastive projections
    embed_dim: int = 256
    # inputs and seeding
    text_len: int = 35
    seed: int = 0

    def __post_init__(self):
        for name in ("vision_layers", "text_layers", "fusion_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_token_ids(self)


class XVLM(TwoTowerBackbone):
    """X-VLM-style backbone: vision tower, text tower, text-side fusion (module docstring).
    Streams ``"vision"`` and ``"text"``; the fusion units update ``"text"``."""

    def __init__(self, config: XVLMConfig, *, vision_embeddings: nn.Module | None = None):
        """``vision_embeddings`` replaces CLIP's patch embedding (the ``xvlm-mini`` presets pass
        EfficientNet cell embeddings; see :class:`~vlkit.models.towers.TwoTowerBackbone`)."""
        super().__init__()
        c = self.config = config
        self.vision_embeddings = vision_embeddings if vision_embeddings is not None else CLIPVisionEmbeddings(
            c.image_size, c.patch_size, c.vision_dim, eps=c.vision_eps)
        self.vision_norm = nn.LayerNorm(c.vision_dim, eps=c.vision_eps)  # CLIP post_layernorm, every token
        self.text_embeddings = TextEmbeddings(c.vocab_size, c.text_dim, c.max_positions, c.type_vocab_size,
                                              c.pad_token_id, eps=c.text_eps)
        self.pooler = Pooler(c.text_dim)
        self.vision_proj = nn.Linear(c.vision_dim, c.embed_dim)
        self.text_proj = nn.Linear(c.text_dim, c.embed_dim)

        specs = [UnitSpec(f"VEn{i}", "vision", "vision") for i in range(c.vision_layers)]
        specs += [UnitSpec(f"LEn{i}", "text", "text") for i in range(c.text_layers)]
        specs += [UnitSpec(f"F{i}", "fusion", "text", context="vision") for i in range(c.fusion_layers)]
        modules = clip_vision_layers(c.vision_layers, c.vision_dim, c.vision_heads, c.vision_ffn_dim,
                                     act=c.vision_act, eps=c.vision_eps)
        modules += bert_layers(c.text_layers, c.text_dim, c.text_heads, c.text_ffn_dim, eps=c.text_eps)
        modules += bert_layers(c.fusion_layers, c.text_dim, c.text_heads, c.text_ffn_dim, eps=c.text_eps,
                               cross=True, context_dim=c.vision_dim)
        self._register_units(specs, modules)
        self._last_vision = c.vision_layers - 1 if c.vision_layers else None

    def _after_unit(self, i: int, state: State) -> None:
        if i == self._last_vision:  # CLIP post_layernorm on every image token
            state.streams["vision"] = self.vision_norm(state.streams["vision"])

    # ------------------------------------------------------------------ protocol
    def embed(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None, *,
              image_feats: torch.Tensor | None = None) -> State:
        """Embeddings of both towers; ``attention_mask`` (B, L) marks real tokens (1); the image
        stream has no padding (mask ``None``). ``image_feats``: cached CNN cells instead of
        pixels (cell-embedding presets only)."""
        if input_ids is None:
            raise ValueError("input_ids is required")
        if pixel_values is not None:
            self._check_batch(pixel_values, input_ids)
        vision = self.vision_tokens(pixel_values, image_feats)
        self._check_batch(vision, input_ids)
        state = State(streams={"vision": vision, "text": self.text_embeddings(input_ids, token_type_ids)},
                      masks={"vision": None, "text": attention_mask})
        if self._last_vision is None:
            state.streams["vision"] = self.vision_norm(state.streams["vision"])
        return state

    def finalize(self, state: State) -> BackboneOutput:
        """Pooled: BERT pooler on the fusion ``[CLS]``, (B, Dt)."""
        x, y = state.streams["text"], state.streams["vision"]
        return BackboneOutput(pooled=self.pooler(x), sequences={"text": x, "vision": y}, masks=dict(state.masks))

    def encode_image(self, pixel_values: torch.Tensor | None = None, *,
                     image_feats: torch.Tensor | None = None) -> torch.Tensor:
        """(B, embed_dim) ``normalize(vision_proj(ln_post(h_CLS)))`` from the vision tower alone."""
        return F.normalize(self.vision_proj(self.vision_features(pixel_values, image_feats=image_feats)[:, 0]),
                           dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, embed_dim) ``normalize(text_proj(h_CLS))`` from the text tower alone (LEn units)."""
        return F.normalize(self.text_proj(self.text_features(input_ids, attention_mask)[:, 0]), dim=-1)

    def parts(self) -> dict[str, list[nn.Module]]:
        """Modules per part, covering every parameter once: ``vision`` (= HF CLIPVisionModel),
        ``text`` (= HF BertModel with ``text_layers`` layers, no pooler), ``fusion`` (F units
        + pooler) and ``contrastive`` (vision_proj, text_proj)."""
        blocks = lambda m: [self.blocks[n] for n in self.units_of(m)]  # noqa: E731
        return {"vision": [self.vision_embeddings, *blocks("vision"), self.vision_norm],
                "text": [self.text_embeddings, *blocks("text")],
                "fusion": [*blocks("fusion"), self.pooler],
                "contrastive": [self.vision_proj, self.text_proj]}

    # ------------------------------------------------------------------ weights
    def load_weights(self, folder: str | Path) -> None:
        """Load from a local folder holding ``vision/`` (HF CLIP or CLIPVision checkpoint, e.g.
        openai/clip-vit-base-patch16) and ``text/`` (HF BERT checkpoint with ``text_layers +
        fusion_layers`` layers, e.g. bert-base-uncased): BERT layers 0..text_layers-1 -> LEn,
        the rest -> the F units' self-attention and FFN (their cross-attention stays freshly
        initialised, as X-VLM starts from BERT), BERT's pooler -> ``pooler``. The contrastive
        projections keep their initialisation."""
        folder = require_folder(folder, f"{self.preset} weights")
        hint = f"{self.preset} weights (expects vision/ and text/)"
        load_clip_vision(require_folder(folder / "vision", hint), self.vision_embeddings,
                         [self.blocks[n] for n in self.units_of("vision")], self.vision_norm)
        load_text_tower(require_folder(folder / "text", hint), self.text_embeddings,
                        [self.blocks[n] for n in self.units_of("text")],
                        [self.blocks[n] for n in self.units_of("fusion")], pooler=self.pooler)


def _build(preset: str, weights: str | Path | None, defaults: dict, overrides: dict) -> XVLM:
    config = config_from_overrides(XVLMConfig, {**defaults, **overrides}, preset)

    def make() -> XVLM:
        model = XVLM(config)
        init_bert_style(model)
        return model

    model = build_seeded(make, config.seed)
    model.preset = preset
    if weights is not None:
        model.load_weights(weights)
    return model


def build_xvlm_clip(weights: str | Path | None = None, **overrides) -> XVLM:
    """``xvlm-clip``: CLIP-ViT-B/16 (224 px, 12 layers), BERT-base as 6 text + 6 fusion layers.
    ``overrides``: any :class:`XVLMConfig` field; ``weights``: see :meth:`XVLM.load_weights`."""
    return _build("xvlm-clip", weights, {}, overrides)


def build_xvlm_clip_small(weights: str | Path | None = None, **overrides) -> XVLM:
    """``xvlm-clip-small``: EfficientVLM's student, vision 6 / text 3 / fusion 3 layers, same widths."""
    return _build("xvlm-clip-small", weights, {"vision_layers": 6, "text_layers": 3, "fusion_layers": 3}, overrides)


# ---------------------------------------------------------------------------- distillation
def student_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer (0-based) paired with each student layer: student ``i`` <-> teacher
    ``2i + 1``, so the last student layer meets the last teacher layer (EfficientVLM's
    layer-halved student: every other layer of each encoder, initialised from and distilled
    against the matching teacher layer). Needs ``n_teacher == 2 * n_student``.

    >>> student_layer_map(3, 6)
    [1, 3, 5]
    """
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in (n_student, n_teacher)):
        raise ValueError(f"layer counts must be positive ints, got n_student={n_student!r}, n_teacher={n_teacher!r}")
    if n_teacher != 2 * n_student:
        raise ValueError(f"layer map needs a teacher with twice the student's layers: n_student={n_student} "
                         f"needs n_teacher={2 * n_student}, got n_teacher={n_teacher}")
    return [2 * i + 1 for i in range(n_student)]


def student_unit_map(student: XVLM, teacher: XVLM) -> dict[str, str]:
    """Student unit name -> teacher unit name, per encoder (vision, text, fusion), through
    :func:`student_layer_map` (e.g. ``{"VEn0": "VEn1", ..., "F2": "F5"}`` for 6/3/3 vs 12/6/6)."""
    out: dict[str, str] = {}
    for modality in ("vision", "text", "fusion"):
        s, t = student.units_of(modality), teacher.units_of(modality)
        try:
            pairs = student_layer_map(len(s), len(t))
        except ValueError as e:
            raise ValueError(f"{modality} units: {e}") from None
        out.update({s[i]: t[j] for i, j in enumerate(pairs)})
    return out
