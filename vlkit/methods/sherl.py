"""SHERL on any protocol backbone (Diao et al., "SHERL: Synthesizing High Accuracy and
Efficient Memory for Resource-Limited Transfer Learning", ECCV 2024, Sec. 3, Fig. 2).

SHERL freezes the whole backbone and splits a forward pass in two routes:

* **early route** -- ``embed`` and ``units[0:N-k]`` run frozen, in eval mode and with **no
  autograd graph** (:func:`vlkit.methods.feature_cache.frozen_prefix`: ``run_units`` under
  ``torch.no_grad()``); their outputs ("shallow features") are kept;
* the **Multi-Tiered Sensing Adapter** (:class:`vlkit.nn.mtsa.MTSA`, Eq. 1-3) merges the
  shallow features with redundancy-normalised linear attention into one ``(B, K, D)`` tensor
  that *replaces* the input of unit ``N-k`` (at init exactly: its output gate ``tanh(α/T)``
  starts at 0);
* **late route** -- the last ``k`` pre-trained units (default ``k = 1``: only the last one)
  run on it *with* a graph; their weights stay frozen, so autograd stores only their
  activations and gradients flow through them into the MTSA; then ``finalize`` (pooler /
  final norm) and the caller's task head.

Only the MTSA trains. The memory this saves: full fine-tuning stores the activations of all
N units (plus weight gradients and optimiser state); SHERL stores the N-k kept features (no
graph), the MTSA's small activations (width ``D / reduction``) and one unit's activations.

Which features, which stream
----------------------------
The *target stream* is the stream of the last unit (``"text"`` for BERT / MiniLM, ``"joint"``
for ViLT, ``"dec"`` for T5, ``"vision"`` for METER, whose last unit is ``FV{L-1}``). The shallow
features are the outputs of the prefix units that write the target stream with the shape of
its value after the prefix (``features="units"``, default, as the MTSA docstring describes), or
the same preceded by the embedded stream (``features="embed+units"``, as the official code's
``all_hidden_features = [embeddings, ...]``). The guide of the aggregation (Eq. 2) is the last
of them, the output of unit ``N-k-1``.

Multi-layer insertion (``insert_last=k``): one MTSA per late unit; the MTSA in front of late
unit ``N-k+j`` merges the shallow features *and* the outputs of the late units before it (so
each late unit gets "everything below it", merged; ``x_last`` is its usual input).

Encoder-decoder and fusion backbones (``regulate_context``)
------------------------------------------------------------
When the last unit cross-attends to another stream (T5's decoder units read the encoder;
METER / X-VLM fusion units read the other modality), that *context* is a frozen feature as
well. ``regulate_context=True`` (the default for such backbones) gives it a second MTSA over
the context stream's unit outputs (``norm=True``: a LayerNorm after its up-projection), whose
output replaces the context the late units read. This is the official T5 design
(``Paranioar/SHERL``, ``Ladder-Side-Tuning/seq2seq/third_party/models/t5/modeling_side_t5.py``:
``T5StackEnc`` merges the encoder layers with an MTSA and normalises the result with a fresh
``final_side_layer_norm``; ``T5StackDec`` runs decoder layers ``0..L-2`` frozen -- reading the
frozen encoder output -- merges them with a second MTSA and feeds the **last decoder layer**,
which cross-attends to the merged encoder output). So for T5 the whole encoder and decoder
blocks ``0..L-2`` run without a graph; the only stored activations are the two MTSAs' and one
decoder block's: the paper reports 2.9 GB vs 17.6 GB (full fine-tuning) on T5-base. The
official LayerNorm for the merged encoder output is an RMS norm initialised to ones; ours is the
MTSA's LayerNorm option (also identity-scaled at init). ``regulate_context=False`` keeps the
frozen context (cheaper: no encoder MTSA; the decoder alone is regulated).

For co-attention units (METER ``FV{i}`` reads the text stream *as it was before* ``FL{i}``), the
context features exclude the units of the late unit's own depth, and the regulated context
replaces the depth snapshot the unit reads.

Late regulation ablation (``late_unit=False``): the merged features go straight to ``finalize``
(pooler / final norm) and the task head; the last pre-trained unit is not run at all. The
prefix, the shallow features and the MTSA are those of the default (``insert_last=1``), so
the only difference is the late route through the frozen last unit. Only for ``insert_last=1``
and without a regulated context (there is no late unit to read it).

Convolutional backbones (Sec. 3.3 "beyond Transformers", Fig. 3b)
------------------------------------------------------------------
When the target stream holds ``(B, C, H, W)`` maps (``effnet-lite0``: units ``Stage0..Stage6``,
:mod:`vlkit.models.cnn`) the shallow features differ in channels and resolution. Then
(``spatial`` mode, chosen from the probed shape, ``insert_last=1`` only):

* shallow features: the outputs of **every** prefix unit of the stream (``Stage0..Stage5``;
  with ``features="embed+units"`` the stem's output first), whatever their shape;
* each is adaptive-average-pooled to the resolution ``(H, W)`` of the **input of the
  regulating unit** (the stream after the prefix: ``Stage5``'s output) and its positions
  flattened row-major into ``K = H·W`` tokens ``(B, K, C_i)`` (:func:`pool_tokens`; the pool
  is the identity for a feature already at ``(H, W)``). ``(H, W)`` is read from each batch, so
  one model serves every input size (64 px -> 2x2, 224 px -> 7x7);
* one MTSA with **per-layer input widths** (``MTSA(in_dims=[C_0, ..])``: each tier
  down-projects from its stage's own channel count) and output width ``C`` of the regulating
  unit's input; ``x_last`` is that input as tokens; the merged tokens are reshaped back to
  ``(B, C, H, W)`` (:func:`from_tokens`, the inverse of :func:`to_tokens`);
* late route: the last unit (``Stage6``, frozen, with a graph), then ``finalize``. For
  EfficientNet-Lite0 ``finalize`` holds the head conv (1x1 to 1280 channels + BN + ReLU6) and
  the global average pool: the head conv is *not* a unit (it is Tan & Le's Table 1 stage 9,
  not an MBConv stage), so the regulating unit is the last MBConv stage and the frozen head
  conv runs after it on the late route (with a graph, like the Transformers' pooler).

Departures (our choices; the paper states the CNN case only in outline): average pooling
(not strided convolutions or max pooling) to the regulating unit's *input* resolution; every
MBConv stage as one shallow feature (blocks inside a stage are not separate features); the
guide is the last shallow feature, as for Transformers. Not supported for spatial streams:
``late_unit=False`` (the merged map has the regulating unit's input channels, not the width
``finalize`` expects), ``insert_last > 1``, a regulated context (a CNN has one stream) and
``late_dropout=True`` (it would put the late stage's BatchNorm into training mode).

Dropout: the backbone always runs in eval mode (the frozen prefix must, to be cacheable);
``late_dropout=True`` lets the late units follow the wrapper's train/eval mode as in the
official code (which trains with the backbone's dropout on).

Trainable parameters: the MTSA(s) only -- :func:`vlkit.nn.mtsa.mtsa_num_parameters` per MTSA.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.models.protocol import Backbone, BackboneOutput, State, UnitSpec, UnknownNameError
from vlkit.nn.mtsa import AGGREGATORS, MTSA, SCORES

from .feature_cache import FrozenPrefixModel, Probe, embed_key, probe, seeded

__all__ = ["SHERL", "apply_sherl", "FEATURES", "to_tokens", "from_tokens", "pool_tokens"]

FEATURES = ("units", "embed+units")


def _feature_keys(specs: Sequence[UnitSpec], stop: int, stream: str, shape: tuple, info: Probe, features: str,
                  exclude_depth: int | None = None) -> list[str]:
    """Record keys of the shallow features of ``stream``: embedded stream (if asked) and the
    outputs of ``specs[:stop]`` writing ``stream`` with shape ``shape``, in backbone order."""
    keys = []
    if features == "embed+units" and info.embed.get(stream) == shape:
        keys.append(embed_key(stream))
    for s in specs[:stop]:
        same_depth = exclude_depth is not None and s.depth == exclude_depth
        if s.stream == stream and info.units.get(s.name) == shape and not same_depth:
            keys.append(s.name)
    return keys


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` maps -> ``(B, H·W, C)`` tokens, positions in row-major order."""
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) maps, got shape {tuple(x.shape)}")
    return x.flatten(2).transpose(1, 2)


def from_tokens(tokens: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, H·W, C)`` tokens -> ``(B, C, H, W)`` maps (the inverse of :func:`to_tokens`)."""
    h, w = (int(v) for v in size)
    if tokens.dim() != 3 or tokens.shape[1] != h * w:
        raise ValueError(f"expected (B, {h * w}, C) tokens for a {h}x{w} map, got shape {tuple(tokens.shape)}")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def pool_tokens(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A ``(B, C, H', W')`` map adaptive-average-pooled to ``size = (H, W)``, as ``(B, H·W, C)``
    tokens (:func:`to_tokens`); the identity (before flattening) when ``(H', W') == (H, W)``."""
    h, w = (int(v) for v in size)
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) maps, got shape {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (h, w):
        x = F.adaptive_avg_pool2d(x, (h, w))
    return to_tokens(x)


def _spatial_keys(specs: Sequence[UnitSpec], stop: int, stream: str, info: Probe, features: str) -> list[str]:
    """Record keys of the shallow features of a map stream (spatial mode): the embedded stream
    (if asked) and every output of ``specs[:stop]`` writing ``stream``, in backbone order."""
    keys = [embed_key(stream)] if features == "embed+units" and len(info.embed.get(stream, ())) == 4 else []
    return keys + [s.name for s in specs[:stop] if s.stream == stream and len(info.units.get(s.name, ())) == 4]


class SHERL(FrozenPrefixModel):
    """A backbone trained with SHERL (see the module docstring); build it with :func:`apply_sherl`.

    Attributes: ``backbone`` (frozen), ``stop`` (= N - k, first late unit), ``stream`` (target
    stream), ``feature_keys`` (record keys merged by ``mtsa[0]``), ``mtsa`` (one MTSA per late
    unit), ``context`` / ``context_keys`` / ``context_mtsa`` (``None`` unless the context is
    regulated), ``spatial`` (map stream: the CNN case of the module docstring).
    ``forward(**inputs)`` returns the backbone's :class:`BackboneOutput`.
    """

    def __init__(self, backbone: Backbone, *, reduction: int = 8, aggregator: str = "mtsa", score: str = "inner",
                 insert_last: int = 1, features: str = "units", regulate_context: bool | None = None,
                 norm: bool = False, late_dropout: bool = False, seed: int = 0, late_unit: bool = True):
        if not isinstance(backbone, Backbone):
            raise TypeError(f"SHERL needs a vlkit Backbone (vlkit.models.build(...)), got {type(backbone).__name__}")
        specs = backbone.specs
        n = len(specs)
        if n < 2:
            raise ValueError(f"SHERL needs a backbone with at least 2 units (a frozen prefix and a last unit); "
                             f"got {n}: {', '.join(s.name for s in specs) or '(none)'}")
        if aggregator not in AGGREGATORS:
            raise UnknownNameError("aggregator", aggregator, AGGREGATORS)
        if score not in SCORES:
            raise UnknownNameError("score", score, SCORES)
        if features not in FEATURES:
            raise UnknownNameError("feature set", features, FEATURES)
        if isinstance(insert_last, bool) or not isinstance(insert_last, int) or not 1 <= insert_last <= n - 1:
            raise ValueError(f"insert_last must be an int in [1, {n - 1}] for {n} units, got {insert_last!r}")
        if not isinstance(late_unit, bool):
            raise ValueError(f"late_unit must be True or False, got {late_unit!r}")
        if not late_unit and insert_last != 1:
            raise ValueError(f"late_unit=False (no late pre-trained unit) needs insert_last=1, got {insert_last}")
        if not late_unit and regulate_context:
            raise ValueError("late_unit=False runs no late unit, so there is no context to regulate: "
                             "regulate_context must be None or False")
        if not late_unit:
            regulate_context = False
        stop = n - insert_last
        late = specs[stop:]
        stream = late[-1].stream
        if any(s.stream != stream for s in late):
            raise ValueError(f"the last {insert_last} units write different streams "
                             f"({', '.join(f'{s.name}:{s.stream}' for s in late)}); SHERL inserts into one stream: "
                             f"lower insert_last")
        context = late[-1].context
        if any(s.context != context or s.depth != late[0].depth for s in late[1:]):
            raise ValueError(f"the late units {', '.join(s.name for s in late)} read different contexts or depths")

        info = probe(backbone, stop)
        shape = info.at_stop[stream]
        spatial = len(shape) == 4  # (B, C, H, W) maps: a CNN (module docstring)
        if spatial:
            checks = (("insert_last > 1", insert_last != 1), ("late_unit=False", not late_unit),
                      ("regulate_context=True", bool(regulate_context)), ("late_dropout=True", bool(late_dropout)))
            unsupported = [what for what, bad in checks if bad]
            if unsupported:
                raise ValueError(f"SHERL on the map stream {stream!r} (a CNN) supports only the default late route; "
                                 f"got {', '.join(unsupported)}")
        keys = (_spatial_keys(specs, stop, stream, info, features) if spatial
                else _feature_keys(specs, stop, stream, shape, info, features))
        if len(keys) < 2:
            raise ValueError(f"SHERL needs at least 2 shallow features of stream {stream!r} before unit "
                             f"{late[0].name}; found {len(keys)} ({', '.join(keys) or 'none'}): use "
                             f"features='embed+units' or a backbone with more units")
        ctx_keys: list[str] = []
        if context is not None:
            ctx_keys = _feature_keys(specs, stop, context, info.at_stop[context], info, features,
                                     exclude_depth=late[0].depth)
        if regulate_context is None:
            regulate_context = len(ctx_keys) >= 2
        elif regulate_context and context is None:
            raise ValueError(f"regulate_context=True, but the last unit {late[-1].name} reads no other stream")
        elif regulate_context and len(ctx_keys) < 2:
            raise ValueError(f"regulate_context=True needs at least 2 features of the context stream {context!r}; "
                             f"found {ctx_keys}")

        dim = shape[1] if spatial else shape[-1]
        in_dims = None
        if spatial:  # one width per stage: the channels of each shallow feature
            in_dims = [(info.embed[stream] if k == embed_key(stream) else info.units[k])[1] for k in keys]
        with seeded(seed):  # MTSA validates reduction (must divide the width) and the rest
            mtsa = nn.ModuleList(MTSA(dim, len(keys) + j, reduction, score=score, aggregator=aggregator, norm=norm,
                                      in_dims=in_dims)
                                 for j in range(insert_last))
            ctx_mtsa = (MTSA(info.at_stop[context][-1], len(ctx_keys), reduction, score=score, aggregator=aggregator,
                             norm=True) if regulate_context else None)
        if not regulate_context:
            ctx_keys = []
        super().__init__(backbone, stop, keep=keys + ctx_keys)
        ref = next(backbone.parameters())
        self.mtsa = mtsa.to(ref.device, ref.dtype)
        self.context_mtsa = ctx_mtsa.to(ref.device, ref.dtype) if ctx_mtsa is not None else None
        self.stream, self.feature_keys = stream, keys
        self.context = context if regulate_context else None
        self.context_keys = ctx_keys
        self.late_names = [s.name for s in late]
        self.late_depth = late[0].depth
        self.late_dropout = bool(late_dropout)
        self.late_unit = late_unit
        self.spatial = spatial
        self.options = dict(reduction=reduction, aggregator=aggregator, score=score, insert_last=insert_last,
                            features=features, regulate_context=bool(regulate_context), norm=norm,
                            late_dropout=self.late_dropout, seed=seed, late_unit=late_unit)
        self.train(self.training)

    def _late_modules(self):
        if not getattr(self, "late_dropout", False) or not getattr(self, "late_unit", True):
            return ()
        return [self.backbone.unit(name) for name in self.late_names]

    def extra_repr(self) -> str:
        return (f"stream={self.stream!r}, prefix=units[0:{self.stop}], late={self.late_names}, "
                f"features={self.feature_keys}, context={self.context!r}")

    def from_prefix(self, state: State, record: Mapping[str, torch.Tensor]) -> BackboneOutput:
        """The trainable part: MTSA(s), the late units (with a graph, frozen weights), ``finalize``.

        ``state`` / ``record`` are what :meth:`prefix` returns (or a
        :class:`~vlkit.methods.feature_cache.PrefixCache` batch); neither is modified.
        """
        bb = self.backbone
        state = state.copy()
        if getattr(self, "spatial", False):
            return self._from_prefix_maps(state, record)
        feats = [record[k] for k in self.feature_keys]
        if self.context_mtsa is not None:
            # the context the late unit will read: the depth snapshot if its co-attention depth
            # is already open, else the stream itself (run_unit snapshots it then)
            src = state.snapshots if (self.late_depth is not None and state.depth == self.late_depth) else state.streams
            src[self.context] = self.context_mtsa([record[k] for k in self.context_keys], src[self.context])
        if not self.late_unit:  # ablation: the merged features are the final features
            state.streams[self.stream] = self.mtsa[0](feats, state.streams[self.stream])
            return bb.finalize(state)
        outs: list[torch.Tensor] = []
        for j, name in enumerate(self.late_names):
            state.streams[self.stream] = self.mtsa[j](feats + outs, state.streams[self.stream])
            rec: dict = {}
            state = bb.run_units(state, self.stop + j, self.stop + j + 1, record=rec)
            outs.append(rec[name])
        return bb.finalize(state)

    def _from_prefix_maps(self, state: State, record: Mapping[str, torch.Tensor]) -> BackboneOutput:
        """Spatial mode (module docstring): pool every stage to the regulating unit's input
        resolution, merge the tokens, reshape back, run the last unit and ``finalize``."""
        x = state.streams[self.stream]
        size = tuple(x.shape[-2:])
        feats = [pool_tokens(record[k], size) for k in self.feature_keys]
        state.streams[self.stream] = from_tokens(self.mtsa[0](feats, to_tokens(x)), size)
        state = self.backbone.run_units(state, self.stop, self.stop + 1)
        return self.backbone.finalize(state)


def apply_sherl(backbone: Backbone, *, reduction: int = 8, aggregator: str = "mtsa", score: str = "inner",
                insert_last: int = 1, features: str = "units", regulate_context: bool | None = None,
                norm: bool = False, late_dropout: bool = False, seed: int = 0, late_unit: bool = True) -> SHERL:
    """SHERL (Diao et al., ECCV 2024) around ``backbone``, which is frozen in place.

    Options (paper defaults):

    * ``reduction`` (8): MTSA width ``D / reduction`` (must divide ``D``; the paper's Fig. 7
      sweeps it).
    * ``aggregator`` (``"mtsa"``): Eq. 2-3; the Fig. 4 ablation: ``"maxpool"``, ``"avepool"``,
      ``"mhsa"`` (4 heads), ``"lineara"`` (no redundancy term), ``"lineara_r"`` (learnable r).
    * ``score`` (``"inner"``): the paper's inner product; ``"learned"``: the official code's.
    * ``insert_last`` (1): number of late pre-trained units fed with merged features.
    * ``features`` (``"units"``): shallow features = prefix unit outputs of the target stream;
      ``"embed+units"`` prepends the embedded stream (official code).
    * ``regulate_context`` (``None`` = yes when the last unit cross-attends to another stream
      with >= 2 features, e.g. T5's encoder): an MTSA for that context as well.
    * ``norm`` (False): LayerNorm after the MTSA's up-projection; ``late_dropout`` (False):
      dropout in the late units during training; ``seed``: MTSA initialisation.
    * ``late_unit`` (True): ``False`` is the late-regulation ablation -- the MTSA output goes
      straight to ``finalize``, the last pre-trained unit is not run (needs ``insert_last=1``).

    A backbone whose target stream holds ``(B, C, H, W)`` maps (``effnet-lite0``) is wrapped in
    the spatial mode of the module docstring (stages pooled to the last stage's input
    resolution, per-stage MTSA input widths); there only the default late route is available.

    Returns a :class:`SHERL` module: ``forward(**inputs) -> BackboneOutput``; only MTSA
    parameters are trainable. Errors: fewer than 2 units, an unknown aggregator / score /
    feature set, a reduction that does not divide the width, fewer than 2 shallow features.
    """
    return SHERL(backbone, reduction=reduction, aggregator=aggregator, score=score, insert_last=insert_last,
                 features=features, regulate_context=regulate_context, norm=norm, late_dropout=late_dropout,
                 seed=seed, late_unit=late_unit)
