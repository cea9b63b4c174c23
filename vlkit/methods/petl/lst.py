"""LST -- Ladder Side-Tuning (Sung, Cho & Bansal, "LST: Ladder Side-Tuning for Parameter and
Memory Efficient Transfer Learning", NeurIPS 2022, Sec. 3 and Fig. 2), on any protocol backbone.

The backbone is frozen and runs **without a graph** (all units; :func:`vlkit.methods.
feature_cache.frozen_prefix`). Beside it, a *ladder* side network of width ``d = D / r``
(one small Transformer layer per backbone unit) reads the backbone through down-projections
and is the only thing back-propagated through::

    s_0 = W_first h_emb                                   (side_first_downsample)
    for every unit i (writing stream S):
        g_i = sigmoid(alpha_i / T)                        alpha_i = 0 at init, T = 0.1 -> g = 0.5
        s   = g_i * s + (1 - g_i) * W_down_i h_i          h_i: the backbone unit's output (Eq. 1)
        s   = side_layer_i(s)                             width d, FFN D_ff / r, same head count
    s <- LayerNorm(s) after the stream's last unit;  output = W_up s   (replaces the final stream)

This is the order of the LST code (as shipped with SHERL's baselines: ``Paranioar/SHERL``,
``Ladder-Side-Tuning/seq2seq/third_party/models/t5/modeling_side_t5.py``, ``T5Stack.forward``
with ``add_residual_after=False``: the gate mixes the side state with the down-projected output
of backbone layer i *before* side layer i; ``use_gate="learnable"``, ``gate_T=0.1``,
``gate_alpha=0``), and the paper's reduction factor r = 8 for T5-base.

Multi-stream backbones get one side network per stream (T5: encoder and decoder; METER /
X-VLM: vision and text), mirroring the units: a side layer for a unit with a cross-attention
context cross-attends to the context stream's side network (T5: the side decoder reads the
side encoder's normalised output, as in LST); co-attention depths read the side snapshot of the
other stream. The stream's mask and its position bias (T5's relative bias, with the
decoder's causal mask folded in) are passed to the side layers unchanged; this is why the side
layers keep the backbone's head count (as LST does: ``d_kv / r``, ``num_heads`` unchanged).

Departures (deliberate): the side layers are :class:`vlkit.models.layers.TransformerLayer`
(pre-norm, GELU, biases) for every backbone, not copies of the backbone's block type; they are
randomly initialised (LST can initialise them from a pruned backbone, Sec. 3.2 -- an option
we leave out); the final per-stream norm is a LayerNorm.

Trainable parameters (per stream of width D, side width d, FFN f = D_ff / r, L units)::

    D·d + d                                 first down-projection
    + L·(D·d + d)                           per-unit down-projections
    + L·(4d² + 4d + 2d·f + f + d + 4d)      side layers (q,k,v,o; FFN; 2 LayerNorms)
    [+ 4d² + 4d + 2d per cross-attending unit, with context width d]
    + L                                     gates alpha
    + 2d + d·D + D                          final LayerNorm and up-projection
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from vlkit.methods.feature_cache import FrozenPrefixModel, check_reduction, embed_key, probe, seeded
from vlkit.models.layers import TransformerLayer
from vlkit.models.protocol import Backbone, BackboneOutput, State, UnitContext

__all__ = ["LadderSideTuning", "apply_lst", "unit_heads_ffn", "GATE_TEMPERATURE"]

GATE_TEMPERATURE = 0.1


def unit_heads_ffn(module: nn.Module) -> tuple[int, int]:
    """(attention heads, FFN width) of a backbone unit: a :class:`TransformerLayer` or a T5 unit."""
    if isinstance(module, TransformerLayer):
        return module.num_heads_config, module.ffn_dim_config
    block = getattr(module, "block", None)
    if block is not None and hasattr(block, "layer"):  # vlkit.models.t5.T5Unit around an HF T5Block
        ff = block.layer[-1].DenseReluDense
        wi = getattr(ff, "wi", None) or getattr(ff, "wi_0")
        return block.layer[0].SelfAttention.n_heads, wi.out_features
    raise TypeError(f"cannot read the head count and FFN width of unit module {type(module).__name__}; "
                    f"LST mirrors TransformerLayer and T5 units")


class LadderSideTuning(FrozenPrefixModel):
    """A frozen backbone with a ladder side network per stream (see the module docstring)."""

    def __init__(self, backbone: Backbone, *, reduction: int = 8, gate_alpha: float = 0.0,
                 gate_temperature: float = GATE_TEMPERATURE, dropout: float = 0.0, seed: int = 0):
        if not isinstance(backbone, Backbone):
            raise TypeError(f"LST needs a vlkit Backbone (vlkit.models.build(...)), got {type(backbone).__name__}")
        specs = backbone.specs
        if not specs:
            raise ValueError("LST needs a backbone with at least one unit")
        if not gate_temperature > 0:
            raise ValueError(f"gate_temperature must be > 0, got {gate_temperature!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        n = len(specs)
        info = probe(backbone, n)
        streams = list(dict.fromkeys(s.stream for s in specs))
        width = {s: check_reduction(reduction, info.final[s][-1], f"width of stream {s!r}") for s in streams}
        last = {spec.stream: i for i, spec in enumerate(specs)}

        with seeded(seed):
            first = nn.ModuleDict({s: nn.Linear(info.embed[s][-1], width[s]) for s in streams})
            down, side = nn.ModuleDict(), nn.ModuleDict()
            for spec in specs:
                heads, ffn = unit_heads_ffn(backbone.unit(spec.name))
                d = width[spec.stream]
                bias = info.extra.get(f"bias:{spec.stream}")
                if bias is not None and bias[1] != heads:
                    raise ValueError(f"unit {spec.name}: position bias has {bias[1]} heads, unit {heads}")
                if d % heads:
                    raise ValueError(f"LST side width {d} of unit {spec.name} is not divisible by its {heads} heads; "
                                     f"choose a reduction factor that keeps D / r a multiple of the head count")
                cross = spec.context is not None and spec.context in width
                down[spec.name] = nn.Linear(info.units[spec.name][-1], d)
                side[spec.name] = TransformerLayer(d, heads, max(1, ffn // reduction), norm="pre", eps=1e-6,
                                                   cross=cross, context_dim=width.get(spec.context) if cross else None,
                                                   dropout=dropout, attn_dropout=dropout)
            norm = nn.ModuleDict({s: nn.LayerNorm(width[s], eps=1e-6) for s in streams})
            up = nn.ModuleDict({s: nn.Linear(width[s], info.final[s][-1]) for s in streams})
        alpha = nn.ParameterDict({spec.name: nn.Parameter(torch.full((1,), float(gate_alpha))) for spec in specs})

        keep = [embed_key(s) for s in streams] + [spec.name for spec in specs]
        super().__init__(backbone, n, keep=keep)
        ref = next(backbone.parameters())
        self.first_down, self.down, self.side = first.to(ref.device, ref.dtype), down.to(ref.device, ref.dtype), \
            side.to(ref.device, ref.dtype)
        self.final_norm, self.up = norm.to(ref.device, ref.dtype), up.to(ref.device, ref.dtype)
        self.alpha = alpha.to(ref.device, ref.dtype)
        self.temperature = float(gate_temperature)
        self.streams, self.side_width, self.last_unit = streams, width, last
        self.options = dict(reduction=reduction, gate_alpha=gate_alpha, gate_temperature=gate_temperature,
                            dropout=dropout, seed=seed)

    def gate(self, name: str) -> torch.Tensor:
        """``sigmoid(alpha / T)`` of unit ``name``: the weight of the side state (0.5 at init)."""
        return torch.sigmoid(self.alpha[name] / self.temperature)

    def from_prefix(self, state: State, record: Mapping[str, torch.Tensor]) -> BackboneOutput:
        """The side network on the recorded backbone outputs; its up-projected output replaces
        each stream's final value before ``finalize``."""
        side = {s: self.first_down[s](record[embed_key(s)]) for s in self.streams}
        snap, depth = dict(side), None
        for i, spec in enumerate(self.backbone.specs):
            s = spec.stream
            if spec.depth is not None and spec.depth != depth:
                snap, depth = dict(side), spec.depth
            g = self.gate(spec.name)
            x = g * side[s] + (1 - g) * self.down[spec.name](record[spec.name])
            ctx = UnitContext(mask=state.masks.get(s), position_bias=state.extra.get(f"bias:{s}"))
            layer = self.side[spec.name]
            if layer.cross_attn is not None:
                ctx.context = (snap if spec.depth is not None else side)[spec.context]
                ctx.context_mask = state.masks.get(spec.context)
            side[s] = layer(x, ctx)
            if i == self.last_unit[s]:
                side[s] = self.final_norm[s](side[s])
        out = state.copy()
        for s in self.streams:
            out.streams[s] = self.up[s](side[s])
        return self.backbone.finalize(out)


def apply_lst(backbone: Backbone, *, reduction: int = 8, gate_alpha: float = 0.0,
              gate_temperature: float = GATE_TEMPERATURE, dropout: float = 0.0, seed: int = 0) -> LadderSideTuning:
    """Ladder side-tuning (Sung et al. 2022) around ``backbone``, which is frozen in place.

    Options: ``reduction`` (8: side width ``D / 8``, must divide every stream's width and keep
    the head count dividing it), ``gate_alpha`` (0.0) and ``gate_temperature`` (0.1): gates
    ``sigmoid(alpha / T)``; ``dropout`` (0.0) inside the side layers; ``seed`` (0).
    Returns a :class:`LadderSideTuning` module whose only trainable parameters are the side
    network's (down/up-projections, side layers, gates, norms).
    """
    return LadderSideTuning(backbone, reduction=reduction, gate_alpha=gate_alpha, gate_temperature=gate_temperature,
                            dropout=dropout, seed=seed)
