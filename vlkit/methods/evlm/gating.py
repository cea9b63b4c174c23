"""Hard-concrete gates on the heads and FFN units of any protocol backbone (EfficientVLM Sec. 3.3).

EfficientVLM (Wang et al., ACL Findings 2023; code ``swaggy-TN/EfficientVLM``,
``efficient_models/xvlm_l0_module.py``) follows CoFi (Xia, Zhong & Chen, ACL 2022): every
attention head (self- and cross-attention) and every FFN intermediate unit gets an L0 gate
(:class:`~vlkit.nn.gates.HardConcreteGate`), tagged by the modality of its layer (vision,
text, fusion) so that one global Lagrangian budget (:class:`~vlkit.nn.lagrangian.SparsityBudget`,
``scope="global"``) lets the modalities share the sparsity -- modal-adaptive pruning.

What :func:`attach_gates` puts on each :class:`~vlkit.models.layers.TransformerLayer` unit
-------------------------------------------------------------------------------------------
========================  ===================  =============================================
gate key                  size                 multiplies
========================  ===================  =============================================
``heads``                 H                    each self-attention head's output (before o)
``cross_heads``           H (fusion units)     each cross-attention head's output
``ffn``                   d_ff                 each FFN hidden unit (after the activation)
``heads_layer`` etc.      1 per sub-layer      the sub-layer's whole output, bias included
========================  ===================  =============================================

The sub-layer gates (``heads_layer``, ``cross_heads_layer``, ``ffn_layer``) are CoFi's
``head_layer_z`` / ``mlp_z``; EfficientVLM's own code has none. With them the gated
sub-layer computes (``z`` = entry gates, ``g`` = sub-layer gate)::

    out = g * 1[any(z > 0)] * (W_o (ctx (.) z) + b_o)          (FFN alike, with W_2, b_2)

The indicator ``1[any(z > 0)]`` (no gradient) makes a sub-layer whose entries are all zero
contribute nothing, its output bias included -- exactly the masked model of
:mod:`vlkit.methods.evlm.prune`, so the gated model in eval mode, the masked model of
``gates.masks()`` and the physically pruned model agree.

How the gates act (least invasive choice): a forward **pre-hook** on each gated layer draws
the gates and writes them into the layer's mask fields (``Attention.head_mask``,
``FeedForward.unit_mask`` and the sub-layer ``out_scale``); a forward hook clears them after
the call, so no graph is kept alive between steps. The mode follows the **gated layer**
(``backbone.train()`` / ``.eval()``), not the :class:`GateSet` module: in training each
layer call draws one ``z`` per gate for the whole batch (Louizos et al. Eq. 10; the
reference ``_sample_z``); in eval (or once a gate is frozen) the binary masks
(``HardConcreteGate.mask()``, EfficientVLM's ``_deterministic_z`` with kept entries = 1).
The gates are *not* registered in the backbone (its parameter count stays the model's):
optimise ``gate_set.parameters()`` (the ``log_alpha``s) and save ``gate_set.state_dict()``.

Costs for the size constraint (:meth:`GateSet.groups`)
------------------------------------------------------
Each entry costs the parameters it owns (see :func:`vlkit.methods.evlm.prune.head_cost`):
a head ``head_dim * (q_in + k_in + v_in + o_out) + 3 * head_dim`` (= ``4 * head_dim * D +
3 * head_dim`` for self-attention of width D), an FFN unit ``2 * D + 1``. A sub-layer gate
costs what only it removes: the output bias (D), plus the entries' costs when those have no
entry gate. So the full size (``sum cost``) is exactly the **prunable parameter count**: every
parameter of the gated q/k/v/o/fc1/fc2 Linear layers. (EfficientVLM's reference spreads the
output biases over the entries -- ``params_per_head = (4 D^2 + 4 D) / H``,
``params_per_intermediate_dim = (2 D d_ff + D + d_ff) / d_ff`` -- so its full size is the same
and its per-entry costs differ by under 0.1%.)
The budget's ``expected_size`` sums each gate's ``P(z > 0) * cost`` independently, ignoring
that a closed sub-layer gate also removes its entries (CoFi multiplies the two); it
therefore slightly over-estimates the size (a conservative constraint). The exact kept count
of the current masks is :meth:`GateSet.kept_params`.

Initial ``log_alpha`` (:data:`DEFAULT_INIT`): heads 10 (EfficientVLM ``reset_loga(mean=10)``),
FFN units 0 (its ``droprate_init = 0.5``), sub-layer gates 10 (open, the closest to the
reference which has none).
"""

from __future__ import annotations

import functools
import warnings
from typing import Iterable, Mapping

import torch
from torch import nn

from vlkit.models.layers import Attention, TransformerLayer
from vlkit.models.protocol import UnknownNameError
from vlkit.nn.gates import HardConcreteGate

from .prune import _entry_cost, _out_bias, _size, prunable_units, unit_keys
from .prune import sublayer as _sublayer

__all__ = ["GateSet", "attach_gates", "DEFAULT_INIT", "INIT_KEYS"]

#: initial ``log_alpha`` per gate kind (module docstring)
DEFAULT_INIT = {"heads": 10.0, "cross_heads": 10.0, "ffn": 0.0, "sublayer": 10.0}
INIT_KEYS = tuple(DEFAULT_INIT)
LAYER_SUFFIX = "_layer"


def _init_values(init_log_alpha) -> dict[str, float]:
    if init_log_alpha is None:
        return dict(DEFAULT_INIT)
    if isinstance(init_log_alpha, Mapping):
        for k in init_log_alpha:
            if k not in INIT_KEYS:
                raise UnknownNameError("init_log_alpha key", k, INIT_KEYS)
        return {**DEFAULT_INIT, **{k: float(v) for k, v in init_log_alpha.items()}}
    try:
        v = float(init_log_alpha)
    except (TypeError, ValueError):
        raise TypeError(f"init_log_alpha must be a float or a dict with keys {INIT_KEYS}, "
                        f"got {init_log_alpha!r}") from None
    return {k: v for k in INIT_KEYS}


class GateSet(nn.Module):
    """The gates :func:`attach_gates` put on a backbone, and what methods need from them.

    ``gate_set.gates[unit][key]`` is a :class:`HardConcreteGate` (keys in the module
    docstring's table); ``modality[unit]`` the unit's modality tag; ``skipped[unit]`` why a
    unit got no gates. ``generator`` (optional ``torch.Generator`` on the gates' device)
    seeds the training samples; ``None`` uses the global RNG.
    """

    def __init__(self):
        super().__init__()
        self.gates = nn.ModuleDict()
        self.modality: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.generator: torch.Generator | None = None
        self._layers: dict[str, TransformerLayer] = {}  # plain dict: not registered as submodules
        self._handles: list = []

    # ------------------------------------------------------------------ forward hooks
    def _draw(self, gate: HardConcreteGate, training: bool) -> torch.Tensor:
        if training and not gate.frozen:
            return gate.sample(self.generator)
        return gate.mask()

    def _set_gates(self, name: str, layer: TransformerLayer, args) -> None:
        gates, training = self.gates[name], layer.training
        for key in unit_keys(layer):
            entry = gates[key] if key in gates else None
            whole = gates[key + LAYER_SUFFIX] if key + LAYER_SUFFIX in gates else None
            if entry is None and whole is None:
                continue
            module = _sublayer(layer, key)
            z = self._draw(entry, training) if entry is not None else None
            scale = self._draw(whole, training).reshape(()) if whole is not None else None
            if z is not None:
                alive = (z.detach() > 0).any().to(z.dtype)  # all entries 0 => the sub-layer is gone, bias too
                scale = alive if scale is None else scale * alive
            if isinstance(module, Attention):
                module.head_mask = z
            else:
                module.unit_mask = z
            module.out_scale = scale

    @staticmethod
    def _clear(layer: TransformerLayer, *_) -> None:
        for key in unit_keys(layer):
            module = _sublayer(layer, key)
            if isinstance(module, Attention):
                module.head_mask = None
            else:
                module.unit_mask = None
            module.out_scale = None

    def _hook(self, name: str, layer: TransformerLayer) -> None:
        self._handles.append(layer.register_forward_pre_hook(functools.partial(self._pre_hook, name)))
        self._handles.append(layer.register_forward_hook(self._post_hook, always_call=True))
        layer._evlm_gated = True

    def _pre_hook(self, name, layer, args):
        self._set_gates(name, layer, args)

    def _post_hook(self, layer, args, output):
        self._clear(layer)

    # ------------------------------------------------------------------ public API
    @property
    def unit_names(self) -> list[str]:
        return list(self.gates)

    def all_gates(self) -> list[HardConcreteGate]:
        return [g for d in self.gates.values() for g in d.values()]

    def _costs(self, name: str) -> list[tuple[str, HardConcreteGate, float]]:
        """(key, gate, cost per entry) of one unit, in sub-layer order."""
        layer, gates, out = self._layers[name], self.gates[name], []
        for key in unit_keys(layer):
            module = _sublayer(layer, key)
            if key in gates:
                out.append((key, gates[key], float(_entry_cost(module))))
            if key + LAYER_SUFFIX in gates:
                own = _out_bias(module) + (0 if key in gates else _size(module) * _entry_cost(module))
                out.append((key + LAYER_SUFFIX, gates[key + LAYER_SUFFIX], float(own)))
        return out

    def groups(self) -> dict[str, list[tuple[HardConcreteGate, float]]]:
        """``{modality: [(gate, cost per entry), ...]}`` for :class:`~vlkit.nn.lagrangian.SparsityBudget`
        (costs in the module docstring; their sum is :meth:`prunable_params`)."""
        out: dict[str, list] = {}
        for name in self.gates:
            out.setdefault(self.modality[name], []).extend((g, c) for _, g, c in self._costs(name))
        return out

    def budget(self, target_sparsity, warmup_steps: int = 0, scope: str = "global"):
        """A :class:`~vlkit.nn.lagrangian.SparsityBudget` over :meth:`groups` (``global`` =
        EfficientVLM's modal-adaptive budget, ``per_group`` = uniform per modality)."""
        from vlkit.nn.lagrangian import SparsityBudget

        return SparsityBudget(self.groups(), target_sparsity, warmup_steps=warmup_steps, scope=scope)

    def prunable_params(self) -> int:
        """Every parameter the gates can remove (= the budget's full size)."""
        return int(sum(g.n * c for name in self.gates for _, g, c in self._costs(name)))

    @torch.no_grad()
    def masks(self) -> dict[str, dict[str, torch.Tensor]]:
        """The binary masks in :func:`~vlkit.methods.evlm.prune.prune`'s format (True = keep,
        CPU bool), from each gate's ``mask()`` (eval rule or frozen mask), with each sub-layer
        gate folded in (sub-layer gate 0 => all its entries False). Only gated sub-layers appear."""
        out = {}
        for name, gates in self.gates.items():
            layer, entry = self._layers[name], {}
            for key in unit_keys(layer):
                if key not in gates and key + LAYER_SUFFIX not in gates:
                    continue
                n = _size(_sublayer(layer, key))
                keep = (gates[key].mask() > 0).cpu() if key in gates else torch.ones(n, dtype=torch.bool)
                if key + LAYER_SUFFIX in gates and not bool(gates[key + LAYER_SUFFIX].mask()[0] > 0):
                    keep = torch.zeros(n, dtype=torch.bool)
                entry[key] = keep
            out[name] = entry
        return out

    def kept_params(self) -> int:
        """Prunable parameters the current :meth:`masks` keep: kept entries times their cost,
        plus the output bias of every sub-layer that keeps an entry (what pruning leaves)."""
        kept = 0
        for name, entry in self.masks().items():
            for key, keep in entry.items():
                module = _sublayer(self._layers[name], key)
                kept += int(keep.sum()) * _entry_cost(module) + (_out_bias(module) if bool(keep.any()) else 0)
        return kept

    def freeze(self) -> "GateSet":
        """Freeze every gate (its current eval mask, for good); see ``HardConcreteGate.freeze``."""
        for g in self.all_gates():
            g.freeze()
        return self

    def detach(self) -> "GateSet":
        """Remove the hooks and clear the mask fields they set; the gates stay readable
        (``masks()`` still works), the backbone is back to its ungated self."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer in self._layers.values():
            self._clear(layer)
            layer.__dict__.pop("_evlm_gated", None)
        return self

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def extra_repr(self) -> str:
        mods = {}
        for name in self.gates:
            mods[self.modality[name]] = mods.get(self.modality[name], 0) + 1
        return (f"units={len(self.gates)} ({', '.join(f'{k}: {v}' for k, v in mods.items())}), "
                f"prunable_params={self.prunable_params()}, attached={self.attached}")


def attach_gates(backbone, units: Iterable[str] | None = None, heads: bool = True, ffn: bool = True,
                 sublayer: bool = True, init_log_alpha: float | Mapping[str, float] | None = None,
                 **gate_kwargs) -> GateSet:
    """Put hard-concrete gates on the TransformerLayer units of ``backbone`` (module docstring).

    Args:
        units: unit names to gate (each must be a TransformerLayer unit); ``None`` = every
            TransformerLayer unit -- the others (DAS skip adapters, T5 blocks) are skipped
            with a warning and listed in ``GateSet.skipped``.
        heads: gate self- and cross-attention heads; ffn: gate FFN units;
        sublayer: add one gate per sub-layer (CoFi ``head_layer_z`` / ``mlp_z``).
        init_log_alpha: a float for every gate, or a dict over ``heads``, ``cross_heads``,
            ``ffn``, ``sublayer`` (defaults :data:`DEFAULT_INIT`).
        gate_kwargs: passed to every :class:`HardConcreteGate` (``l``, ``r``, ``beta``,
            ``log_alpha_range``, ...).

    Returns the :class:`GateSet`; ``gate_set.detach()`` removes everything.
    """
    if not (heads or ffn or sublayer):
        raise ValueError("nothing to gate: heads, ffn and sublayer are all False")
    init = _init_values(init_log_alpha)
    layers = prunable_units(backbone)
    modality = {u.name: u.modality for u in backbone.units}
    gs = GateSet()
    if units is None:
        names = []
        for u in backbone.units:
            if u.name in layers:
                names.append(u.name)
            else:
                gs.skipped[u.name] = f"served by a {type(u.module).__name__}, not a TransformerLayer"
        if gs.skipped:
            warnings.warn(f"attach_gates: no gates on units {list(gs.skipped)} (not TransformerLayers)", stacklevel=2)
    else:
        names = [units] if isinstance(units, str) else list(units)
        for n in names:
            if n not in modality:
                raise UnknownNameError("unit", n, list(modality))
            if n not in layers:
                raise ValueError(f"unit {n!r} is served by a {type(backbone.unit(n)).__name__}, not a "
                                 f"TransformerLayer: nothing to gate; gateable units: {', '.join(layers)}")
    for n in names:
        if getattr(layers[n], "_evlm_gated", False):
            raise ValueError(f"unit {n!r} already carries gates (detach the other GateSet first)")
    if not names:
        raise ValueError("the backbone has no TransformerLayer unit to gate")
    for n in names:
        layer = layers[n]
        device = layer.ffn.fc1.weight.device
        unit_gates = nn.ModuleDict()
        for key in unit_keys(layer):
            size = _size(_sublayer(layer, key))
            if size == 0:  # already removed: nothing left to gate
                continue
            if (heads if key != "ffn" else ffn):
                unit_gates[key] = HardConcreteGate(size, init_log_alpha=init[key], **gate_kwargs).to(device)
            if sublayer:
                unit_gates[key + LAYER_SUFFIX] = HardConcreteGate(1, init_log_alpha=init["sublayer"],
                                                                  **gate_kwargs).to(device)
        gs.gates[n] = unit_gates
        gs.modality[n] = modality[n]
        gs._layers[n] = layer
    for n in names:
        gs._hook(n, layers[n])
    return gs

