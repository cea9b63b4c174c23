"""UniPT -- Universal Parallel Tuning (Diao et al., "UniPT: Universal Parallel Tuning for
Transfer Learning with Efficient Parameter and Memory", CVPR 2024, Sec. 3, Fig. 2), on any
protocol backbone.

The backbone is frozen and runs **without a graph** (all units; :func:`vlkit.methods.
feature_cache.frozen_prefix`). A light module works *in parallel* to it on the outputs of all
its layers and produces a new final feature, which **replaces** the backbone's final feature
before ``finalize`` (pooler / final norm) and the task head.

With the features ``h_0 .. h_{L-1}`` (the embedded stream and every unit's output but the
last) and the final feature ``h_L`` of one stream, width ``d = D / r``, key mask ``m``
(Sec. 3.2 "parallel interaction", Sec. 3.3 "confidence aggregation"; in the sequence form of
the official code, ``Paranioar/UniPT``, ``VSE-infty/lib/adapter_for_transformer.py``,
``Our_tuning_for_transformer``)::

    F_i = LN(W_i h_i + b_i)                           down-projection of every feature (i = 0..L)
    A   = F_L,  a = mean_m(A),  t_i = mean_m(F_i)     anchor (the final feature) and pooled features
    -- parallel interaction (per layer i < L): linear attention of the anchor tokens over layer i
    W_i = l1norm_row( ReLU(A F_iᵀ ⊙ m) ) + I          (N x N; ``l1norm`` clamps the norm at 1e-6)
    M_i = W_i F_i
    -- confidence aggregation
    c   = softmax_i( w_cᵀ (a ⊙ t_i) + b_c )           one confidence per layer (per example)
    M   = Σ_i c_i M_i
    out = W_up ReLU( A + LN(W_p M + b_p) ) + b_up     (N x D): the new final feature

``residual=True`` adds the frozen final feature, ``out + h_L`` (the official CLIP variant's
``raw_anchor + upsample(...)``); the default follows the sequence form above (pure replacement).

Streams: UniPT acts on the stream of the last unit by default (``"text"`` for BERT / MiniLM,
``"dec"`` for T5 -- its decoder's final feature; ``"vision"`` for METER); ``streams=`` names
others (each gets its own module). Features of the stream with a different token count than the
final feature are left out (the interaction needs aligned tokens for ``+ I``).

Trainable parameters per stream: ``Σ_i (D_i·d + 3d)`` (L + 1 down-projections with LayerNorm)
``+ d² + 3d`` (projection + LN) ``+ d·D + D`` (up) ``+ d + 1`` (confidence).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.methods.feature_cache import FrozenPrefixModel, check_reduction, embed_key, probe, seeded
from vlkit.models.protocol import Backbone, BackboneOutput, State, UnknownNameError

__all__ = ["UniPT", "UniPTAggregator", "apply_unipt", "L1_EPS"]

L1_EPS = 1e-6  # the official l1norm clamps the norm at 1e-6


def _l1norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x / x.abs().sum(dim=dim, keepdim=True).clamp_min(L1_EPS)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class UniPTAggregator(nn.Module):
    """The UniPT module for one stream: ``agg(features, anchor, mask) -> (B, N, D)``.

    ``widths``: widths of the L features then of the anchor (the final feature), ``dim``: output
    width D (= the anchor's), ``reduction``: ``d = D / reduction``.
    """

    def __init__(self, widths: Sequence[int], dim: int, reduction: int = 8, residual: bool = False):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"UniPT needs at least one feature beside the final one; got widths {list(widths)}")
        d = check_reduction(reduction, dim)
        self.dim, self.hidden, self.residual = dim, d, residual
        self.down = nn.ModuleList(nn.Sequential(nn.Linear(w, d), nn.LayerNorm(d)) for w in widths)
        self.proj = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.up = nn.Linear(d, dim)
        self.confidence = nn.Linear(d, 1)

    def interaction(self, anchor: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Parallel interaction: ``(l1norm(ReLU(A Fᵀ ⊙ m)) + I) F``; ``(B, N, d)``."""
        w = anchor @ target.transpose(1, 2)
        if mask is not None:
            w = w * mask.to(w.dtype)[:, None, :]
        w = _l1norm(F.relu(w), dim=-1) + torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
        return w @ target

    def forward(self, features: Sequence[torch.Tensor], anchor: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if len(features) != len(self.down) - 1:
            raise ValueError(f"UniPT was built for {len(self.down) - 1} features; got {len(features)}")
        a_feat = self.down[-1](anchor)
        a = _masked_mean(a_feat, mask)
        merged, conf = [], []
        for down, h in zip(self.down, features):
            t_feat = down(h)
            merged.append(self.interaction(a_feat, t_feat, mask))
            conf.append(self.confidence(a * _masked_mean(t_feat, mask)))
        c = torch.softmax(torch.cat(conf, dim=1), dim=1)  # (B, L)
        m = (torch.stack(merged, dim=1) * c[:, :, None, None]).sum(1)
        out = self.up(F.relu(a_feat + self.proj(m)))
        return out + anchor if self.residual else out


class UniPT(FrozenPrefixModel):
    """A frozen backbone whose final feature(s) UniPT recomputes (see the module docstring)."""

    def __init__(self, backbone: Backbone, *, reduction: int = 8, streams: Sequence[str] | None = None,
                 residual: bool = False, seed: int = 0):
        if not isinstance(backbone, Backbone):
            raise TypeError(f"UniPT needs a vlkit Backbone (vlkit.models.build(...)), got {type(backbone).__name__}")
        specs = backbone.specs
        if not specs:
            raise ValueError("UniPT needs a backbone with at least one unit")
        n = len(specs)
        all_streams = list(dict.fromkeys(s.stream for s in specs))
        streams = [specs[-1].stream] if streams is None else list(streams)
        for s in streams:
            if s not in all_streams:
                raise UnknownNameError("stream", s, all_streams)
        info = probe(backbone, n)
        keys: dict[str, list[str]] = {}
        modules = {}
        with seeded(seed):
            for s in streams:
                final = info.final[s]
                last = max(i for i, spec in enumerate(specs) if spec.stream == s)
                cands = [embed_key(s)] + [spec.name for i, spec in enumerate(specs) if spec.stream == s and i != last]
                shapes = {**{embed_key(k): v for k, v in info.embed.items()}, **info.units}
                keys[s] = [k for k in cands if shapes[k][:-1] == final[:-1]]
                modules[s] = UniPTAggregator([shapes[k][-1] for k in keys[s]] + [final[-1]], final[-1], reduction,
                                             residual)
        super().__init__(backbone, n, keep=[k for s in streams for k in keys[s]])
        ref = next(backbone.parameters())
        self.unipt = nn.ModuleDict(modules).to(ref.device, ref.dtype)
        self.streams, self.feature_keys = streams, keys
        self.options = dict(reduction=reduction, streams=streams, residual=residual, seed=seed)

    def from_prefix(self, state: State, record: Mapping[str, torch.Tensor]) -> BackboneOutput:
        """UniPT on the recorded features; its output replaces each stream's final feature."""
        out = state.copy()
        for s in self.streams:
            out.streams[s] = self.unipt[s]([record[k] for k in self.feature_keys[s]], state.streams[s],
                                           state.masks.get(s))
        return self.backbone.finalize(out)


def apply_unipt(backbone: Backbone, *, reduction: int = 8, streams: Sequence[str] | None = None,
                residual: bool = False, seed: int = 0) -> UniPT:
    """UniPT (Diao et al., CVPR 2024) around ``backbone``, which is frozen in place.

    Options: ``reduction`` (8: module width ``D / 8``; must divide ``D``), ``streams`` (``None``:
    the last unit's stream), ``residual`` (False: the output replaces the final feature; True:
    it is added to it), ``seed`` (0). Only the UniPT module(s) train.
    """
    return UniPT(backbone, reduction=reduction, streams=streams, residual=residual, seed=seed)
