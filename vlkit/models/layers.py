"""The one Transformer layer every vlkit Transformer backbone is built from.

Why not use each library's own layer (``BertLayer``, ``ViltLayer``, CLIP's, timm's)? Because
every method needs the same seams in every layer: adapters beside a sub-layer (DAS),
head / FFN gates and physical removal of heads and FFN units (EfficientVLM), attention maps
on request (distillation), and one attention path whose MACs torch's flop counter can see.
Writing those seams once here, and loading the libraries' weights into it (the presets'
converters, checked against the library models in the tests), keeps methods independent of
which library a backbone came from.

Layout (both norm placements are needed):

* ``norm="post"`` (BERT, RoBERTa, MiniLM, X-VLM's BERT parts)::

      x = LN(x + Attn(x));  [x = LN(x + XAttn(x, c))];  x = LN(x + FFN(x))

* ``norm="pre"`` (ViT, CLIP, ViLT)::

      x = x + Attn(LN(x));  [x = x + XAttn(LN(x), c)];  x = x + FFN(LN(x))

Adapter slots: ``layer.adapters[name]`` for ``name`` in ``("attn", "cross", "ffn")`` is
called as ``adapter(x_in, h) -> h'`` where ``x_in`` is the sub-layer's residual input and
``h`` the sub-layer's output before the residual sum; it returns the output to use. A
parallel adapter returns ``h + f(x_in)``, a sequential one ``f(h)``-style; see
:mod:`vlkit.nn.adapters`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .protocol import UnitContext

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
}


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, M) keep-mask (1 = attend) -> (B, 1, 1, M) additive mask, or ``None``."""
    if mask is None:
        return None
    m = mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention with separate q/k/v/o projections.

    ``num_heads`` may shrink below the configured count after physical pruning; it may be 0,
    in which case the sub-layer outputs zeros (pruning drops the output bias with the heads,
    so a fully pruned sub-layer contributes nothing).

    Gating fields (set by :mod:`vlkit.methods.evlm`; ``None`` = off, the default, which leaves
    the computation untouched): ``head_mask`` (H,) multiplies each head's output before ``o``;
    ``out_scale`` (a scalar tensor) multiplies the sub-layer's whole output, ``o``'s bias
    included (CoFi's ``head_layer_z``), so ``out_scale = 0`` makes the sub-layer contribute
    exactly nothing, like a physically removed one.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, kv_dim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, scale: float | None = None):
        super().__init__()
        head_dim = head_dim or dim // num_heads
        kv_dim = kv_dim or dim
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner, bias=bias)
        self.k = nn.Linear(kv_dim, inner, bias=bias)
        self.v = nn.Linear(kv_dim, inner, bias=bias)
        self.o = nn.Linear(inner, dim, bias=bias)
        self.dropout = dropout
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        # Optional per-head multiplier (H,) applied to each head's output before ``o``; set by
        # gating code (EfficientVLM); ``None`` means all heads on.
        self.head_mask: torch.Tensor | None = None
        # Optional scalar multiplying the whole output (bias included); ``None`` means 1.
        self.out_scale: torch.Tensor | None = None

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, attentions: list | None = None) -> torch.Tensor:
        """x: (B, N, D); mask: (B, M) keep-mask of the keys; context: (B, M, Dc) for
        cross-attention; bias: additive (B|1, H, N, M) position bias; attentions: list that
        receives the (B, H, N, M) probabilities."""
        if self.num_heads == 0:
            out = x.new_zeros(x.shape)
            if attentions is not None:
                attentions.append(None)
            out = out + self.o.bias if self.o.bias is not None else out
            return out if self.out_scale is None else out * self.out_scale.to(out.dtype)
        kv = x if context is None else context
        q, k, v = self._split(self.q(x)), self._split(self.k(kv)), self._split(self.v(kv))
        add = additive_mask(mask, q.dtype)
        if bias is not None:
            add = bias if add is None else add + bias
        p = self.dropout if self.training else 0.0
        if attentions is None:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=add, dropout_p=p, scale=self.scale)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            if add is not None:
                scores = scores + add
            probs = scores.softmax(-1)
            attentions.append(probs)
            ctx = torch.matmul(F.dropout(probs, p, self.training), v)
        if self.head_mask is not None:
            ctx = ctx * self.head_mask.to(ctx.dtype)[None, :, None, None]
        b, _, n, _ = ctx.shape
        out = self.o(ctx.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))
        return out if self.out_scale is None else out * self.out_scale.to(out.dtype)


class FeedForward(nn.Module):
    """``fc2(act(fc1(x)))``; ``unit_mask`` (d_ff,) optionally gates the hidden units and
    ``out_scale`` (a scalar tensor) the whole output, ``fc2``'s bias included (CoFi's
    ``mlp_z``); both ``None`` by default (no effect). ``d_ff`` may be 0 after pruning (then
    ``fc2`` has no bias and the sub-layer outputs zeros)."""

    def __init__(self, dim: int, ffn_dim: int, act: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if act not in ACTIVATIONS:
            raise KeyError(f"unknown activation {act!r}; valid: {', '.join(ACTIVATIONS)}")
        self.fc1 = nn.Linear(dim, ffn_dim, bias=bias)
        self.fc2 = nn.Linear(ffn_dim, dim, bias=bias)
        self.act_name = act
        self.dropout = dropout
        self.unit_mask: torch.Tensor | None = None
        self.out_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ACTIVATIONS[self.act_name](self.fc1(x))
        if self.unit_mask is not None:
            h = h * self.unit_mask.to(h.dtype)
        out = self.fc2(F.dropout(h, self.dropout, self.training) if self.dropout else h)
        return out if self.out_scale is None else out * self.out_scale.to(out.dtype)


class TransformerLayer(nn.Module):
    """Self-attention [+ cross-attention] + FFN with pre- or post-norm; a protocol unit.

    Called as ``layer(x, ctx)`` with a :class:`~vlkit.models.protocol.UnitContext`.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, *, norm: str = "post", act: str = "gelu",
                 eps: float = 1e-12, cross: bool = False, context_dim: int | None = None,
                 dropout: float = 0.0, attn_dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', got {norm!r}")
        self.norm = norm
        self.dim, self.num_heads_config, self.ffn_dim_config = dim, num_heads, ffn_dim
        self.attn = Attention(dim, num_heads, bias=bias, dropout=attn_dropout)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = Attention(dim, num_heads, kv_dim=context_dim or dim, bias=bias,
                                    dropout=attn_dropout) if cross else None
        self.cross_norm = nn.LayerNorm(dim, eps=eps) if cross else None
        self.ffn = FeedForward(dim, ffn_dim, act=act, bias=bias)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = dropout
        self.adapters = nn.ModuleDict()

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        return F.dropout(h, self.dropout, self.training) if self.dropout else h

    def _sublayer(self, name: str, x: torch.Tensor, norm: nn.Module, fn) -> torch.Tensor:
        inp = norm(x) if self.norm == "pre" else x
        h = self._drop(fn(inp))
        if name in self.adapters:
            h = self.adapters[name](x, h)
        return x + h if self.norm == "pre" else norm(x + h)

    def forward(self, x: torch.Tensor, ctx: UnitContext | None = None) -> torch.Tensor:
        ctx = ctx or UnitContext()
        sink = ctx.attentions
        x = self._sublayer("attn", x, self.attn_norm,
                           lambda h: self.attn(h, ctx.mask, bias=ctx.position_bias, attentions=sink))
        if self.cross_attn is not None:
            if ctx.context is None:
                raise ValueError("this unit has cross-attention but the context carries no other stream")
            x = self._sublayer("cross", x, self.cross_norm,
                               lambda h: self.cross_attn(h, ctx.context_mask, context=ctx.context, attentions=sink))
        return self._sublayer("ffn", x, self.ffn_norm, self.ffn)
