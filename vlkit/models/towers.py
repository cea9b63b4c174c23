"""Shared pieces of the two-tower presets (METER, X-VLM): embeddings, tower layers, poolers,
and loading a tower from a local Hugging Face checkpoint folder.

* :class:`CLIPVisionEmbeddings` -- CLIP ViT patch/class/position embeddings followed by
  CLIP's ``ln_pre`` (Radford et al. 2021; HF ``CLIPVisionEmbeddings`` + ``pre_layrnorm``).
* :class:`TextEmbeddings` -- BERT / RoBERTa word + position + token-type embeddings, then
  LayerNorm (Devlin et al. 2019; Liu et al. 2019). ``position_style="roberta"`` numbers
  positions from ``pad_token_id + 1`` and leaves padding at ``pad_token_id`` (HF
  ``create_position_ids_from_input_ids``).
* :class:`Pooler` -- BERT's pooler ``tanh(W h_CLS + b)`` (also METER's ``heads.Pooler``).
* :func:`clip_vision_layers`, :func:`bert_layers` -- lists of
  :class:`~vlkit.models.layers.TransformerLayer` with the libraries' hyper-parameters.
* :func:`load_clip_vision`, :func:`load_text_tower` -- fill those from a local folder through
  ``transformers``' ``from_pretrained`` (no hub) and :mod:`vlkit.models.convert`.
* :class:`TwoTowerBackbone` -- the protocol pieces METER and X-VLM share (running one tower
  alone, seeded ``dummy_inputs``).

Module names inside :class:`TextEmbeddings` and :class:`Pooler` follow Hugging Face's, so
their state dicts load unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .convert import bert_layer_state, checkpoint_dir, clip_layer_state, load_layer
from .layers import TransformerLayer
from .protocol import Backbone, UnitContext, UnknownNameError


# ---------------------------------------------------------------------------- embeddings
class CLIPVisionEmbeddings(nn.Module):
    """``ln_pre([x_cls; x_p^1 E; ...; x_p^N E] + E_pos)`` -- CLIP's ViT input (Radford et al.
    2021, Sec. 2.4; METER's ``VisualTransformer.forward`` up to ``ln_pre``).

    pixel_values (B, C, S, S) -> (B, 1 + (S/P)^2, D). The patch projection has no bias, as in
    CLIP.
    """

    def __init__(self, image_size: int, patch_size: int, dim: int, eps: float = 1e-5, channels: int = 3):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size, self.patch_size, self.dim = image_size, patch_size, dim
        self.num_patches = (image_size // patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.num_patches + 1, dim)
        self.pre_norm = nn.LayerNorm(dim, eps=eps)

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be (B, C, {self.image_size}, {self.image_size}); "
                             f"got {tuple(pixel_values.shape)}")
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.weight[None]
        return self.pre_norm(x)


class TextEmbeddings(nn.Module):
    """``LN(E_word[ids] + E_pos[pos] + E_type[types])`` -- BERT (Devlin et al. 2019, Fig. 2)
    and RoBERTa (HF ``RobertaEmbeddings``: ``position_style="roberta"``)."""

    def __init__(self, vocab_size: int, dim: int, max_positions: int, type_vocab_size: int = 2,
                 pad_token_id: int = 0, eps: float = 1e-12, position_style: str = "absolute",
                 dropout: float = 0.0):
        super().__init__()
        if position_style not in ("absolute", "roberta"):
            raise ValueError(f"position_style must be 'absolute' or 'roberta', got {position_style!r}")
        self.position_style, self.pad_token_id = position_style, pad_token_id
        pos_pad = pad_token_id if position_style == "roberta" else None
        self.word_embeddings = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_positions, dim, padding_idx=pos_pad)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)  # HF's name, so HF state dicts load as is
        self.dropout = dropout

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        # largest position a length-n sequence can reach (checked from the shape: no device sync)
        top = n + self.pad_token_id if self.position_style == "roberta" else n - 1
        if top >= self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {n} tokens needs position {top}, beyond the "
                             f"{self.position_embeddings.num_embeddings} position embeddings")
        if self.position_style == "roberta":
            keep = input_ids.ne(self.pad_token_id).long()
            return torch.cumsum(keep, dim=1) * keep + self.pad_token_id
        return torch.arange(n, device=input_ids.device)[None].expand_as(input_ids)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids(input_ids))
             + self.token_type_embeddings(token_type_ids))
        x = self.LayerNorm(x)
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


class Pooler(nn.Module):
    """``tanh(W h_0 + b)`` on the first token (BERT's pooler; METER's ``heads.Pooler``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


# ---------------------------------------------------------------------------- layers
def clip_vision_layers(num_layers: int, dim: int, heads: int, ffn_dim: int, *, act: str = "quick_gelu",
                       eps: float = 1e-5) -> list[TransformerLayer]:
    """CLIP ViT residual blocks: pre-norm, quick-GELU MLP (CLIP's ``ResidualAttentionBlock``)."""
    return [TransformerLayer(dim, heads, ffn_dim, norm="pre", act=act, eps=eps) for _ in range(num_layers)]


def bert_layers(num_layers: int, dim: int, heads: int, ffn_dim: int, *, act: str = "gelu", eps: float = 1e-12,
                cross: bool = False, context_dim: int | None = None) -> list[TransformerLayer]:
    """BERT/RoBERTa post-norm layers; ``cross=True`` gives BERT's cross-attention layer
    (self-attn -> cross-attn -> FFN, as METER's ``BertCrossLayer`` and X-VLM's fusion layers)."""
    return [TransformerLayer(dim, heads, ffn_dim, norm="post", act=act, eps=eps, cross=cross,
                             context_dim=context_dim) for _ in range(num_layers)]


def init_bert_style(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation (``BertPreTrainedModel._init_weights``; METER's ``init_weights``):
    Linear / Conv / Embedding weights ~ N(0, std), biases 0, LayerNorm (1, 0); CLIP's class
    embedding ~ N(0, std)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        if isinstance(m, CLIPVisionEmbeddings):
            nn.init.normal_(m.class_embedding, std=std)


def count_params(modules: Sequence[nn.Module]) -> int:
    """Number of distinct parameters in ``modules`` (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


# ---------------------------------------------------------------------------- loading
def require_folder(path: str | Path, what: str) -> Path:
    """``path`` as a :class:`Path` if it is an existing folder, else a clear error."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what}: checkpoint folder {str(p)!r} does not exist (or is not a folder); "
                                "pass a local folder written by `save_pretrained` -- vlkit never downloads")
    return p


def _check(what: str, field: str, ours, theirs) -> None:
    if ours != theirs:
        raise ValueError(f"{what}: checkpoint has {field}={theirs!r} but the preset was built with {ours!r}; "
                         f"build it with {field}={theirs!r}")


def interpolate_position_embedding(weight: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize a ViT position table (1 + g^2, D) to (1 + num_patches, D) with bicubic interpolation
    of the patch grid, the class position kept (METER's ``adapt_position_encoding``; X-VLM's
    ``interpolate_pos_embed``)."""
    g_old, g_new = math.isqrt(weight.shape[0] - 1), math.isqrt(num_patches)
    if g_old * g_old != weight.shape[0] - 1 or g_new * g_new != num_patches:
        raise ValueError(f"position table of {weight.shape[0]} rows or {num_patches} patches is not a square grid")
    if g_old == g_new:
        return weight
    grid = weight[1:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(g_new * g_new, -1).to(weight.dtype)
    return torch.cat([weight[:1], grid], dim=0)


@torch.no_grad()
def load_clip_vision(folder: str | Path, embeddings: CLIPVisionEmbeddings, layers: Sequence[nn.Module],
                     post_norm: nn.LayerNorm) -> None:
    """Load a CLIP vision tower from ``folder`` (a ``CLIPVisionModel`` or ``CLIPModel``
    checkpoint, via ``CLIPVisionModel.from_pretrained``): embeddings + ``pre_layrnorm`` ->
    ``embeddings``, encoder layer i -> ``layers[i]``, ``post_layernorm`` -> ``post_norm``.
    A checkpoint at another resolution gets its position table interpolated (as METER does
    for CLIP-224 -> 384)."""
    from transformers import CLIPVisionModel

    folder = checkpoint_dir(folder)
    hf = CLIPVisionModel.from_pretrained(folder, local_files_only=True)
    hf = getattr(hf, "vision_model", hf)  # transformers < 5 nests the tower one level down
    cfg = hf.config
    _check("CLIP vision tower", "vision_layers", len(layers), cfg.num_hidden_layers)
    _check("CLIP vision tower", "vision_dim", embeddings.dim, cfg.hidden_size)
    _check("CLIP vision tower", "patch_size", embeddings.patch_size, cfg.patch_size)
    emb = hf.embeddings
    embeddings.class_embedding.copy_(emb.class_embedding)
    embeddings.patch_embedding.weight.copy_(emb.patch_embedding.weight)
    embeddings.position_embedding.weight.copy_(
        interpolate_position_embedding(emb.position_embedding.weight, embeddings.num_patches))
    embeddings.pre_norm.load_state_dict(hf.pre_layrnorm.state_dict())
    for ours, theirs in zip(layers, hf.encoder.layers):
        load_layer(ours, clip_layer_state(theirs.state_dict()))
    post_norm.load_state_dict(hf.post_layernorm.state_dict())


@torch.no_grad()
def load_text_tower(folder: str | Path, embeddings: TextEmbeddings, layers: Sequence[nn.Module],
                    fusion_layers: Sequence[nn.Module] = (), pooler: Pooler | None = None) -> None:
    """Load a BERT / RoBERTa checkpoint from ``folder`` (``AutoModel.from_pretrained``):
    embeddings -> ``embeddings``, layers 0..n-1 -> ``layers``, the next layers ->
    ``fusion_layers`` (self-attention and FFN only: their cross-attention keeps its fresh
    initialisation, which is how X-VLM starts its fusion layers from BERT layers 6-11), and
    the pooler -> ``pooler`` when the checkpoint has one."""
    from transformers import AutoModel

    folder = checkpoint_dir(folder)
    hf, info = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    hf_layers = list(hf.encoder.layer)
    want = len(layers) + len(fusion_layers)
    _check("text tower", "number of text (+ fusion) layers", want, len(hf_layers))
    _check("text tower", "text_dim", embeddings.word_embeddings.embedding_dim, hf.config.hidden_size)
    embeddings.load_state_dict(hf.embeddings.state_dict())
    for ours, theirs in zip(layers, hf_layers):
        load_layer(ours, bert_layer_state(theirs.state_dict()))
    for ours, theirs in zip(fusion_layers, hf_layers[len(layers):]):
        missing, unexpected = ours.load_state_dict(bert_layer_state(theirs.state_dict()), strict=False)
        bad = [k for k in missing if not k.startswith(("cross_attn.", "cross_norm.", "adapters."))] + list(unexpected)
        if bad:
            raise ValueError(f"text tower: fusion layer does not match the checkpoint's layer: {bad}")
    has_pooler = getattr(hf, "pooler", None) is not None and not any(
        k.startswith("pooler.") for k in info.get("missing_keys", ()))
    if pooler is not None and has_pooler:
        pooler.load_state_dict(hf.pooler.state_dict())


# ---------------------------------------------------------------------------- presets
def config_from_overrides(config_cls, overrides: dict, preset: str):
    """``config_cls(**overrides)``, naming any override the preset does not know."""
    valid = [f.name for f in dataclasses.fields(config_cls)]
    for key in overrides:
        if key not in valid:
            raise UnknownNameError(f"override of {preset}", key, valid)
    return config_cls(**overrides)


def build_seeded(factory, seed: int) -> nn.Module:
    """Run ``factory()`` under ``torch.manual_seed(seed)`` without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


class TwoTowerBackbone(Backbone):
    """What METER and X-VLM share: a CLIP vision tower (``vision_embeddings``, the ``vision``
    units, ``vision_norm`` = CLIP's ``ln_post`` / ``post_layernorm`` applied to *every* token,
    as both papers' code does) and a BERT-style text tower (``text_embeddings``, the ``text``
    units). Subclasses add the fusion units, ``embed``, ``finalize`` and the encoders' heads.

    ``config`` needs: image_size, vocab_size, text_len, pad/bos/eos_token_id.

    Pluggable vision embeddings: ``vision_embeddings`` is any module that maps the image input
    to ``(B, Nv, Dv)`` tokens. CLIP's patch embedding takes ``pixel_values``; an embedding with
    ``takes_features = True`` (the mini presets' :class:`vlkit.models.mini.CellEmbeddings`) is
    called as ``vision_embeddings(image_feats=..., pixel_values=...)`` and may also supply
    ``dummy_inputs(batch_size, generator, pixels=False)``.
    """

    config: object
    vision_embeddings: CLIPVisionEmbeddings
    vision_norm: nn.LayerNorm
    text_embeddings: TextEmbeddings

    def _run_tower(self, modality: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the (possibly replaced) units of one tower on ``x``, with no fusion transform."""
        for name in self.units_of(modality):
            x = self.blocks[name](x, UnitContext(mask=mask))
        return x

    def vision_tokens(self, pixel_values: torch.Tensor | None = None,
                      image_feats: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Nv, Dv) vision embeddings: of ``pixel_values``, or -- for embeddings with
        ``takes_features`` (cell embeddings) -- of cached ``image_feats``."""
        if getattr(self.vision_embeddings, "takes_features", False):
            return self.vision_embeddings(image_feats=image_feats, pixel_values=pixel_values)
        if image_feats is not None:
            raise ValueError(f"preset {self.preset!r} embeds pixel_values with a patch projection and takes no "
                             "image_feats (cached CNN cells are for presets with cell embeddings: the *-mini ones)")
        if pixel_values is None:
            raise ValueError(f"preset {self.preset!r} needs pixel_values")
        return self.vision_embeddings(pixel_values)

    def vision_features(self, pixel_values: torch.Tensor | None = None, *,
                        image_feats: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + N, Dv): the vision tower alone, after ``vision_norm`` (CLIP's ``ln_post``)."""
        return self.vision_norm(self._run_tower("vision", self.vision_tokens(pixel_values, image_feats)))

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, Dt): the text tower alone (embeddings + text units)."""
        return self._run_tower("text", self.text_embeddings(input_ids, token_type_ids), attention_mask)

    @staticmethod
    def _check_batch(images: torch.Tensor, input_ids: torch.Tensor) -> None:
        """``images``: pixel_values or the embedded vision tokens (same batch)."""
        if images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"the images have batch {images.shape[0]} but input_ids has batch "
                             f"{input_ids.shape[0]}")

    def dummy_inputs(self, batch_size: int = 1, *, pixels: bool = False) -> dict:
        """Seeded inputs at the preset's size: ``pixel_values`` (B, 3, S, S) ~ N(0, 1) (or what the
        vision embeddings' own ``dummy_inputs`` give) and ``text_len`` token ids (BOS ... EOS,
        no padding) with an all-ones ``attention_mask``, on the model's device. ``pixels=True``
        asks cell embeddings for 0..255 ``pixel_values`` instead of cached cells (end-to-end)."""
        c = self.config
        g = torch.Generator().manual_seed(0)
        if hasattr(self.vision_embeddings, "dummy_inputs"):  # e.g. cached cells for cell embeddings
            images = self.vision_embeddings.dummy_inputs(batch_size, g, pixels=pixels)
        else:
            images = {"pixel_values": torch.randn(batch_size, 3, c.image_size, c.image_size, generator=g)}
        low = max(c.pad_token_id, c.bos_token_id, c.eos_token_id) + 1
        ids = torch.randint(low, c.vocab_size, (batch_size, c.text_len), generator=g)
        ids[:, 0], ids[:, -1] = c.bos_token_id, c.eos_token_id
        device = self.text_embeddings.word_embeddings.weight.device
        return {**{k: v.to(device) for k, v in images.items()}, "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device)}


def check_token_ids(c) -> None:
    """Special token ids must index the vocabulary (and leave room for ordinary tokens)."""
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if not 0 <= getattr(c, name) < c.vocab_size - 1:
            raise ValueError(f"{name}={getattr(c, name)} does not fit vocab_size={c.vocab_size}")
