"""DAS, step 5: replace the chosen units by skip adapters and adapt the kept ones.

Paper: Wu et al., "Parameter and Computation Efficient Transfer Learning for Vision-Language
Pre-trained Models" (DAS, NeurIPS 2023), Sec. 3.2 / Fig. 2; official code ``DoubtedSteam/DAS``:
``ViLT/vilt/modules/vilt_module_train.py`` (``adapter_list``: ``ParallelAdapter(bottleneck=96 * 2)``
per skipped block, ``vision_transformer_PA.py``: ``adapter0`` / ``adapter1`` beside attention and
MLP of every kept block), ``METER/meter/modules/meter_module_train.py`` (``96 * 3`` per skipped
fusion layer; ``bert_model_PA.py``: one adapter beside self-attention, cross-attention and FFN).

Layout (sizes are parameters; defaults are the official ones)
-------------------------------------------------------------
* every **kept candidate unit** gets one :class:`~vlkit.nn.adapters.ParallelAdapter` (bottleneck
  ``kept_bottleneck``, official 96) beside each of its sub-layers: ``attn`` and ``ffn``, plus
  ``cross`` for fusion layers with cross-attention (METER ``FL*`` / ``FV*``, X-VLM ``F*``);
* every **skipped unit** becomes a :class:`~vlkit.nn.adapters.SkipAdapter` ``x + delta(x)``
  whose bottleneck is ``kept_bottleneck x (number of adapter slots of that unit)``: 2 x 96 =
  192 for a ViLT / BERT layer, 3 x 96 = 288 for a METER fusion layer -- exactly the official
  sizes. The skip adapter then costs the same MACs as the adapters it replaces (both are
  ``2 D r`` per token and slot), so **skipping a unit saves exactly the unit's own MACs**
  (12 N D^2 + 2 N^2 D = 1.795 G for a ViLT-B/32 layer at N = 241);
* units outside the candidate set (METER's vision tower ``VEn*``, and its text tower ``LEn*``
  under ``scope="fusion"``) stay as they are, frozen and without adapters (official METER
  trains nothing inside ``vit_model`` / ``text_transformer``).

Official defaults are ReLU and BERT init (N(0, 0.02), biases 0) for every adapter:
``act="relu", init="bert"``. Pass ``init="zero"`` for identity-at-init adapters.

Candidates (:func:`candidates`)
-------------------------------
Two-tower backbones (vision and text towers + fusion units: METER, X-VLM): ``scope="fusion"`` -> the fusion units
(``FL*``/``FV*`` in execution order, or ``F*``); ``scope="global"`` -> the text encoder
(``LEn*``) then the fusion units. Vision units are never candidates. Backbones without
vision or fusion units (ViLT's ``En*`` are ``joint``; BERT / MiniLM ``En*``, T5 ``Enc*``/``Dec*`` are
``text``): every non-vision unit, under either scope (a single-stream model fuses in every
layer).

What trains (:func:`das_trainable`)
-----------------------------------
The official ``trainable`` list: adapters, poolers, token-type embeddings (and the task head,
which is the caller's module). Two-tower backbones keep their towers' own embeddings frozen
(official METER excludes everything under ``text_transformer`` / ``vit_model``), so there only
the fusion ``token_type_embeddings`` train; ViLT trains both its modality-type embeddings and
its text token-type embeddings (the official substring match catches both).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from vlkit.models.protocol import UnitContext, UnknownNameError
from vlkit.nn.adapters import BottleneckAdapter, SkipAdapter, add_adapters
from vlkit.seeding import seeded

__all__ = ["SCOPES", "DEFAULT_BOTTLENECK", "candidates", "adapter_slots", "skip_bottleneck_for", "apply_skips",
           "apply_das", "das_trainable", "SkippableUnit", "SkipSupernet", "check_skip_set"]

SCOPES = ("fusion", "global")
DEFAULT_BOTTLENECK = 96  # official kept-block adapter width (ViLT and METER)


# ----------------------------------------------------------------------------- candidates
def candidates(backbone, scope: str = "fusion") -> list[str]:
    """Units that DAS may skip, in execution order (see the module docstring).

    ``scope``: ``"fusion"`` or ``"global"``. Raises :class:`UnknownNameError` for another
    scope and ``ValueError`` when the scope holds no unit in this backbone.
    """
    if scope not in SCOPES:
        raise UnknownNameError("DAS scope", scope, SCOPES)
    if _two_tower(backbone):
        names = backbone.units_of("fusion") if scope == "fusion" else backbone.units_of("text", "fusion")
    else:
        names = [s.name for s in backbone.specs if s.modality != "vision"]
    if not names:
        raise ValueError(f"scope {scope!r} has no candidate units in this {type(backbone).__name__} "
                         f"(units: {', '.join(backbone.unit_names) or 'none'}); vision units are never candidates")
    return names


def _two_tower(backbone) -> bool:
    """Separate vision / text towers (+ fusion units): METER, X-VLM; not ViLT (``joint``), BERT, T5."""
    return bool(backbone.units_of("vision", "fusion"))


def adapter_slots(layer: nn.Module) -> tuple[str, ...]:
    """Sub-layers that get a parallel adapter: ``attn``, [``cross``,] ``ffn``."""
    if getattr(layer, "cross_attn", None) is not None:
        return ("attn", "cross", "ffn")
    return ("attn", "ffn")


def skip_bottleneck_for(layer: nn.Module, kept_bottleneck: int = DEFAULT_BOTTLENECK) -> int:
    """Official skip-adapter width: ``kept_bottleneck`` x number of adapter slots of the unit
    (ViLT 2 x 96 = 192, METER fusion 3 x 96 = 288)."""
    return kept_bottleneck * len(adapter_slots(layer))


def check_skip_set(backbone, names: Iterable[str], cands: Sequence[str], scope: str, *,
                   allow_empty: bool = True) -> tuple[str, ...]:
    """Validate a skip set against the backbone and its candidates; return it in unit order.

    Unknown unit names raise :class:`UnknownNameError` (listing the units), names that are
    units but not candidates raise it listing the candidates; duplicates and
    ``len(names) >= len(cands)`` (nothing left to keep) raise ``ValueError``.
    """
    if isinstance(names, str):
        raise TypeError(f"skip names must be a collection of unit names, got the string {names!r}")
    names = list(names)
    units = backbone.unit_names
    for n in names:
        if n not in units:
            raise UnknownNameError("unit", n, units)
        if n not in cands:
            raise UnknownNameError(f"{scope}-scope skip candidate", n, cands)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"skip set {names} names {dup} more than once")
    if len(names) >= len(cands):
        raise ValueError(f"cannot skip k={len(names)} units: the {scope} scope has only {len(cands)} candidates "
                         f"({', '.join(cands)}); k must be < {len(cands)}")
    if not names and not allow_empty:
        raise ValueError("the skip set is empty")
    order = {n: i for i, n in enumerate(units)}
    return tuple(sorted(names, key=order.__getitem__))


def _check_bottleneck(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _make_skip(layer: nn.Module, kept_bottleneck: int, skip_bottleneck: int | None, act: str,
               init: str) -> SkipAdapter:
    dim = getattr(layer, "dim", None)
    if dim is None:
        raise TypeError(f"cannot size a skip adapter for a {type(layer).__name__} (no .dim); "
                        "DAS skips TransformerLayer units")
    r = skip_bottleneck if skip_bottleneck is not None else skip_bottleneck_for(layer, kept_bottleneck)
    skip = SkipAdapter(dim, r, act=act, init=init)
    ref = next(layer.parameters(), None)
    return skip.to(device=ref.device, dtype=ref.dtype) if ref is not None else skip


# ----------------------------------------------------------------------------- trainable
def das_trainable(backbone, *extra: nn.Module | None) -> list[str]:
    """Set ``requires_grad`` as DAS trains: adapters, poolers and token-type embeddings of
    ``backbone`` (module docstring for the two-tower rule) plus every parameter of ``extra``
    modules (the task head); everything else frozen. Returns the trainable parameter names
    of ``backbone``. A pooler the backbone does not use (``pooling="mean"``) stays frozen.
    """
    towers = ("text_embeddings.", "vision_embeddings.") if _two_tower(backbone) else ()
    uses_pooler = getattr(backbone, "pooling", "cls") == "cls"
    for p in backbone.parameters():
        p.requires_grad_(False)
    for mname, m in backbone.named_modules():
        last = mname.rsplit(".", 1)[-1]
        if isinstance(m, BottleneckAdapter):
            train = True
        elif last == "token_type_embeddings" or (last.endswith("pooler") and uses_pooler):
            train = not mname.startswith(towers) if towers else True
        else:
            train = False
        if train:
            for p in m.parameters():
                p.requires_grad_(True)
    for m in extra:
        if m is not None:
            for p in m.parameters():
                p.requires_grad_(True)
    return [n for n, p in backbone.named_parameters() if p.requires_grad]


def _seeded(seed: int | None):
    """Adapters are drawn from a private CPU RNG stream when ``seed`` is given
    (:func:`vlkit.seeding.seeded`: the global RNG is left as it was), from the global one
    otherwise."""
    return contextlib.nullcontext() if seed is None else seeded(seed)


# ----------------------------------------------------------------------------- final model
def apply_skips(backbone, names: Iterable[str], *, scope: str = "fusion", kept_bottleneck: int = DEFAULT_BOTTLENECK,
                skip_bottleneck: int | None = None, act: str = "relu", init: str = "bert", seed: int | None = 0,
                inplace: bool = True, freeze: bool = True):
    """Skip the units ``names`` of ``backbone`` and adapt the kept candidates (DAS Sec. 3.2).

    * each unit in ``names`` is replaced (``backbone.replace_unit``) by a
      :class:`~vlkit.nn.adapters.SkipAdapter` of bottleneck ``skip_bottleneck`` (default
      :func:`skip_bottleneck_for`: 192 for ViLT / BERT layers, 288 for METER fusion layers);
    * each other unit of ``candidates(backbone, scope)`` gets parallel adapters of bottleneck
      ``kept_bottleneck`` (default 96) in :func:`adapter_slots`;
    * with ``freeze`` (default), :func:`das_trainable` sets what trains (adapters, poolers,
      token-type embeddings; the caller's task head stays as it is).

    ``names`` may be empty (adapters only: the "k = 0" model). ``seed``: adapters are
    initialised from ``torch.manual_seed(seed)`` in a forked RNG (``None``: the global RNG).
    ``inplace=False`` works on a deep copy. Returns the backbone; afterwards
    :func:`vlkit.efficiency.unit_macs` reports each skip adapter's cost under the skipped
    unit's name. Bad input (unknown / non-candidate / repeated names, ``k >=`` number of
    candidates, unknown scope, an empty scope) raises before anything is changed.
    """
    cands = candidates(backbone, scope)
    skips = check_skip_set(backbone, names, cands, scope)
    _check_bottleneck("kept_bottleneck", kept_bottleneck)
    _check_bottleneck("skip_bottleneck", skip_bottleneck)
    for n in cands:
        layer = backbone.unit(n)
        if not (isinstance(getattr(layer, "adapters", None), nn.ModuleDict) and hasattr(layer, "dim")):
            raise TypeError(f"unit {n} is a {type(layer).__name__}, not a TransformerLayer: already skipped or "
                            "replaced? apply_skips needs the pre-trained backbone")
        taken = [s for s in adapter_slots(layer) if s in layer.adapters]
        if taken:
            raise ValueError(f"unit {n} already has adapters in slots {taken}: apply_skips needs the pre-trained "
                             "backbone (apply it once, to a fresh copy)")
    if not inplace:
        backbone = copy.deepcopy(backbone)
    with _seeded(seed):
        for n in cands:  # unit order: the same seed gives the same adapters
            layer = backbone.unit(n)
            if n in skips:
                backbone.replace_unit(n, _make_skip(layer, kept_bottleneck, skip_bottleneck, act, init))
            else:
                add_adapters(layer, "parallel", kept_bottleneck, adapter_slots(layer), act=act, init=init)
    if freeze:
        das_trainable(backbone)
    return backbone


def apply_das(backbone, *, skip: Sequence[str] = (), scope: str = "fusion", kept_bottleneck: int = DEFAULT_BOTTLENECK,
              skip_bottleneck: int | None = None, act: str = "relu", init: str = "bert", seed: int = 0):
    """DAS as a PETL method (``vlkit.methods.petl.apply("das", backbone, skip=[...])``): the
    final DAS model of :func:`apply_skips` -- ``skip`` replaced by skip adapters, parallel
    adapters on the kept candidates of ``scope``, and only adapters, poolers and token-type
    embeddings trainable. ``skip=()`` is DAS's "k = 0" (adapters only). In place."""
    return apply_skips(backbone, list(skip), scope=scope, kept_bottleneck=kept_bottleneck,
                       skip_bottleneck=skip_bottleneck, act=act, init=init, seed=seed, inplace=True, freeze=True)


# ----------------------------------------------------------------------------- search supernet
class SkippableUnit(nn.Module):
    """A candidate unit during the search: the (adapted) layer and its skip adapter side by
    side; ``skipped`` picks which one runs. Called as ``unit(x, ctx)`` like any protocol unit."""

    def __init__(self, layer: nn.Module, skip: SkipAdapter):
        super().__init__()
        self.layer, self.skip = layer, skip
        self.skipped = False

    def forward(self, x: torch.Tensor, ctx: UnitContext | None = None) -> torch.Tensor:
        return self.skip(x, ctx) if self.skipped else self.layer(x, ctx)

    def extra_repr(self) -> str:
        return f"skipped={self.skipped}"


class SkipSupernet:
    """Every candidate of ``backbone`` (modified in place) carries both its parallel adapters
    and its skip adapter, so any skip set can be run without rebuilding modules: all
    subnetworks share the adapters, as in the official search (``skip_flag`` per block).

    Each candidate unit is replaced by a :class:`SkippableUnit`; :meth:`set_skips` flips the
    flags (validated like :func:`apply_skips`, so ``k <`` number of candidates), and
    :meth:`skipping` does it for a ``with`` block. With the skip set ``S`` active the backbone
    computes, and costs, exactly what ``apply_skips(backbone, S)`` with the same adapter
    weights does. Adapter sizes, ``act``, ``init`` and ``seed`` as in :func:`apply_skips`.
    """

    def __init__(self, backbone, scope: str = "fusion", *, kept_bottleneck: int = DEFAULT_BOTTLENECK,
                 skip_bottleneck: int | None = None, act: str = "relu", init: str = "bert", seed: int | None = 0):
        _check_bottleneck("kept_bottleneck", kept_bottleneck)
        _check_bottleneck("skip_bottleneck", skip_bottleneck)
        self.backbone, self.scope = backbone, scope
        self.candidates: tuple[str, ...] = tuple(candidates(backbone, scope))
        for n in self.candidates:
            layer = backbone.unit(n)
            if not (isinstance(getattr(layer, "adapters", None), nn.ModuleDict) and hasattr(layer, "dim")):
                raise TypeError(f"unit {n} is a {type(layer).__name__}, not a TransformerLayer")
            if any(s in layer.adapters for s in adapter_slots(layer)):
                raise ValueError(f"unit {n} already has adapters: build the supernet on the pre-trained backbone")
        self.units: dict[str, SkippableUnit] = {}
        with _seeded(seed):
            for n in self.candidates:
                layer = backbone.unit(n)
                add_adapters(layer, "parallel", kept_bottleneck, adapter_slots(layer), act=act, init=init)
                unit = SkippableUnit(layer, _make_skip(layer, kept_bottleneck, skip_bottleneck, act, init))
                backbone.replace_unit(n, unit)
                self.units[n] = unit
        self._skips: tuple[str, ...] = ()

    @property
    def skips(self) -> tuple[str, ...]:
        """The active skip set, in unit order."""
        return self._skips

    def set_skips(self, names: Iterable[str]) -> tuple[str, ...]:
        """Make ``names`` the active skip set (any earlier one is cleared); returns it in unit order."""
        skips = check_skip_set(self.backbone, names, self.candidates, self.scope)
        for n, unit in self.units.items():
            unit.skipped = n in skips
        self._skips = skips
        return skips

    @contextlib.contextmanager
    def skipping(self, names: Iterable[str]) -> Iterator[tuple[str, ...]]:
        """``with supernet.skipping(S): ...`` runs with ``S`` skipped, then restores the previous set."""
        before = self._skips
        try:
            yield self.set_skips(names)
        finally:
            self.set_skips(before)

    def __repr__(self) -> str:
        return f"SkipSupernet(scope={self.scope!r}, candidates={list(self.candidates)}, skips={list(self._skips)})"
