"""Bottleneck adapters: the trainable parts DAS adds to a frozen backbone.

Paper: Wu et al., "Parameter and Computation Efficient Transfer Learning for Vision-Language
Pre-trained Models" (DAS, NeurIPS 2023), Sec. 3; official code
``DoubtedSteam/DAS`` (``ViLT/vilt/modules/vision_transformer_PA.py: Adapter_Layer``,
``METER/meter/modules/efficientmodules.py: ParallelAdapter``).

The bottleneck (Houlsby et al. 2019; He et al. 2022 for the parallel form)::

    delta(x) = W_up . act(W_down . LN(x) + b_down) + b_up          (D -> r -> D)

Three ways to use it:

* :class:`ParallelAdapter` -- a slot module of :class:`~vlkit.models.layers.TransformerLayer`
  that adds ``delta`` of the sub-layer's *residual input* beside the sub-layer:
  ``h' = h + delta(x_in)``. With pre-norm this is the official DAS kept block
  ``x + Attn(LN1 x) + adapter0(x)``.
* :class:`SequentialAdapter` -- Houlsby-style: the adapter reads the sub-layer *output*,
  ``h' = h + delta(h)`` (the adapter sits after the sub-layer's projection, before the
  residual sum / post-norm, with its own skip connection).
* :class:`SkipAdapter` -- a protocol unit that replaces a skipped layer:
  ``x' = x + delta(x)``; exactly the official skip adapter (``ParallelAdapter(bottleneck=192)``
  called with its default ``add_residual=True`` in ``vilt_module_train.py``; 288 = 96 * 3
  for METER in ``meter_module_train.py``).

Official layout (sizes are parameters here): each kept block gets two parallel adapters,
beside attention and beside the FFN, bottleneck 96; each skipped block becomes one skip
adapter, bottleneck 192 (ViLT) or 288 (METER).

What we chose, and how it differs from the official code
--------------------------------------------------------
* **Zero-initialised up-projection** (``init="zero"``, the default): every adapter is the
  identity at init, so adding adapters leaves a pre-trained model's outputs unchanged and a
  skip adapter starts as "drop the layer". The official code's default is BERT init
  (``init="bert"``: every Linear ~ N(0, 0.02), biases 0), which perturbs the outputs a
  little at init; it is available for faithful reproductions.
* **Activation** defaults to GELU (the kit's spec); the official adapters use **ReLU** --
  pass ``act="relu"`` to match them. Any name of :data:`vlkit.models.layers.ACTIVATIONS`.
* **LayerNorm in front** (``layer_norm=True``) as the official ``adapter_layernorm_option="in"``;
  ``nn.LayerNorm`` with eps 1e-5 as there. Official dropout (0.0) and scale (1.0) are omitted.

Cost
----
Parameters of one adapter (:func:`bottleneck_params`): ``2 D r + r + D`` (+ ``2 D`` for the
LayerNorm). At D = 768: r = 96 -> 149,856; r = 192 -> 297,408; r = 288 -> 444,960.
MACs per token: ``2 D r`` (the two matmuls; LN, activation and biases not counted).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from vlkit.models.layers import ACTIVATIONS
from vlkit.models.protocol import UnitContext, UnknownNameError

PLACEMENTS = ("parallel", "sequential")
SLOTS = ("attn", "cross", "ffn")
INITS = ("zero", "bert")


def bottleneck_params(dim: int, bottleneck: int, layer_norm: bool = True) -> int:
    """Parameter count of one bottleneck adapter: ``2*D*r + r + D`` (+ ``2*D`` with LN).

    down (D*r weight + r bias) + up (r*D weight + D bias) + LayerNorm (D gain + D shift).
    E.g. D = 768, r = 96: 2*768*96 + 96 + 768 + 2*768 = 149,856.
    """
    return 2 * dim * bottleneck + bottleneck + dim + (2 * dim if layer_norm else 0)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class BottleneckAdapter(nn.Module):
    """``delta(x) = up(act(down(LN x)))``: the bottleneck itself (zero at init by default).

    Called as ``adapter(x)`` it returns the *delta* only (no residual); the slot and unit
    modules below add it where it belongs.

    dim:        model width D
    bottleneck: hidden width r
    act:        activation name, one of :data:`vlkit.models.layers.ACTIVATIONS` (official: relu)
    layer_norm: LayerNorm on the input (official ``adapter_layernorm_option="in"``)
    init:       ``"zero"`` (up-projection zero -> delta = 0 at init; down ~ Kaiming-uniform as
                ``nn.Linear``) or ``"bert"`` (official default: all weights ~ N(0, 0.02), biases 0)

    Parameters: :func:`bottleneck_params` ``(dim, bottleneck, layer_norm)``.
    """

    def __init__(self, dim: int, bottleneck: int, act: str = "gelu", layer_norm: bool = True,
                 init: str = "zero"):
        super().__init__()
        _check_positive("dim", dim)
        _check_positive("bottleneck", bottleneck)
        if act not in ACTIVATIONS:
            raise UnknownNameError("activation", act, ACTIVATIONS)
        if init not in INITS:
            raise UnknownNameError("adapter init", init, INITS)
        self.dim, self.bottleneck, self.act, self.init = dim, bottleneck, act, init
        self.norm = nn.LayerNorm(dim) if layer_norm else None
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise as ``init`` says (see the class docstring)."""
        with torch.no_grad():
            if self.norm is not None:
                self.norm.reset_parameters()
            if self.init == "zero":
                self.down.reset_parameters()
                nn.init.zeros_(self.up.weight)
                nn.init.zeros_(self.up.bias)
            else:  # "bert": official init_bert_weights
                for lin in (self.down, self.up):
                    lin.weight.normal_(0.0, 0.02)
                    lin.bias.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``up(act(down(LN x)))`` for ``x`` of shape (..., D)."""
        h = self.norm(x) if self.norm is not None else x
        return self.up(ACTIVATIONS[self.act](self.down(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta(x)

    def extra_repr(self) -> str:
        return f"act={self.act!r}, init={self.init!r}"


class ParallelAdapter(BottleneckAdapter):
    """Slot module: ``(x_in, h) -> h + delta(x_in)`` -- the adapter runs beside the sub-layer.

    ``x_in`` is the sub-layer's residual input, ``h`` its output before the residual sum
    (see ``TransformerLayer._sublayer``). For a pre-norm layer the result is
    ``x + SubLayer(LN x) + delta(x)``: the official DAS kept block (``adapter0``/``adapter1``
    with ``add_residual=False``). Parameters: :func:`bottleneck_params`.
    """

    def forward(self, x_in: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(x_in)


class SequentialAdapter(BottleneckAdapter):
    """Slot module: ``(x_in, h) -> h + delta(h)`` -- Houlsby-style, after the sub-layer.

    The adapter reads the sub-layer output ``h`` (after its output projection and dropout),
    with its own skip connection, before the layer's residual sum and (post-)norm, as in
    Houlsby et al. 2019, Fig. 2. ``x_in`` is ignored. Parameters: :func:`bottleneck_params`.
    """

    def forward(self, x_in: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


class SkipAdapter(BottleneckAdapter):
    """Protocol unit replacing a skipped layer: ``module(x, ctx) -> x + delta(x)``.

    This is the official DAS skip adapter (``ParallelAdapter(bottleneck=96 * 2)`` for ViLT,
    ``96 * 3`` for METER, called as ``adapter(x)`` with its residual), so a skipped layer costs
    ``2 D r`` MACs per token instead of ``12 D^2 + 2 N D``. ``ctx`` (a
    :class:`~vlkit.models.protocol.UnitContext`) is ignored: the adapter is token-wise, so
    padding tokens never leak into others. Identity at init with ``init="zero"``.
    """

    def forward(self, x: torch.Tensor, ctx: UnitContext | None = None) -> torch.Tensor:
        return x + self.delta(x)


_PLACEMENT_CLASSES = {"parallel": ParallelAdapter, "sequential": SequentialAdapter}


def add_adapters(layer: nn.Module, placement: str = "parallel", bottleneck: int = 96,
                 slots: Iterable[str] = ("attn", "ffn"), *, act: str = "gelu", layer_norm: bool = True,
                 init: str = "zero") -> dict[str, BottleneckAdapter]:
    """Put one adapter in each of ``slots`` of a :class:`~vlkit.models.layers.TransformerLayer`.

    The default is the official DAS kept block: parallel adapters (bottleneck 96) beside the
    self-attention and beside the FFN. ``"cross"`` is valid only for layers with
    cross-attention. The adapters are created on the layer's device and dtype and are
    trainable even if the layer is frozen. A slot that already holds an adapter is an error
    (nothing is overwritten). Returns ``{slot: adapter}``; the layer gains
    ``len(slots) * bottleneck_params(layer.dim, bottleneck, layer_norm)`` parameters.
    """
    if not isinstance(getattr(layer, "adapters", None), nn.ModuleDict) or not hasattr(layer, "dim"):
        raise TypeError(f"add_adapters needs a TransformerLayer (with .adapters and .dim), got {type(layer).__name__}")
    if placement not in _PLACEMENT_CLASSES:
        raise UnknownNameError("adapter placement", placement, PLACEMENTS)
    if isinstance(slots, str):
        slots = (slots,)
    slots = tuple(slots)
    valid = [s for s in SLOTS if s != "cross" or getattr(layer, "cross_attn", None) is not None]
    for s in slots:
        if s not in valid:
            raise UnknownNameError("adapter slot", s, valid)
        if s in layer.adapters:
            raise ValueError(f"slot {s!r} of this layer already holds an adapter "
                             f"({type(layer.adapters[s]).__name__}); remove it first")
    if len(set(slots)) != len(slots):
        raise ValueError(f"duplicate slots in {slots}")
    ref = next(layer.parameters(), None)
    added = {}
    for s in slots:
        module = _PLACEMENT_CLASSES[placement](layer.dim, bottleneck, act=act, layer_norm=layer_norm, init=init)
        if ref is not None:
            module = module.to(device=ref.device, dtype=ref.dtype)
        layer.adapters[s] = module
        added[s] = module
    return added


def trainable_adapter_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters of every :class:`BottleneckAdapter` inside ``module`` (slot adapters
    and skip adapters alike), in ``named_parameters`` order -- what DAS trains beside the
    task head. Names are relative to ``module``."""
    out: dict[str, nn.Parameter] = {}
    for prefix, sub in module.named_modules():
        if isinstance(sub, BottleneckAdapter):
            for name, p in sub.named_parameters(prefix=prefix):
                out.setdefault(name, p)
    return out


def count_adapter_params(module: nn.Module) -> int:
    """Total number of adapter parameters inside ``module`` (see :func:`trainable_adapter_params`)."""
    return sum(p.numel() for p in trainable_adapter_params(module).values())


__all__ = ["BottleneckAdapter", "ParallelAdapter", "SequentialAdapter", "SkipAdapter", "add_adapters",
           "bottleneck_params", "trainable_adapter_params", "count_adapter_params", "PLACEMENTS", "SLOTS"]
