"""The frozen prefix of memory-efficient transfer (SHERL, LST, UniPT) and its on-disk cache.

Memory-efficient transfer learning ("METL": LST, Sung et al. NeurIPS 2022; UniPT, Diao et al.
CVPR 2024; SHERL, Diao et al. ECCV 2024) never back-propagates through (most of) the
pre-trained backbone: a **frozen prefix** ``embed + units[0:stop]`` runs once per batch and
only the outputs the method reads are kept. This module holds what the three methods share:

* :func:`frozen_prefix` -- the one place the prefix runs: ``backbone.embed`` and
  ``backbone.run_units(state, 0, stop, record=...)`` under ``torch.no_grad()`` with the
  backbone in eval mode. So the prefix builds **no autograd graph** by construction (its
  outputs have ``requires_grad=False`` and ``grad_fn=None``; autograd saves no tensor for it),
  whatever the caller's grad mode. ``torch.inference_mode`` would not do: the methods' trainable
  down-projections must save those outputs for their weight gradients, which inference tensors
  forbid.
* :class:`FrozenPrefixModel` -- the base of the three wrappers: frozen backbone (every
  parameter ``requires_grad=False``, always in eval mode, even under ``model.train()``), a
  ``prefix(**inputs) -> (state, record)`` and a ``from_prefix(state, record) ->
  BackboneOutput``; ``forward(**inputs)`` is ``from_prefix(*prefix(**inputs))``.
* :class:`PrefixCache` -- beyond the papers: the prefix is frozen and sees no augmentation
  (eval mode, no dropout), so its outputs are a fixed function of the inputs and can be
  computed **once per dataset** and re-read every epoch. The cache stores, at full width (the
  methods' down-projections train on them), exactly what ``from_prefix`` reads -- the
  :class:`~vlkit.models.protocol.State` after the prefix and the recorded unit outputs the
  method keeps -- as memory-mapped ``.npy`` files in one directory, written to a temporary
  directory and renamed into place (a crash leaves nothing half-written).

Size: per example, the kept features times tokens times width times 4 bytes (fp32). SHERL on
bert-base at length 128 keeps the outputs of ``En0..En10`` (11 x 128 x 768 x 4 B) plus the
mask: 4.33 MB per example (``En10``'s output is also the state's stream; stored once). A build
that would exceed ``max_bytes`` (8 GiB by default) stops before writing anything and asks for a
named subset (``subset="train[:1000]"`` with the matching inputs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from vlkit.models.protocol import Backbone, BackboneOutput, State
from vlkit.seeding import seeded  # noqa: F401  (re-exported for the methods)

GIB = 2**30
DEFAULT_MAX_BYTES = 8 * GIB
EMBED = "embed:"

__all__ = ["EMBED", "embed_key", "frozen_prefix", "Probe", "probe", "FrozenPrefixModel", "PrefixCache",
           "seeded", "check_reduction"]


def embed_key(stream: str) -> str:
    """Record key of the embedded (pre-unit) value of ``stream``: ``"embed:<stream>"``."""
    return EMBED + stream




def check_reduction(reduction, width: int, what: str = "width") -> int:
    """``width // reduction`` or a ``ValueError`` naming both (a factor must divide the width)."""
    if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
        raise ValueError(f"reduction factor must be a positive int, got {reduction!r}")
    if width % reduction:
        raise ValueError(f"reduction factor {reduction} does not divide the {what} {width}")
    return width // reduction


class _Keep(dict):
    """A ``record`` dict that stores only the keys in ``keys`` (all if ``None``), so unit
    outputs the method never reads are freed as soon as the next unit has run."""

    def __init__(self, keys: Iterable[str] | None):
        super().__init__()
        self._keys = None if keys is None else frozenset(keys)

    def __setitem__(self, key, value):
        if self._keys is None or key in self._keys:
            super().__setitem__(key, value)


def frozen_prefix(backbone: Backbone, stop: int, inputs: Mapping, keep: Iterable[str] | None = None
                  ) -> tuple[State, dict[str, torch.Tensor]]:
    """``embed(**inputs)`` then ``run_units(state, 0, stop)`` with **no autograd graph**.

    Returns the state after ``units[0:stop]`` and a record ``{key: tensor}`` holding each
    unit's output under its name and each embedded stream under :func:`embed_key` -- only the
    keys in ``keep`` (all when ``None``). Runs under ``torch.no_grad()``; the backbone must be
    in eval mode (the prefix sees no dropout, which is what makes it cacheable).
    """
    if backbone.training:
        raise RuntimeError("the frozen prefix runs in eval mode (no dropout); call backbone.eval() first")
    with torch.no_grad():
        state = backbone.embed(**inputs)
        record = _Keep(keep)
        for name, x in state.streams.items():
            record[embed_key(name)] = x
        state = backbone.run_units(state, 0, stop, record=record)
    return state, dict(record)


@dataclass
class Probe:
    """Shapes seen on one dummy example (batch 1): what the wrappers size their modules by.

    embed:   stream -> shape of the embedded stream
    units:   unit name -> shape of its output
    at_stop: stream -> shape after ``units[0:stop]``
    final:   stream -> shape after all units
    extra:   key -> shape of each tensor in ``State.extra`` after embedding (e.g. T5's biases)
    """

    embed: dict[str, tuple]
    units: dict[str, tuple]
    at_stop: dict[str, tuple]
    final: dict[str, tuple]
    extra: dict[str, tuple]


def probe(backbone: Backbone, stop: int) -> Probe:
    """Run ``backbone.dummy_inputs(1)`` once without a graph and report the shapes."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            state = backbone.embed(**backbone.dummy_inputs(1))
            record: dict = {}
            mid = backbone.run_units(state, 0, stop, record=record)
            end = backbone.run_units(mid, stop, None, record=record)
    finally:
        backbone.train(was_training)
    shapes = lambda d: {k: tuple(v.shape) for k, v in d.items() if isinstance(v, torch.Tensor)}  # noqa: E731
    return Probe(embed=shapes(state.streams), units=shapes(record), at_stop=shapes(mid.streams),
                 final=shapes(end.streams), extra=shapes(state.extra))


class FrozenPrefixModel(nn.Module):
    """Base of the METL wrappers: a frozen backbone whose ``units[0:stop]`` run without a graph.

    * every backbone parameter is frozen (``requires_grad=False``) and the backbone stays in
      eval mode whatever ``train()`` is called with (subclasses may put their late units back
      into train mode, see :meth:`_late_modules`);
    * ``prefix(**inputs)`` -> ``(state, record)`` via :func:`frozen_prefix`, keeping the record
      keys in ``self.keep``;
    * ``from_prefix(state, record)`` -> :class:`~vlkit.models.protocol.BackboneOutput` is the
      trainable part (subclasses implement it); a :class:`PrefixCache` feeds it cached values;
    * ``forward(**inputs) = from_prefix(*prefix(**inputs))``.
    """

    def __init__(self, backbone: Backbone, stop: int, keep: Iterable[str] | None):
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise TypeError(f"expected a vlkit Backbone (vlkit.models.build(...)), got {type(backbone).__name__}")
        self.backbone = backbone
        self.stop = int(stop)
        self.keep = None if keep is None else tuple(dict.fromkeys(keep))
        backbone.requires_grad_(False)
        self.train(self.training)

    def _late_modules(self) -> Sequence[nn.Module]:
        """Backbone modules that follow the wrapper's train/eval mode (default: none)."""
        return ()

    def train(self, mode: bool = True) -> "FrozenPrefixModel":
        super().train(mode)
        self.backbone.eval()
        for m in self._late_modules():
            m.train(mode)
        return self

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of every trainable parameter (the method's own, never the backbone's)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def prefix(self, **inputs) -> tuple[State, dict[str, torch.Tensor]]:
        """The frozen prefix (no graph): ``(state after units[0:stop], kept record)``."""
        return frozen_prefix(self.backbone, self.stop, inputs, self.keep)

    def from_prefix(self, state: State, record: Mapping[str, torch.Tensor]) -> BackboneOutput:  # pragma: no cover
        raise NotImplementedError

    def forward(self, **inputs) -> BackboneOutput:
        return self.from_prefix(*self.prefix(**inputs))


# ------------------------------------------------------------------------------------ cache
_FORMAT = 1


def _tensor_items(state: State, record: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, object]], int | None]:
    """Flatten ``(state, record)`` into ``[(name, value)]`` (tensors, ``None`` or JSON scalars)."""
    items: list[tuple[str, object]] = [(f"record/{k}", v) for k, v in record.items()]
    for field in ("streams", "masks", "snapshots", "extra"):
        for k, v in getattr(state, field).items():
            items.append((f"{field}/{k}", v))
    return items, state.depth


def _unflatten(values: Mapping[str, object], depth: int | None) -> tuple[State, dict]:
    fields: dict[str, dict] = {"streams": {}, "masks": {}, "snapshots": {}, "extra": {}, "record": {}}
    for name, v in values.items():
        field, key = name.split("/", 1)
        fields[field][key] = v
    record = fields.pop("record")
    return State(depth=depth, **fields), record


def _view_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _np_dtype(t: torch.Tensor) -> tuple[torch.Tensor, str]:
    """(a numpy-compatible view of ``t``, torch dtype name); bfloat16 is stored bit-wise as int16."""
    name = str(t.dtype).removeprefix("torch.")
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t), name


def _from_np(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _digest(model: FrozenPrefixModel, inputs: Mapping[str, torch.Tensor], subset: str) -> str:
    """Fingerprint of what the cache depends on: the wrapper's prefix (class, stop, kept keys),
    every backbone tensor and the inputs."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([type(model).__name__, model.stop, list(model.keep or []), subset]).encode())
    for group in (model.backbone.state_dict(), dict(sorted(inputs.items()))):
        for k, t in group.items():
            if not isinstance(t, torch.Tensor):
                h.update(f"{k}={t!r}".encode())
                continue
            b = t.detach().to("cpu").contiguous().reshape(-1)
            h.update(f"{k}:{b.dtype}:{tuple(t.shape)}".encode())
            h.update(b.view(torch.uint8).numpy().tobytes() if b.numel() else b"")
    return h.hexdigest()


class PrefixCache:
    """Frozen-prefix outputs of a dataset, computed once, memory-mapped from disk.

    ``PrefixCache(model, path)`` where ``model`` is a :class:`FrozenPrefixModel` (SHERL, LST or
    UniPT wrapper) -- it knows its prefix (``model.stop``) and which outputs it reads
    (``model.keep``), so only those are stored. Then::

        cache = PrefixCache(model, "cache/sherl-bert").build(inputs, batch_size=32, subset="train")
        for idx, (state, record) in cache.batches(32, shuffle=True, seed=epoch):
            out = model.from_prefix(state, record)          # == model(**inputs[idx])
            loss = criterion(head(out.pooled), labels[idx])

    ``inputs``: the whole (sub)set as a dict of tensors with the example index first (e.g.
    ``input_ids``, ``attention_mask`` padded to one length). ``build`` reuses an existing cache
    at ``path`` whose fingerprint (backbone weights, inputs, the wrapper's prefix, ``subset``)
    matches, and refuses one that does not.

    Layout of ``path`` (a directory): ``meta.json`` (format, fingerprint, subset, example
    count, bytes per example, one entry per state / record tensor) and one ``.npy`` per tensor:
    per-example tensors (leading dim = batch) as ``(num_examples, ...)`` arrays read through
    ``np.load(mmap_mode="r")``; batch-independent tensors (e.g. T5's position biases) once.
    Tensors that are views of the same storage (a unit's output that is also the state's
    stream) are stored once.
    """

    def __init__(self, model: FrozenPrefixModel, path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES):
        if not isinstance(model, FrozenPrefixModel):
            raise TypeError(f"PrefixCache needs a SHERL / LST / UniPT wrapper (a FrozenPrefixModel), "
                            f"got {type(model).__name__}")
        self.model = model
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.meta: dict | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self._shared: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------- properties
    def _need_meta(self) -> dict:
        if self.meta is None:
            raise RuntimeError(f"cache {self.path} is not built yet; call build(inputs) first")
        return self.meta

    @property
    def num_examples(self) -> int:
        return self._need_meta()["num_examples"]

    @property
    def bytes_per_example(self) -> int:
        return self._need_meta()["bytes_per_example"]

    @property
    def nbytes(self) -> int:
        return self.num_examples * self.bytes_per_example

    @property
    def subset(self) -> str:
        return self._need_meta()["subset"]

    def __len__(self) -> int:
        return self.num_examples

    # -------------------------------------------------------------- build
    def build(self, inputs: Mapping[str, torch.Tensor], batch_size: int = 32, subset: str = "all") -> "PrefixCache":
        """Compute the prefix of every example of ``inputs`` (in order) into ``path``; reuse a
        matching existing cache. ``subset`` names the examples (stored, and part of the fingerprint)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
        if not isinstance(subset, str) or not subset:
            raise ValueError(f"subset must be a non-empty name, got {subset!r}")
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ValueError("inputs must be a dict of tensors with the example index first")
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        n = next(iter(sizes.values()))
        if len(set(sizes.values())) != 1:
            raise ValueError(f"inputs disagree on the number of examples: {sizes}")
        if n < 2:
            raise ValueError(f"a cache needs at least 2 examples, got {n}")
        digest = _digest(self.model, tensors, subset)
        if self.path.exists():
            self._open()
            if self.meta.get("fingerprint") != digest:
                raise ValueError(f"the cache at {self.path} was built for another backbone, inputs, prefix or "
                                 f"subset (fingerprint {self.meta.get('fingerprint')} != {digest}); delete it or "
                                 f"choose another path")
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-"))
        try:
            self._write(tmp, tensors, n, batch_size, subset, digest)
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._open()
        return self

    def _write(self, tmp: Path, tensors: dict, n: int, batch_size: int, subset: str, digest: str) -> None:
        arrays: dict[str, np.ndarray] = {}
        entries: list[dict] = []
        device = next(self.model.backbone.parameters()).device
        shared_first: dict[str, torch.Tensor] = {}
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            state, record = self.model.prefix(**{k: v[start:stop].to(device) for k, v in tensors.items()})
            items, depth = _tensor_items(state, record)
            b = stop - start
            if start == 0:
                entries = self._layout(items, depth, b)
                bpe = sum(e["bytes"] for e in entries if e["kind"] == "example")
                if n * bpe > self.max_bytes:
                    raise ValueError(
                        f"the prefix cache would need {n * bpe / GIB:.2f} GiB ({n} examples x "
                        f"{bpe / 1e6:.2f} MB), over the limit of {self.max_bytes / GIB:.2f} GiB: cache a named "
                        f"subset instead (pass fewer inputs and subset='<name>[:N]') or raise max_bytes")
                for e in entries:
                    if e["kind"] == "example":
                        arrays[e["name"]] = np.lib.format.open_memmap(
                            tmp / e["file"], mode="w+", dtype=np.dtype(e["np_dtype"]), shape=(n, *e["shape"]))
            values = dict(items)
            for e in entries:
                v = values.get(e["name"])
                if e["kind"] == "example":
                    if not isinstance(v, torch.Tensor) or v.shape[0] != b or tuple(v.shape[1:]) != tuple(e["shape"]):
                        raise ValueError(f"{e['name']}: shape {tuple(getattr(v, 'shape', ()))} in examples "
                                         f"{start}:{stop} differs from the first batch's (b, *{e['shape']})")
                    arrays[e["name"]][start:stop] = _np_dtype(v.detach().cpu())[0].numpy()
                elif e["kind"] == "shared":
                    if start == 0:
                        shared_first[e["name"]] = v.detach().cpu()
                        a, _ = _np_dtype(shared_first[e["name"]])
                        np.save(tmp / e["file"], a.numpy())
                    elif not (isinstance(v, torch.Tensor) and v.shape == shared_first[e["name"]].shape
                              and torch.equal(v.detach().cpu(), shared_first[e["name"]])):
                        raise ValueError(f"{e['name']} is batch-independent in the first batch but differs in "
                                         f"examples {start}:{stop}; it cannot be cached once")
        for a in arrays.values():
            a.flush()
        meta = {"format": _FORMAT, "fingerprint": digest, "subset": subset, "num_examples": n,
                "bytes_per_example": sum(e["bytes"] for e in entries if e["kind"] == "example"),
                "stop": self.model.stop, "model": type(self.model).__name__, "depth": depth, "entries": entries}
        with open(tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        del arrays

    @staticmethod
    def _layout(items: list[tuple[str, object]], depth, b: int) -> list[dict]:
        entries, seen = [], {}
        for i, (name, v) in enumerate(items):
            e: dict = {"name": name}
            if v is None:
                e["kind"] = "none"
            elif not isinstance(v, torch.Tensor):
                try:
                    json.dumps(v)
                except TypeError as err:
                    raise TypeError(f"cannot cache {name} of type {type(v).__name__}") from err
                e.update(kind="value", value=v)
            elif _view_key(v) in seen:
                e.update(kind="alias", of=seen[_view_key(v)])
            else:
                seen[_view_key(v)] = name
                a, dtype = _np_dtype(v)
                per_example = v.dim() >= 1 and v.shape[0] == b
                shape = list(v.shape[1:]) if per_example else list(v.shape)
                e.update(kind="example" if per_example else "shared", file=f"{i:04d}.npy", dtype=dtype,
                         np_dtype=str(torch.empty(0, dtype=a.dtype).numpy().dtype), shape=shape,
                         bytes=int(math.prod(shape)) * v.element_size() if per_example else 0)
            entries.append(e)
        return entries

    def _open(self) -> None:
        with open(self.path / "meta.json", encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != _FORMAT:
            raise ValueError(f"cache {self.path} has format {meta.get('format')}, expected {_FORMAT}")
        self.meta = meta
        self._arrays = {e["name"]: np.load(self.path / e["file"], mmap_mode="r")
                        for e in meta["entries"] if e["kind"] == "example"}
        self._shared = {e["name"]: _from_np(np.load(self.path / e["file"]), e["dtype"])
                        for e in meta["entries"] if e["kind"] == "shared"}

    # -------------------------------------------------------------- read
    def batch(self, indices: Sequence[int] | torch.Tensor, device: str | torch.device | None = None
              ) -> tuple[State, dict[str, torch.Tensor]]:
        """``(state, record)`` of the examples ``indices`` (in that order), as ``model.prefix`` gives them."""
        meta = self._need_meta()
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
        n = meta["num_examples"]
        if idx.size == 0 or idx.min() < 0 or idx.max() >= n:
            raise IndexError(f"indices must lie in [0, {n}) and not be empty; got {idx.tolist()[:8]}...")
        values: dict[str, object] = {}
        for e in meta["entries"]:
            kind, name = e["kind"], e["name"]
            if kind == "example":
                values[name] = _from_np(self._arrays[name][idx], e["dtype"])
            elif kind == "shared":
                values[name] = self._shared[name]
            elif kind == "value":
                values[name] = e["value"]
            elif kind == "none":
                values[name] = None
        for e in meta["entries"]:
            if e["kind"] == "alias":
                values[e["name"]] = values[e["of"]]
        if device is not None:
            moved: dict = {}
            values = {k: (moved.setdefault(id(v), v.to(device)) if isinstance(v, torch.Tensor) else v)
                      for k, v in values.items()}
        return _unflatten(values, meta["depth"])

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                device: str | torch.device | None = None) -> Iterator[tuple[torch.Tensor, tuple[State, dict]]]:
        """``(indices, (state, record))`` over the whole cache; a seeded permutation if ``shuffle``."""
        n = self.num_examples
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            yield idx, self.batch(idx, device)
