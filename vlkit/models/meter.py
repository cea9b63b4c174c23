"""METER-CLIP16-RoBERTa (Dou et al., "An Empirical Study of Training End-to-End
Vision-and-Language Transformers", CVPR 2022) behind the backbone protocol.

Architecture (the paper's co-attention fusion; code: zdou0830/METER
``meter/modules/meter_module.py::METERTransformerSS.infer``, ``clip_model.py``, ``bert_model.py``):

* vision: CLIP ViT-B/16 at 384x384 -> 576 patches + CLS = 577 tokens; ``ln_pre``, 12 pre-norm
  quick-GELU blocks (units ``VEn0..VEn11``), ``ln_post`` on every token;
* text: RoBERTa-base (vocab 50265, 12 post-norm layers, units ``LEn0..LEn11``);
* into the fusion width: ``cross_modal_image_transform`` / ``cross_modal_text_transform``
  (Linear) plus ``token_type_embeddings`` (0 = text, 1 = image; NLVR2 uses 2 for its second
  image), applied by :meth:`METER._after_unit` right after the last unit of each tower, so any
  ``run_units`` cut point sees consistent streams;
* fusion: 6 co-attention depths; at depth i the text layer ``FL{i}`` and the image layer
  ``FV{i}`` (each BERT self-attention -> cross-attention to the other side -> FFN, post-norm;
  METER's ``BertCrossLayer``) both read the *other* stream as it was after depth i-1::

      x1 = text_layer(x, y); y1 = image_layer(y, x); x, y = x1, y1

  The units run in the order ``FL0, FV0, FL1, FV1, ...``; the protocol's ``State.snapshots``
  (``UnitSpec.depth``) hands ``FV{i}`` the text stream from before ``FL{i}`` ran.
* pooled output: ``cat(tanh(W_t x[:, 0]), tanh(W_v y[:, 0]))`` -- METER's
  ``cross_modal_text_pooler`` and ``cross_modal_image_pooler`` (``cls_feats``), (B, 2 * 768).

``encode_image`` / ``encode_text`` (contrastive use) return the towers' *unnormalised* CLS
features: CLIP's ``ln_post(h_CLS)`` (= HF ``CLIPVisionModel.pooler_output``), (B, 768), and
RoBERTa's last-layer ``<s>`` state, (B, 768). METER itself has no contrastive projection.

Note: METER's own ``clip_model.Transformer`` builds ``layers - 1`` = 11 CLIP blocks (it drops
CLIP's last block); this preset keeps the 12 of CLIP-ViT-B/16 as the paper describes it.
``build_meter_clip16_roberta(vision_layers=11)`` gives the code's variant (random weights; the
loader expects as many CLIP layers as units).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .protocol import BackboneOutput, State, UnitSpec
from .towers import (CLIPVisionEmbeddings, Pooler, TextEmbeddings, TwoTowerBackbone, bert_layers,
                     build_seeded, check_token_ids, clip_vision_layers, config_from_overrides, init_bert_style,
                     load_clip_vision, load_text_tower, require_folder)


@dataclass(frozen=True)
class METERConfig:
    """METER-CLIP16-RoBERTa hyper-parameters (METER ``meter/config.py``: named configs ``clip16``
    + ``text_roberta``, ``num_top_layer=6``, ``hidden_size=768``, ``max_text_len=40``; 384 px as
    in its retrieval / SNLI fine-tuning configs; RoBERTa-base's own config for the text tower;
    the fusion layers use ``RobertaConfig`` defaults: GELU, LayerNorm eps 1e-12)."""

    # vision tower: CLIP ViT-B/16
    image_size: int = 384
    patch_size: int = 16
    vision_dim: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_ffn_dim: int = 3072
    vision_act: str = "quick_gelu"
    vision_eps: float = 1e-5
    # text tower: RoBERTa-base
    vocab_size: int = 50265
    text_dim: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_ffn_dim: int = 3072
    text_eps: float = 1e-5
    max_positions: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    # fusion: BertCrossLayer x 6 per side (BertConfig defaults: GELU, eps 1e-12)
    hidden_dim: int = 768
    fusion_layers: int = 6
    fusion_heads: int = 12
    fusion_ffn_dim: int = 3072
    fusion_eps: float = 1e-12
    num_token_types: int = 2
    # inputs and seeding
    text_len: int = 40
    seed: int = 0

    def __post_init__(self):
        for name in ("vision_layers", "text_layers", "fusion_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        check_token_ids(self)


class METER(TwoTowerBackbone):
    """METER co-attention backbone (see the module docstring). Streams: ``"vision"``, ``"text"``."""

    def __init__(self, config: METERConfig, *, vision_embeddings: nn.Module | None = None,
                 text_embeddings: TextEmbeddings | None = None):
        """``vision_embeddings`` / ``text_embeddings`` replace CLIP's patch embedding / RoBERTa's
        embeddings (the ``meter-mini`` preset passes EfficientNet cell embeddings and BERT-style
        MiniLM embeddings; see :class:`~vlkit.models.towers.TwoTowerBackbone`)."""
        super().__init__()
        c = self.config = config
        self.vision_embeddings = vision_embeddings if vision_embeddings is not None else CLIPVisionEmbeddings(
            c.image_size, c.patch_size, c.vision_dim, eps=c.vision_eps)
        self.vision_norm = nn.LayerNorm(c.vision_dim, eps=c.vision_eps)  # CLIP ln_post, every token
        self.text_embeddings = text_embeddings if text_embeddings is not None else TextEmbeddings(
            c.vocab_size, c.text_dim, c.max_positions, c.type_vocab_size, c.pad_token_id, eps=c.text_eps,
            position_style="roberta")
        self.image_transform = nn.Linear(c.vision_dim, c.hidden_dim)  # cross_modal_image_transform
        self.text_transform = nn.Linear(c.text_dim, c.hidden_dim)  # cross_modal_text_transform
        self.token_type_embeddings = nn.Embedding(c.num_token_types, c.hidden_dim)
        self.text_pooler = Pooler(c.hidden_dim)  # cross_modal_text_pooler
        self.image_pooler = Pooler(c.hidden_dim)  # cross_modal_image_pooler

        specs = [UnitSpec(f"VEn{i}", "vision", "vision") for i in range(c.vision_layers)]
        specs += [UnitSpec(f"LEn{i}", "text", "text") for i in range(c.text_layers)]
        modules = clip_vision_layers(c.vision_layers, c.vision_dim, c.vision_heads, c.vision_ffn_dim,
                                     act=c.vision_act, eps=c.vision_eps)
        modules += bert_layers(c.text_layers, c.text_dim, c.text_heads, c.text_ffn_dim, eps=c.text_eps)
        fl = bert_layers(c.fusion_layers, c.hidden_dim, c.fusion_heads, c.fusion_ffn_dim, eps=c.fusion_eps, cross=True)
        fv = bert_layers(c.fusion_layers, c.hidden_dim, c.fusion_heads, c.fusion_ffn_dim, eps=c.fusion_eps, cross=True)
        for i in range(c.fusion_layers):
            specs += [UnitSpec(f"FL{i}", "fusion", "text", context="vision", depth=i),
                      UnitSpec(f"FV{i}", "fusion", "vision", context="text", depth=i)]
            modules += [fl[i], fv[i]]
        self._register_units(specs, modules)
        # index of the unit after which each tower goes to the fusion width (None: no units,
        # so ``embed`` does it)
        self._last_vision = c.vision_layers - 1 if c.vision_layers else None
        self._last_text = c.vision_layers + c.text_layers - 1 if c.text_layers else None

    # ------------------------------------------------------------------ into the fusion width
    def vision_to_fusion(self, x: torch.Tensor, token_type: int = 1) -> torch.Tensor:
        """``W_v ln_post(y) + b_v + E_type[token_type]`` (METER ``infer``: vit_model ->
        cross_modal_image_transform -> + token_type_embeddings(image_token_type_idx))."""
        return self.image_transform(self.vision_norm(x)) + self.token_type_embeddings.weight[token_type]

    def text_to_fusion(self, x: torch.Tensor) -> torch.Tensor:
        """``W_t x + b_t + E_type[0]`` (cross_modal_text_transform + token_type_embeddings(0))."""
        return self.text_transform(x) + self.token_type_embeddings.weight[0]

    def _after_unit(self, i: int, state: State) -> None:
        if i == self._last_vision:
            state.streams["vision"] = self.vision_to_fusion(state.streams["vision"],
                                                            state.extra.get("image_token_type_idx", 1))
        if i == self._last_text:
            state.streams["text"] = self.text_to_fusion(state.streams["text"])

    # ------------------------------------------------------------------ protocol
    def embed(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None, image_token_type_idx: int = 1, *,
              image_feats: torch.Tensor | None = None) -> State:
        """Embeddings of both towers. ``attention_mask`` (B, L) marks real tokens (1); the
        image stream has no padding (mask ``None``). ``image_token_type_idx``: 1, or 2 for
        the second image of an NLVR2 pair (after growing ``token_type_embeddings``).
        ``image_feats``: cached CNN cells instead of pixels (cell-embedding presets only)."""
        if input_ids is None:
            raise ValueError("input_ids is required")
        if pixel_values is not None:
            self._check_batch(pixel_values, input_ids)
        n_types = self.token_type_embeddings.num_embeddings
        if not 1 <= image_token_type_idx < n_types:
            raise ValueError(f"image_token_type_idx={image_token_type_idx} must be in [1, {n_types})")
        vision = self.vision_tokens(pixel_values, image_feats)
        self._check_batch(vision, input_ids)
        state = State(streams={"vision": vision, "text": self.text_embeddings(input_ids)},
                      masks={"vision": None, "text": attention_mask},
                      extra={"image_token_type_idx": image_token_type_idx})
        if self._last_vision is None:
            state.streams["vision"] = self.vision_to_fusion(state.streams["vision"], image_token_type_idx)
        if self._last_text is None:
            state.streams["text"] = self.text_to_fusion(state.streams["text"])
        return state

    def finalize(self, state: State) -> BackboneOutput:
        """Pooled: ``cat(text_pooler(x), image_pooler(y))`` (METER's ``cls_feats``), (B, 2H)."""
        x, y = state.streams["text"], state.streams["vision"]
        pooled = torch.cat([self.text_pooler(x), self.image_pooler(y)], dim=-1)
        return BackboneOutput(pooled=pooled, sequences={"text": x, "vision": y}, masks=dict(state.masks))

    def encode_image(self, pixel_values: torch.Tensor | None = None, *,
                     image_feats: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Dv) CLIP CLS feature ``ln_post(h_CLS)`` of the vision tower alone (not normalised)."""
        return self.vision_features(pixel_values, image_feats=image_feats)[:, 0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Dt) RoBERTa ``<s>`` state of the text tower alone (not normalised)."""
        return self.text_features(input_ids, attention_mask)[:, 0]

    def parts(self) -> dict[str, list[nn.Module]]:
        """Modules per part, covering every parameter once: ``vision`` (= HF CLIPVisionModel:
        embeddings, pre-LN, blocks, post-LN), ``text`` (= HF RobertaModel without pooler) and
        ``fusion`` (transforms, token types, FL/FV, poolers)."""
        blocks = lambda m: [self.blocks[n] for n in self.units_of(m)]  # noqa: E731
        return {"vision": [self.vision_embeddings, *blocks("vision"), self.vision_norm],
                "text": [self.text_embeddings, *blocks("text")],
                "fusion": [self.image_transform, self.text_transform, self.token_type_embeddings,
                           *blocks("fusion"), self.text_pooler, self.image_pooler]}

    # ------------------------------------------------------------------ weights
    def load_weights(self, folder: str | Path) -> None:
        """Load the towers from a local folder holding ``vision/`` (a HF CLIP or CLIPVision
        checkpoint, e.g. openai/clip-vit-base-patch16; its 224-px position table is resized to
        384 as METER does) and ``text/`` (a HF RoBERTa checkpoint, e.g. roberta-base). The
        fusion layers, transforms and poolers keep their initialisation (METER pre-trains them)."""
        folder = require_folder(folder, f"{self.preset} weights")
        hint = f"{self.preset} weights (expects vision/ and text/)"
        load_clip_vision(require_folder(folder / "vision", hint), self.vision_embeddings,
                         [self.blocks[n] for n in self.units_of("vision")], self.vision_norm)
        load_text_tower(require_folder(folder / "text", hint), self.text_embeddings,
                        [self.blocks[n] for n in self.units_of("text")])


def build_meter_clip16_roberta(weights: str | Path | None = None, **overrides) -> METER:
    """``meter-clip16-roberta``: METER with CLIP-ViT-B/16 (384 px) and RoBERTa-base, 6 co-attention
    depths. ``overrides``: any :class:`METERConfig` field (tests build tiny versions);
    ``weights``: local folder for :meth:`METER.load_weights`. Random weights are seeded by
    ``seed`` (BERT-style N(0, 0.02) initialisation, as METER's ``init_weights``)."""
    config = config_from_overrides(METERConfig, overrides, "meter-clip16-roberta")

    def make() -> METER:
        model = METER(config)
        init_bert_style(model)
        return model

    model = build_seeded(make, config.seed)
    model.preset = "meter-clip16-roberta"
    if weights is not None:
        model.load_weights(weights)
    return model
