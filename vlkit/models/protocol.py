"""The backbone protocol: the one seam through which every method touches a model.

A backbone is an ``nn.Module`` whose Transformer (or CNN) layers are exposed as named,
ordered **units**. Methods never reach into a backbone's internals; they

* look units up by name (``backbone.unit("En3")``) or list them (``backbone.units``),
* swap one for another module (``replace_unit`` -- DAS skips, SHERL regulation),
* embed the inputs once (``embed``) and run any slice of units (``run_units``), so a caller
  can run a frozen prefix under ``torch.no_grad()`` and then the last unit with a graph,
* read every unit's output and, on request, attention maps (distillation),
* encode one modality alone (``encode_image`` / ``encode_text`` on two-tower presets).

Unit call convention
--------------------
Every unit module is called as ``module(x, ctx)`` where ``x`` is the stream the unit reads
and writes (a ``(B, N, D)`` tensor for Transformers) and ``ctx`` a :class:`UnitContext`
holding the attention mask of that stream, the other stream for cross-attention
(co-attention / fusion units), an optional position bias (T5) and an optional list that
collects attention maps. It returns the new stream tensor. A replacement module (a skip
adapter, an identity) only has to honour that signature; it may ignore ``ctx``.

Streams and state
-----------------
``embed`` returns a :class:`State`: a dict of named streams (``"joint"`` for single-stream
models, ``"text"``/``"vision"`` for two-stream ones, ``"enc"``/``"dec"`` for T5) with their
masks. Each unit is described by a :class:`UnitSpec` naming the stream it updates and,
for fusion units, the stream it attends to. Co-attention (METER) layers at depth i read the
*other* stream as it was after depth i-1, even though the units run in the order
``FL0, FV0, FL1, ...``: the state keeps that snapshot explicitly in ``State.snapshots``
(see :meth:`Backbone._context_for`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

MODALITIES = ("vision", "text", "fusion", "joint")


class UnknownNameError(KeyError):
    """A name (preset, unit, profile, key, ...) that is not one of the valid ones.

    The message always lists the valid names, so the user can fix the call at once.
    """

    def __init__(self, kind: str, name: Any, valid: Iterable[Any]):
        self.kind, self.name, self.valid = kind, name, list(valid)
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(map(str, self.valid))}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


@dataclass(frozen=True)
class UnitSpec:
    """Static description of one unit.

    name:     the paper's name (``En3``, ``LEn0``, ``FV2``, ``Enc5``, ``Stage4``, ...)
    modality: ``vision`` | ``text`` | ``fusion`` | ``joint``
    stream:   the state stream the unit reads and overwrites
    context:  for fusion / decoder units, the stream attended to by cross-attention
    depth:    co-attention depth; units that share a depth read each other's *input*
              snapshot (METER), ``None`` for ordinary sequential units
    """

    name: str
    modality: str
    stream: str
    context: str | None = None
    depth: int | None = None

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise UnknownNameError("modality", self.modality, MODALITIES)


@dataclass
class Unit:
    """A unit as methods see it: name, modality tag and the live module."""

    name: str
    modality: str
    module: nn.Module


@dataclass
class UnitContext:
    """What a unit module receives beside its input stream."""

    mask: torch.Tensor | None = None  # (B, N) 1 = attend, 0 = padding
    context: torch.Tensor | None = None  # (B, M, Dc) stream attended to by cross-attention
    context_mask: torch.Tensor | None = None  # (B, M)
    position_bias: torch.Tensor | None = None  # T5 relative position bias (B|1, H, N, N)
    attentions: list | None = None  # if a list, attention layers append their maps here
    extra: dict = field(default_factory=dict)


@dataclass
class State:
    """Everything that flows between units.

    streams:   name -> (B, N, D) tensor, updated in place by ``run_units``
    masks:     name -> (B, N) attention mask of that stream (1 = keep)
    snapshots: stream values frozen at the start of a co-attention depth
    extra:     backbone-specific values (e.g. T5's position biases)
    """

    streams: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    snapshots: dict[str, torch.Tensor] = field(default_factory=dict)
    depth: int | None = None
    extra: dict = field(default_factory=dict)

    def copy(self) -> "State":
        """A shallow copy (tensors are shared, dicts are not)."""
        return dataclasses.replace(
            self,
            streams=dict(self.streams),
            masks=dict(self.masks),
            snapshots=dict(self.snapshots),
            extra=dict(self.extra),
        )

    def detach(self) -> "State":
        """A copy whose tensors are cut from the autograd graph."""
        out = self.copy()
        out.streams = {k: v.detach() for k, v in out.streams.items()}
        out.snapshots = {k: v.detach() for k, v in out.snapshots.items()}
        return out


@dataclass
class BackboneOutput:
    """What ``Backbone.forward`` returns.

    pooled:       (B, D) summary vector the task heads read
    sequences:    stream name -> final (B, N, D) sequence (after the final norm, if any)
    masks:        stream name -> (B, N) mask
    unit_outputs: unit name -> that unit's output stream (only with ``output_units=True``)
    attentions:   unit name -> list of attention-probability tensors (B, H, N, M) the unit
                  produced, self-attention first (only with ``output_attentions=True``)
    """

    pooled: torch.Tensor
    sequences: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    unit_outputs: dict[str, torch.Tensor] | None = None
    attentions: dict[str, list] | None = None


class Backbone(nn.Module):
    """Base class of every vlkit backbone.

    Subclasses build their unit modules, call :meth:`_register_units` once with the specs in
    execution order, and implement :meth:`embed` (inputs -> :class:`State`) and
    :meth:`finalize` (final :class:`State` -> :class:`BackboneOutput` without the optional
    fields). They also implement :meth:`dummy_inputs`. Everything else -- lookup,
    replacement, slicing, recording -- lives here, once.
    """

    preset: str = "?"

    def __init__(self):
        super().__init__()
        self._specs: list[UnitSpec] = []
        self.blocks = nn.ModuleDict()

    # ------------------------------------------------------------------ registration
    def _register_units(self, specs: Sequence[UnitSpec], modules: Sequence[nn.Module]) -> None:
        if len(specs) != len(modules):
            raise ValueError(f"{len(specs)} specs for {len(modules)} modules")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate unit names in {names}")
        self._specs = list(specs)
        self.blocks = nn.ModuleDict(zip(names, modules))

    # ------------------------------------------------------------------ lookup
    @property
    def specs(self) -> list[UnitSpec]:
        return list(self._specs)

    @property
    def unit_names(self) -> list[str]:
        return [s.name for s in self._specs]

    @property
    def units(self) -> list[Unit]:
        """Ordered list of :class:`Unit` in execution order."""
        return [Unit(s.name, s.modality, self.blocks[s.name]) for s in self._specs]

    def spec(self, name: str) -> UnitSpec:
        return self._specs[self.index(name)]

    def unit(self, name: str) -> nn.Module:
        """The module currently serving as unit ``name``."""
        return self.blocks[self._specs[self.index(name)].name]

    def units_of(self, *modalities: str) -> list[str]:
        """Names of the units whose modality is one of ``modalities``."""
        for m in modalities:
            if m not in MODALITIES:
                raise UnknownNameError("modality", m, MODALITIES)
        return [s.name for s in self._specs if s.modality in modalities]

    def index(self, key: int | str | None, *, default: int | None = None) -> int:
        """Position of a unit given its name or an int (negative ints count from the end).

        ``None`` gives ``default``. An int may equal ``len(units)`` (a slice end).
        """
        if key is None:
            if default is None:
                raise ValueError("a unit index is required")
            return default
        n = len(self._specs)
        if isinstance(key, bool):
            raise TypeError("unit index must be an int or a unit name, not bool")
        if isinstance(key, int):
            i = key + n if key < 0 else key
            if not 0 <= i <= n:
                raise IndexError(f"unit index {key} out of range for {n} units")
            return i
        names = self.unit_names
        if key not in names:
            raise UnknownNameError("unit", key, names)
        return names.index(key)

    def replace_unit(self, name: str, module: nn.Module) -> nn.Module:
        """Put ``module`` in place of unit ``name``; return the module it replaces."""
        key = self._specs[self.index(name)].name
        old = self.blocks[key]
        self.blocks[key] = module
        return old

    # ------------------------------------------------------------------ running
    def embed(self, **inputs) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self, state: State) -> BackboneOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def dummy_inputs(self, batch_size: int = 1) -> dict:  # pragma: no cover - abstract
        """Inputs at the preset's paper size (random ids / pixels, seeded)."""
        raise NotImplementedError

    def _context_for(self, spec: UnitSpec, state: State) -> UnitContext:
        ctx = UnitContext(mask=state.masks.get(spec.stream), position_bias=state.extra.get(f"bias:{spec.stream}"))
        if spec.context is not None:
            # Co-attention: units of one depth see the other stream as it was *before* the depth.
            src = state.snapshots if spec.depth is not None else state.streams
            ctx.context = src.get(spec.context, state.streams.get(spec.context))
            ctx.context_mask = state.masks.get(spec.context)
        return ctx

    def run_unit(self, i: int, state: State, attentions: list | None = None) -> torch.Tensor:
        """Run unit ``i`` on ``state`` (updating it) and return the unit's output."""
        spec = self._specs[i]
        if spec.depth is not None and state.depth != spec.depth:
            state.snapshots = dict(state.streams)
            state.depth = spec.depth
        ctx = self._context_for(spec, state)
        ctx.attentions = attentions
        out = self.blocks[spec.name](state.streams[spec.stream], ctx)
        state.streams[spec.stream] = out
        self._after_unit(i, state)
        return out

    def _after_unit(self, i: int, state: State) -> None:
        """Hook for backbones that transform a stream between units (e.g. T5's encoder norm)."""

    def run_units(
        self,
        state: State,
        start: int | str | None = 0,
        stop: int | str | None = None,
        *,
        record: dict | None = None,
        attentions: dict | None = None,
    ) -> State:
        """Run ``units[start:stop]`` (Python slice semantics; ints or unit names) on a copy
        of ``state`` and return the new state.

        ``record``: if a dict, each unit's output is stored in it under the unit's name.
        ``attentions``: if a dict, each unit's attention maps are stored under its name.
        """
        n = len(self._specs)
        i0, i1 = self.index(start, default=0), self.index(stop, default=n)
        state = state.copy()
        for i in range(i0, i1):
            sink = [] if attentions is not None else None
            out = self.run_unit(i, state, sink)
            name = self._specs[i].name
            if record is not None:
                record[name] = out
            if attentions is not None:
                attentions[name] = sink
        return state

    def forward(self, output_units: bool = False, output_attentions: bool = False, **inputs) -> BackboneOutput:
        state = self.embed(**inputs)
        record = {} if output_units else None
        attns = {} if output_attentions else None
        state = self.run_units(state, 0, None, record=record, attentions=attns)
        out = self.finalize(state)
        out.unit_outputs, out.attentions = record, attns
        return out

    # ------------------------------------------------------------------ description
    def describe(self) -> list[dict]:
        """One row per unit: name, modality, stream, parameter count, module class."""
        return [
            {
                "unit": s.name,
                "modality": s.modality,
                "stream": s.stream,
                "params": sum(p.numel() for p in self.blocks[s.name].parameters()),
                "module": type(self.blocks[s.name]).__name__,
            }
            for s in self._specs
        ]
