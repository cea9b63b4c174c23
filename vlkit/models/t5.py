"""T5 behind the backbone protocol: the ``t5-base`` preset.

Architecture (Raffel et al., 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", Sec. 2.1; HF ``transformers.T5Model``): an encoder-decoder of
pre-norm blocks with RMS LayerNorm (no bias, no mean), bias-free projections, unscaled
dot-product attention and a *relative position bias* -- a learned scalar per head and
log-spaced distance bucket, added to the attention logits of every self-attention layer
(Sec. 2.1, "Position embeddings"; ``T5Attention._relative_position_bucket``).

Protocol layout:

* ``embed``: shared token embedding for both streams (``"enc"``, ``"dec"``) and the two
  relative-position biases. In the library the bias table lives inside block 0 and is handed
  on to the later blocks; here it is part of the embedding (:class:`T5RelativeBias`), computed
  once per pass and stored in ``state.extra["bias:enc"]`` / ``["bias:dec"]`` (the protocol
  passes ``state.extra[f"bias:{stream}"]`` to each unit as ``ctx.position_bias``), so replacing
  ``Enc0`` (a DAS skip) keeps every other block's bias intact. The decoder's causal mask is
  folded into its bias (``-inf``-like ``finfo.min`` above the diagonal).
* units ``Enc0..Enc{L-1}`` (stream ``"enc"``) then ``Dec0..Dec{L-1}`` (stream ``"dec"``,
  cross-attending to ``"enc"``), all modality ``text``: each wraps one HF ``T5Block`` in a
  :class:`T5Unit` that translates ``(x, ctx)`` into the block's sub-layers.
* after the last encoder unit the encoder's final RMS norm is applied (``_after_unit``), so the
  decoder's cross-attention reads the normalised encoder output as in the library;
  ``finalize`` applies the decoder's final norm.
* pooled output: the **mean of the final decoder sequence** over its non-padded tokens
  (``decoder_attention_mask``; all tokens if none). T5 has no pooler; a mean over the decoder
  states is the usual classification read-out for encoder-decoder models without a head.

``dummy_inputs``: 128 random encoder tokens + 128 random decoder tokens (seeded), all unmasked.

Builders return the backbone in eval mode (as ``from_pretrained`` does); call ``.train()`` to
fine-tune. Dropout rates come from the config.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5Config, T5Model
from transformers.models.t5.modeling_t5 import T5Attention, T5Block

from .convert import hf_config, load_pretrained
from .layers import additive_mask
from .protocol import Backbone, BackboneOutput, State, UnitContext, UnitSpec
from .text import masked_mean

__all__ = ["T5Backbone", "T5Unit", "T5RelativeBias", "t5_config", "build_t5_base", "T5_BASE", "T5_ALIASES"]

# T5-base (Raffel et al., Table 14 / google-t5/t5-base config). T5Config() alone is t5-small.
T5_BASE = dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128)
# BERT-style names accepted as overrides (``num_hidden_layers`` sets both stacks unless
# ``num_decoder_layers`` is given).
T5_ALIASES = {"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
              "intermediate_size": "d_ff", "head_dim": "d_kv"}


class T5RelativeBias(nn.Module):
    """T5's bucketed relative position bias ``B[h, i, j] = w[bucket(j - i), h]``.

    Bucketing is the library's ``T5Attention._relative_position_bucket`` (Mesh TensorFlow):
    half the buckets exact distances, half log-spaced up to ``max_distance``; the encoder's is
    bidirectional, the decoder's one-sided.
    """

    def __init__(self, embedding: nn.Embedding, bidirectional: bool, max_distance: int):
        super().__init__()
        self.relative_attention_bias = embedding
        self.bidirectional = bidirectional
        self.max_distance = max_distance

    def forward(self, q_len: int, k_len: int) -> torch.Tensor:
        """(1, H, q_len, k_len) bias."""
        w = self.relative_attention_bias.weight
        rel = torch.arange(k_len, device=w.device)[None, :] - torch.arange(q_len, device=w.device)[:, None]
        buckets = T5Attention._relative_position_bucket(rel, bidirectional=self.bidirectional,
                                                        num_buckets=w.shape[0], max_distance=self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """The library's fp16 overflow guard after each sub-layer (``T5Block.forward``)."""
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return torch.clamp(x, min=-limit, max=limit)


class T5Unit(nn.Module):
    """Protocol adapter around one HF ``T5Block``: ``unit(x, ctx) -> x``.

    Runs the block's own sub-layers (``block.layer[0]`` self-attention, ``[1]`` cross-attention
    in decoder blocks, ``[-1]`` feed-forward), each ``x = x + Dropout(F(RMSNorm(x)))``:

    * self-attention: keys masked by ``ctx.mask``, logits plus ``ctx.position_bias`` (relative
      bias, with the causal mask in the decoder);
    * cross-attention (decoder): attends to ``ctx.context`` masked by ``ctx.context_mask``;
      no position bias (as in T5).

    Attention is computed here from the block's ``q/k/v/o`` weights (T5 does not scale the
    logits): ``F.scaled_dot_product_attention`` normally, explicit softmax when
    ``ctx.attentions`` asks for the maps (self-attention map first, then cross-attention).
    Adapter slots ``adapters["attn" | "cross" | "ffn"]`` follow
    :class:`vlkit.models.layers.TransformerLayer`: ``adapter(x_in, h) -> h'`` on the sub-layer
    output before the residual sum.
    """

    def __init__(self, block: T5Block):
        super().__init__()
        self.block = block
        self.is_decoder = bool(block.is_decoder)
        self.adapters = nn.ModuleDict()

    def _attend(self, attn: T5Attention, x: torch.Tensor, kv: torch.Tensor, mask, bias, sink) -> torch.Tensor:
        b, n, _ = x.shape
        heads, dk = attn.n_heads, attn.key_value_proj_dim
        q = attn.q(x).view(b, n, heads, dk).transpose(1, 2)
        k = attn.k(kv).view(b, kv.shape[1], heads, dk).transpose(1, 2)
        v = attn.v(kv).view(b, kv.shape[1], heads, dk).transpose(1, 2)
        add = additive_mask(mask, q.dtype)
        if bias is not None:  # clamp: mask + causal bias may overflow to -inf (fp16: finfo.min alone does)
            bias = bias.to(q.dtype)
            add = (bias if add is None else add + bias).clamp_min(torch.finfo(q.dtype).min)
        p = attn.dropout if self.training else 0.0
        if sink is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=add, dropout_p=p, scale=1.0)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2))
            if add is not None:
                scores = scores + add
            probs = scores.softmax(-1)
            sink.append(probs)
            out = torch.matmul(F.dropout(probs, p, self.training), v)
        return attn.o(out.transpose(1, 2).reshape(b, n, heads * dk))

    def _sublayer(self, name: str, x: torch.Tensor, layer: nn.Module, fn) -> torch.Tensor:
        h = layer.dropout(fn(layer.layer_norm(x)))
        if name in self.adapters:
            h = self.adapters[name](x, h)
        return _clamp_fp16(x + h)

    def forward(self, x: torch.Tensor, ctx: UnitContext | None = None) -> torch.Tensor:
        ctx = ctx or UnitContext()
        sink = ctx.attentions
        sa = self.block.layer[0]
        x = self._sublayer("attn", x, sa,
                           lambda h: self._attend(sa.SelfAttention, h, h, ctx.mask, ctx.position_bias, sink))
        if self.is_decoder:
            if ctx.context is None:
                raise ValueError("a T5 decoder unit needs the encoder stream as context (ctx.context is None)")
            ca = self.block.layer[1]
            x = self._sublayer("cross", x, ca,
                               lambda h: self._attend(ca.EncDecAttention, h, ctx.context, ctx.context_mask, None, sink))
        ff = self.block.layer[-1]
        return self._sublayer("ffn", x, ff, ff.DenseReluDense)


class T5Backbone(Backbone):
    """T5 encoder-decoder: units ``Enc*`` (stream ``enc``) then ``Dec*`` (stream ``dec``).

    Inputs: ``input_ids`` (B, N), optional ``attention_mask`` (B, N), ``decoder_input_ids``
    (B, M) -- default: one start token (``decoder_start_token_id``, else the pad token 0, as
    T5 starts decoding) per example --, optional
    ``decoder_attention_mask`` (B, M).
    """

    def __init__(self, hf: T5Model):
        """Take the modules of ``hf`` (which is consumed: its blocks are moved, not copied)."""
        super().__init__()
        c = hf.config
        self.config = c
        self.shared = hf.shared
        self.enc_bias = self._take_bias(hf.encoder, bidirectional=True)
        self.dec_bias = self._take_bias(hf.decoder, bidirectional=False)
        self.enc_norm = hf.encoder.final_layer_norm
        self.dec_norm = hf.decoder.final_layer_norm
        self.dropout = nn.Dropout(c.dropout_rate)
        enc, dec = list(hf.encoder.block), list(hf.decoder.block)
        self.num_encoder_units = len(enc)
        specs = [UnitSpec(f"Enc{i}", "text", "enc") for i in range(len(enc))]
        specs += [UnitSpec(f"Dec{i}", "text", "dec", context="enc") for i in range(len(dec))]
        self._register_units(specs, [T5Unit(b) for b in enc + dec])
        self.train(hf.training)

    @classmethod
    def from_hf(cls, hf: T5Model) -> "T5Backbone":
        """A :class:`T5Backbone` with the weights of ``hf`` (copied; ``hf`` is left untouched)."""
        return cls(copy.deepcopy(hf))

    def _take_bias(self, stack, bidirectional: bool) -> T5RelativeBias:
        attn = stack.block[0].layer[0].SelfAttention
        emb = attn.relative_attention_bias
        del attn.relative_attention_bias
        attn.has_relative_attention_bias = False
        return T5RelativeBias(emb, bidirectional, self.config.relative_attention_max_distance)

    # ------------------------------------------------------------------ protocol
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              decoder_input_ids: torch.Tensor | None = None,
              decoder_attention_mask: torch.Tensor | None = None) -> State:
        """Token embeddings of both streams plus the relative-position biases (decoder: causal)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if decoder_input_ids is None:
            start = getattr(self.config, "decoder_start_token_id", None)  # T5 starts with the pad token
            start = start if start is not None else (self.config.pad_token_id or 0)
            decoder_input_ids = torch.full((input_ids.shape[0], 1), start,
                                           dtype=torch.long, device=input_ids.device)
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch sizes differ: {input_ids.shape[0]} encoder inputs, "
                             f"{decoder_input_ids.shape[0]} decoder inputs")
        enc = self.dropout(self.shared(input_ids))
        dec = self.dropout(self.shared(decoder_input_ids))
        n, m = enc.shape[1], dec.shape[1]
        enc_bias = self.enc_bias(n, n).to(enc.dtype)
        causal = torch.ones(m, m, dtype=torch.bool, device=dec.device).triu(1)
        dec_bias = self.dec_bias(m, m).to(dec.dtype).masked_fill(causal, torch.finfo(dec.dtype).min)
        return State(streams={"enc": enc, "dec": dec},
                     masks={"enc": attention_mask, "dec": decoder_attention_mask},
                     extra={"bias:enc": enc_bias, "bias:dec": dec_bias})

    def _after_unit(self, i: int, state: State) -> None:
        if i == self.num_encoder_units - 1:  # the encoder stack's final RMS norm (+ dropout)
            state.streams["enc"] = self.dropout(self.enc_norm(state.streams["enc"]))

    def finalize(self, state: State) -> BackboneOutput:
        dec = self.dropout(self.dec_norm(state.streams["dec"]))
        masks = {"enc": state.masks.get("enc"), "dec": state.masks.get("dec")}
        return BackboneOutput(pooled=masked_mean(dec, masks["dec"]),
                              sequences={"enc": state.streams["enc"], "dec": dec}, masks=masks)

    def dummy_inputs(self, batch_size: int = 1, enc_len: int = 128, dec_len: int = 128, seed: int = 0) -> dict:
        """128 encoder + 128 decoder random token ids (seeded), all-ones masks."""
        g = torch.Generator().manual_seed(seed)
        device = self.shared.weight.device
        v = self.config.vocab_size
        ids = torch.randint(0, v, (batch_size, enc_len), generator=g).to(device)
        dec = torch.randint(0, v, (batch_size, dec_len), generator=g).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "decoder_input_ids": dec, "decoder_attention_mask": torch.ones_like(dec)}


def t5_config(**overrides) -> T5Config:
    """T5-base config (:data:`T5_BASE`) with checked overrides (BERT-style aliases allowed)."""
    overrides = dict(overrides)
    cfg = hf_config(T5Config, T5_BASE, overrides, T5_ALIASES)
    if "num_decoder_layers" not in overrides:
        cfg.num_decoder_layers = cfg.num_layers  # symmetric unless asked otherwise
    return cfg


def build_t5_base(weights: str | Path | None = None, seed: int = 0, **overrides) -> T5Backbone:
    """T5-base. Random weights are HF's initialisation under ``torch.manual_seed(seed)``;
    ``weights`` = a local HF checkpoint folder (``T5Model`` or ``T5ForConditionalGeneration``)
    loads real ones. ``overrides`` change config fields."""
    if weights is not None:
        hf = load_pretrained(T5Model, weights, overrides, T5_ALIASES, may_miss=())
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hf = T5Model(t5_config(**overrides))
    return T5Backbone(hf.eval())
