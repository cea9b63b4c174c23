"""ViLT behind the backbone protocol: the ``vilt-b32`` preset.

Architecture (Kim et al., 2021, "ViLT: Vision-and-Language Transformer Without Convolution
or Region Supervision", Sec. 3.1, Eqs. 1-5; HF ``transformers.ViltModel``):

* embed (Eqs. 1-2): text ``t = [t_cls; t_1..t_L] + T_pos`` (BERT embeddings), image
  ``v = [v_cls; patches P] + V_pos`` (32x32 patches, position embeddings interpolated to the
  image's patch grid), each plus its modality-type embedding, concatenated
  ``z0 = [t + t_type; v + v_type]`` -- HF ``ViltEmbeddings``, reused;
* units ``En0 .. En11`` (Eqs. 3-4), pre-norm ViT layers
  ``z = z + MSA(LN(z)); z = z + MLP(LN(z))`` -- :class:`vlkit.models.layers.TransformerLayer`
  (``norm="pre"``) loaded from ``ViltLayer`` weights; one stream ``"joint"``, modality ``joint``;
* pooled (Eq. 5): ``p = tanh(W LN(z_L)[0])`` -- final LayerNorm + HF ``ViltPooler`` on the text
  [CLS] token.

Token count: ``N = L_text + 1 + (H/32)(W/32)``; at the paper-style dummy size (40 text tokens,
320 x 640 pixels) ``N = 40 + 1 + 10 * 20 = 241``, the DAS paper's accounting point.

Patch order. ``ViltEmbeddings.visual_embed`` keeps ``min(max_image_length, #valid patches)``
patches (``max_image_length=-1``, the HF default, keeps all) and draws them with
``torch.multinomial``, so the image tokens come out in a random order -- a random
*permutation* even when every patch is kept. That is harmless for one forward pass (attention
is permutation-equivariant and position embeddings travel with the patches) but would make two
passes disagree token by token (teacher vs student in distillation, cached prefixes). vlkit
therefore draws that permutation from a private generator seeded with ``patch_seed`` (default
0), so every pass over the same inputs gives the same token order; ``patch_seed=None`` restores
the library's global-RNG behaviour (ViLT's patch-sampling augmentation).

Builders return the backbone in eval mode (as ``from_pretrained`` does); call ``.train()`` to
fine-tune. Dropout rates come from the config.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import ViltConfig, ViltModel
from transformers.models.vilt.modeling_vilt import ViltEmbeddings, ViltPooler

from .convert import hf_activation, hf_config, layer_from_state, load_pretrained, vit_layer_state
from .layers import TransformerLayer
from .protocol import Backbone, BackboneOutput, State, UnitSpec

__all__ = ["ViltBackbone", "vilt_config", "build_vilt_b32"]

STREAM = "joint"


class ViltBackbone(Backbone):
    """ViLT: HF ``ViltEmbeddings`` -> units ``En*`` (pre-norm) -> LayerNorm -> ``ViltPooler``.

    Inputs: ``input_ids`` (B, L), ``pixel_values`` (B, 3, H, W), optional ``attention_mask``
    (B, L), ``token_type_ids`` (B, L), ``pixel_mask`` (B, H, W) (1 = real pixel) and
    ``image_token_type_idx`` (1; 2 for the second image of an NLVR2 pair, as in ViLT).
    The joint sequence is ``[text tokens; image CLS; patches]``; ``state.extra["num_text"]``
    holds the text length.
    """

    def __init__(self, config: ViltConfig, patch_seed: int | None = 0, *, embeddings: ViltEmbeddings | None = None,
                 norm: nn.LayerNorm | None = None, pooler: ViltPooler | None = None,
                 layers: list[nn.Module] | None = None):
        """Fresh modules from ``config`` (PyTorch default initialisation) unless given; the
        builders pass the modules of an HF model through :meth:`from_hf`."""
        super().__init__()
        self.config = config
        self.patch_seed = patch_seed
        self.embeddings = embeddings if embeddings is not None else ViltEmbeddings(config)
        self.norm = norm if norm is not None else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = pooler if pooler is not None else ViltPooler(config)
        if layers is None:
            layers = [TransformerLayer(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                                       **self.layer_kwargs(config)) for _ in range(config.num_hidden_layers)]
        self._register_units([UnitSpec(f"En{i}", "joint", STREAM) for i in range(len(layers))], layers)

    @staticmethod
    def layer_kwargs(c: ViltConfig) -> dict:
        """``TransformerLayer`` settings of a ViLT layer: pre-norm, the config's activation, eps, dropouts."""
        return dict(norm="pre", act=hf_activation(c.hidden_act), eps=c.layer_norm_eps,
                    dropout=c.hidden_dropout_prob, attn_dropout=c.attention_probs_dropout_prob)

    @classmethod
    def from_hf(cls, hf: ViltModel, patch_seed: int | None = 0) -> "ViltBackbone":
        """Copy a HF ``ViltModel`` (with pooler) into a :class:`ViltBackbone` with identical
        outputs (same patch order when HF runs under ``torch.manual_seed(patch_seed)``).
        ``hf`` is left untouched (its tensors are copied)."""
        if getattr(hf, "pooler", None) is None:
            raise ValueError("the HF model has no pooler (add_pooling_layer=False); build it with the pooler")
        c, sd = hf.config, hf.state_dict()
        layers = [layer_from_state(vit_layer_state(sd, f"encoder.layer.{i}."), c.num_attention_heads,
                                   **cls.layer_kwargs(c)) for i in range(c.num_hidden_layers)]
        model = cls(c, patch_seed, embeddings=copy.deepcopy(hf.embeddings), norm=copy.deepcopy(hf.layernorm),
                    pooler=copy.deepcopy(hf.pooler), layers=layers)
        return model.train(hf.training)

    # ------------------------------------------------------------------ protocol
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None, pixel_mask: torch.Tensor | None = None,
              image_token_type_idx: int = 1) -> State:
        """ViLT's joint embedding ``z0`` (Kim et al., Eq. 2) and its keep-mask."""
        if input_ids.dim() != 2 or pixel_values.dim() != 4:
            raise ValueError(f"need input_ids (B, L) and pixel_values (B, C, H, W); got {tuple(input_ids.shape)} "
                             f"and {tuple(pixel_values.shape)}")
        b, n = input_ids.shape
        if pixel_values.shape[0] != b:
            raise ValueError(f"batch sizes differ: {b} texts, {pixel_values.shape[0]} images")
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{n} text tokens exceed max_position_embeddings={self.config.max_position_embeddings}")
        p = self.config.patch_size
        if pixel_values.shape[-2] < p or pixel_values.shape[-1] < p:
            raise ValueError(f"images of {tuple(pixel_values.shape[-2:])} pixels are smaller than one {p}x{p} patch")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        unpadded = pixel_mask is None or bool(pixel_mask.all())
        if pixel_mask is None:
            pixel_mask = torch.ones((b, *pixel_values.shape[-2:]), dtype=torch.long, device=pixel_values.device)
        args = (input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, None, None)
        embed = self._embed_unpadded if unpadded else self.embeddings
        if self.patch_seed is None:
            z, mask = embed(*args, image_token_type_idx=image_token_type_idx)
        else:  # the patch permutation comes from the CPU generator (torch.multinomial on a CPU tensor)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.patch_seed)
                z, mask = embed(*args, image_token_type_idx=image_token_type_idx)
        return State(streams={STREAM: z}, masks={STREAM: mask}, extra={"num_text": n})

    def _embed_unpadded(self, input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, inputs_embeds,
                        image_embeds, image_token_type_idx: int = 1):
        """HF ``ViltEmbeddings.forward`` for images without padding, batched: the same values
        and the same RNG draws (text dropout, one ``torch.multinomial`` per image for the patch
        order, image dropout -- in that order), so the outputs are bit-identical.

        Why: HF's ``visual_embed`` handles padded images one by one -- per image a position
        interpolation, ``nonzero`` / boolean indexing and Python ints read from device tensors,
        ~800 ops and ~300 device-to-host syncs at batch 32 -- which dominates a GPU forward
        pass of ViLT-B/32 in bf16 (measured elsewhere: 1.14x end to end for a 1.47x MACs cut).
        With every pixel valid, all images share one patch grid: one interpolation, one gather.
        """
        e = self.embeddings
        text = e.text_embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        x = e.patch_embeddings(pixel_values)  # (B, D, h, w)
        b, d, h, w = x.shape
        grid = e.config.image_size // e.config.patch_size
        spatial = e.position_embeddings[:, 1:, :].transpose(1, 2).view(1, d, grid, grid)
        pos = nn.functional.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=True)
        pos = pos.flatten(2).transpose(1, 2)[0]  # (h*w, D)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D), patches in row-major order as HF's nonzero()
        m = e.config.max_image_length
        keep = h * w if (m is None or not isinstance(m, int) or m < 0) else min(h * w, m)
        ones = torch.ones(h * w)
        order = torch.stack([torch.multinomial(ones, keep) for _ in range(b)]).to(x.device)
        x = torch.cat([e.cls_token.expand(b, -1, -1), torch.gather(x, 1, order[..., None].expand(-1, -1, d))], 1)
        pos = torch.cat([e.position_embeddings[:, :1, :].expand(b, -1, -1), pos[order]], 1)
        image = e.dropout(x + pos)
        image_mask = torch.ones(b, keep + 1, dtype=torch.long, device=x.device)
        text = text + e.token_type_embeddings(torch.zeros_like(attention_mask, dtype=torch.long))
        image = image + e.token_type_embeddings.weight[image_token_type_idx]
        return torch.cat([text, image], dim=1), torch.cat([attention_mask, image_mask], dim=1)

    def finalize(self, state: State) -> BackboneOutput:
        z = self.norm(state.streams[STREAM])
        mask = state.masks.get(STREAM)
        return BackboneOutput(pooled=self.pooler(z), sequences={STREAM: z}, masks={STREAM: mask})

    def dummy_inputs(self, batch_size: int = 1, text_len: int = 40, image_size: tuple[int, int] = (320, 640),
                     seed: int = 0) -> dict:
        """Paper-size inputs: 40 random text tokens and a 320 x 640 random image (seeded):
        40 + 1 + 10 * 20 = 241 tokens with 32-pixel patches."""
        text_len = min(text_len, self.config.max_position_embeddings)
        g = torch.Generator().manual_seed(seed)
        device = self.norm.weight.device
        ids = torch.randint(0, self.config.vocab_size, (batch_size, text_len), generator=g)
        pixels = torch.randn(batch_size, self.config.num_channels, *image_size, generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "pixel_values": pixels.to(device),
                "pixel_mask": torch.ones(batch_size, *image_size, dtype=torch.long, device=device)}


def vilt_config(**overrides) -> ViltConfig:
    """``ViltConfig()`` (ViLT-B/32: hidden 768, 12 layers, 12 heads, patch 32) with checked overrides."""
    return hf_config(ViltConfig, {}, overrides)


def build_vilt_b32(weights: str | Path | None = None, patch_seed: int | None = 0, seed: int = 0,
                   **overrides) -> ViltBackbone:
    """ViLT-B/32. Random weights are HF's initialisation under ``torch.manual_seed(seed)``;
    ``weights`` = a local HF checkpoint folder (e.g. a saved ``ViltModel`` or
    ``ViltForQuestionAnswering``) loads real ones. ``overrides`` change config fields."""
    if weights is not None:
        hf = load_pretrained(ViltModel, weights, overrides)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf = ViltModel(vilt_config(**overrides))
    return ViltBackbone.from_hf(hf.eval(), patch_seed=patch_seed)
