"""SHERL's Multi-Tiered Sensing Adapter (MTSA) and the aggregators of its ablation.

Source: Diao et al., "SHERL: Synthesizing High Accuracy and Efficient Memory for
Resource-Limited Transfer Learning", ECCV 2024, Sec. 3.2, Eq. 1-3 and Fig. 4 (aggregation
ablation), and the authors' code (github.com/Paranioar/SHERL, ``Guidance`` /
``sherl_for_transformer``), read for understanding only.

SHERL freezes the backbone. The *early route* runs units ``0 .. N-2`` without a graph and
hands their outputs ("shallow features") to the MTSA, which merges them into one
``(B, K, D)`` tensor; the *late route* feeds that tensor through the last pre-trained unit
(the SHERL wrapper in :mod:`vlkit.methods.sherl` does the plumbing, not this module).

Two layers of API:

* pure functions for the anti-redundancy aggregation (Eq. 2-3), per token ``k``::

      S_k  = Ẽ_k Ẽ_kᵀ                      rows of E_k l2-normalised          (M, M)
      r_k  = ReLU(S_k) · 1                  redundancy of each shallow feature  (M,)
      m_k  = l1norm( ReLU(e_k E_kᵀ) / r_k )  element-wise division             (M,)
      e'_k = m_k E_k + e_k                                                      (d,)

  :func:`redundancy` (r), :func:`aggregation_weights` (m) and :func:`redundancy_aggregate`
  (e'). A feature repeated ``c`` times has ``r >= c``, so a cohort of near-duplicates shares
  roughly the weight one of them would get alone, and distinct features gain weight.
* the :class:`MTSA` module (Eq. 1-3 plus the official output form), with the ablation
  aggregators ``maxpool``, ``avepool``, ``mhsa``, ``lineara``, ``lineara_r``, ``mtsa``.

Numerical conventions (exact elsewhere; no epsilon is added to any non-degenerate entry):

* an all-zero shallow feature row has ``Ẽ = 0`` and hence ``r = 0`` (a non-zero row always has
  ``r >= 1`` from its self-similarity). Its weight is *defined* as 0 (the 0/0 limit is taken
  as 0): it carries no content and is left out of the normalisation.
* if every weight of a token is 0 (all scores ``<= 0``), ``m_k = 0`` and ``e'_k = e_k``.
* the official code instead adds ``eps = 1e-6`` to the l2 and l1 norms, which makes every
  ``m_k`` sum to slightly less than 1 and gives NaN (0/0) for an all-zero row.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlkit.models.protocol import UnknownNameError

AGGREGATORS = ("mtsa", "lineara", "lineara_r", "maxpool", "avepool", "mhsa")
SCORES = ("inner", "learned")
REDUNDANCY_MODES = ("similarity", "none")
MHSA_HEADS = 4
GATE_TEMPERATURE = 0.1


# ---------------------------------------------------------------------------------------
# Eq. 2-3: redundancy-normalised linear aggregation (pure functions)
# ---------------------------------------------------------------------------------------


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den != 0``, else 0 -- exact elsewhere, finite gradients."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def _check_pair(e: torch.Tensor, E: torch.Tensor) -> None:
    if E.dim() < 2 or e.dim() != E.dim() - 1 or e.shape[:-1] != E.shape[:-2] or e.shape[-1] != E.shape[-1]:
        raise ValueError(
            f"guide e must be (..., d) and features E (..., M, d) with the same leading dims and d; "
            f"got e {tuple(e.shape)} and E {tuple(E.shape)}"
        )


def redundancy(E: torch.Tensor) -> torch.Tensor:
    """Redundancy ``r_k = ReLU(Ẽ_k Ẽ_kᵀ) · 1`` of each shallow feature (SHERL Eq. 3).

    ``E``: ``(..., M, d)``; returns ``(..., M)``. Rows are l2-normalised exactly; an all-zero
    row stays zero, so its ``r`` is 0 (every non-zero row has ``r >= 1``).
    """
    norm = torch.linalg.vector_norm(E, dim=-1, keepdim=True)
    unit = _safe_div(E, norm)
    sim = unit @ unit.transpose(-1, -2)
    return F.relu(sim).sum(dim=-1)


def aggregation_weights(
    e: torch.Tensor,
    E: torch.Tensor,
    *,
    scores: torch.Tensor | None = None,
    redundancy_mode: str | torch.Tensor = "similarity",
) -> torch.Tensor:
    """Weights ``m_k = l1norm(ReLU(s_k) / r_k)`` of SHERL Eq. 2-3; returns ``(..., M)``.

    e:               ``(..., d)`` the guide (the projected last shallow feature).
    E:               ``(..., M, d)`` the other projected shallow features.
    scores:          raw scores ``s_k`` ``(..., M)``; default the paper's inner product
                     ``e_k E_kᵀ`` (the official code's learned score is passed in by :class:`MTSA`).
    redundancy_mode: ``"similarity"`` (Eq. 3, MTSA), ``"none"`` (``r = 1``: the LinearA
                     ablation), or a positive tensor broadcastable to ``(..., M)`` used as ``r``
                     (the LinearA(r) ablation: a learnable redundancy).

    Zero-``r`` features get weight 0; a token whose weights are all 0 gets ``m_k = 0``.
    """
    _check_pair(e, E)
    if scores is None:
        scores = (E @ e.unsqueeze(-1)).squeeze(-1)
    elif scores.shape != E.shape[:-1]:
        raise ValueError(f"scores must have shape {tuple(E.shape[:-1])} (..., M); got {tuple(scores.shape)}")
    if isinstance(redundancy_mode, torch.Tensor):
        r = redundancy_mode
    elif redundancy_mode == "similarity":
        r = redundancy(E)
    elif redundancy_mode == "none":
        r = None
    else:
        raise UnknownNameError("redundancy mode", redundancy_mode, REDUNDANCY_MODES)
    a = F.relu(scores)
    if r is not None:
        a = _safe_div(a, r.expand_as(a))
    return _safe_div(a, a.sum(dim=-1, keepdim=True))


def redundancy_aggregate(
    e: torch.Tensor,
    E: torch.Tensor,
    *,
    scores: torch.Tensor | None = None,
    redundancy_mode: str | torch.Tensor = "similarity",
) -> torch.Tensor:
    """``e'_k = m_k E_k + e_k`` (SHERL Eq. 2), with ``m`` from :func:`aggregation_weights`.

    ``e``: ``(B, K, d)`` (any leading dims), ``E``: ``(B, K, M, d)``; returns ``(B, K, d)``.
    Pass ``redundancy_mode="none"`` for LinearA, a tensor ``r`` for LinearA(r).
    """
    m = aggregation_weights(e, E, scores=scores, redundancy_mode=redundancy_mode)
    return (m.unsqueeze(-2) @ E).squeeze(-2) + e


# ---------------------------------------------------------------------------------------
# Eq. 1: per-layer projection with a gated residual
# ---------------------------------------------------------------------------------------


class SensingTier(nn.Module):
    """One shallow feature's projection (SHERL Eq. 1): ``F = ReLU(X W_down + b)`` to width
    ``d``, then the gated residual ``F' = σ(F W_g + b_g) ⊙ (F W_l + b_l + F)``.

    Parameters: ``D·d + d`` (down) ``+ 2·(d² + d)`` (gate and linear branch).
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.gate = nn.Linear(hidden, hidden)
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.down(x))
        return torch.sigmoid(self.gate(f)) * (self.linear(f) + f)


# ---------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------


def mtsa_num_parameters(
    dim: int,
    num_layers: int,
    reduction: int = 8,
    *,
    score: str = "inner",
    aggregator: str = "mtsa",
    norm: bool = False,
    in_dims: Sequence[int] | None = None,
) -> int:
    """Trainable parameters of :class:`MTSA` (closed form; see the class docstring).

    With ``d = dim / reduction``, ``L = num_layers``, ``M = L - 1`` and every feature of
    width ``D`` (``in_dims=None``)::

        L·(D·d + d + 2d² + 2d)        per-layer tiers (Eq. 1)
        + d·D + D                     shared up-projection
        + 1                           gate α
        + (d + 1)   if score="learned"        (Linear(d, 1) on e ⊙ E)
        + M         if aggregator="lineara_r" (log r per shallow feature)
        + 4d² + 4d  if aggregator="mhsa"      (q, k, v, out projections with biases)
        + 2D        if norm                    (LayerNorm after the up-projection)

    e.g. D=384, r=8, L=5 (d=48), defaults: 5·23184 + 18816 + 1 = 134,737. With per-layer
    input widths ``in_dims = [D_0, .., D_{L-1}]`` the tiers hold ``Σ_i (D_i·d + d + 2d² + 2d)``
    (the rest is unchanged: the up-projection maps to ``dim``).
    """
    in_dims = _validate(dim, num_layers, reduction, score, aggregator, in_dims)
    d, D, L = dim // reduction, dim, num_layers
    n = sum(D_i * d + d + 2 * d * d + 2 * d for D_i in in_dims) + d * D + D + 1
    n += (d + 1) if score == "learned" else 0
    n += (L - 1) if aggregator == "lineara_r" else 0
    n += (4 * d * d + 4 * d) if aggregator == "mhsa" else 0
    n += 2 * D if norm else 0
    return n


def _validate(dim: int, num_layers: int, reduction: int, score: str, aggregator: str,
              in_dims: Sequence[int] | None = None) -> tuple[int, ...]:
    """Check the options; returns the per-layer input widths (``(dim,) * num_layers`` by default)."""
    if aggregator not in AGGREGATORS:
        raise UnknownNameError("aggregator", aggregator, AGGREGATORS)
    if score not in SCORES:
        raise UnknownNameError("score", score, SCORES)
    if score == "learned" and aggregator not in ("mtsa", "lineara", "lineara_r"):
        raise ValueError(
            f"score='learned' only applies to the linear aggregators (mtsa, lineara, lineara_r), "
            f"not aggregator={aggregator!r}; use score='inner'"
        )
    if int(num_layers) < 2:
        raise ValueError(
            f"MTSA needs at least 2 shallow features (a guide and one other); got num_layers={num_layers}"
        )
    if reduction < 1 or dim % reduction:
        raise ValueError(f"reduction factor {reduction} does not divide the width {dim}")
    d = dim // reduction
    if aggregator == "mhsa" and d % MHSA_HEADS:
        raise ValueError(
            f"aggregator='mhsa' uses {MHSA_HEADS} heads, which do not divide the reduced width "
            f"{d} (= {dim} / {reduction})"
        )
    if in_dims is None:
        return (int(dim),) * int(num_layers)
    widths = tuple(in_dims)
    if len(widths) != int(num_layers) or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(
            f"in_dims must hold one positive int width per shallow feature ({num_layers}); got {list(widths)}"
        )
    return widths


class MTSA(nn.Module):
    """Multi-Tiered Sensing Adapter (SHERL Sec. 3.2, Eq. 1-3; output form of the official code).

    ``MTSA(dim, num_layers, reduction=8, score="inner", aggregator="mtsa")`` is called as
    ``mtsa(features, x_last)``:

    * ``features``: a list of ``num_layers >= 2`` shallow features ``[(B, K, D)] * L`` in
      backbone order, e.g. the outputs of units ``0 .. N-2`` (optionally preceded by the
      embedding output). Feature ``i`` goes through its own :class:`SensingTier` (Eq. 1):
      ``F'_i = σ(F_i W_g) ⊙ (F_i W_l + F_i)`` with ``F_i = ReLU(X_i W_down_i)``, width
      ``d = D / reduction``.
    * the **guide** ``e = F'_{L-1}`` is the projected *last* list entry (the deepest shallow
      feature); the others ``E = [F'_0, .., F'_{L-2}]`` (``M = L - 1``, list order kept) are
      aggregated per token: ``e' = agg(e, E)``.
    * ``x_last``: ``(B, K, D)``, the input the last unit would normally get (the output of
      unit ``N-2``; in the usual call this is the same tensor as ``features[-1]``).
    * ``in_dims`` (beyond the paper's Transformers; its Sec. 3.3 CNN case): one input width per
      shallow feature, ``features[i]`` then being ``(B, K, in_dims[i])`` -- each tier
      down-projects from its own width, so stages of different channel counts can be merged.
      Default: every feature has width ``dim``. ``x_last`` and the output keep width ``dim``.
    * output ``up(e') + tanh(α / T) · x_last`` with one shared ``up: d -> D``, ``α`` learnable
      and zero-initialised, ``T = 0.1``: at initialisation the merged features replace the last
      unit's input exactly; the gate lets training blend the original input back in.

    ``score``: ``"inner"`` -- the paper's ``e_k E_kᵀ`` (default); ``"learned"`` -- the
    official code's ``Linear(d, 1)(e ⊙ E_j)`` per feature.

    ``aggregator`` (the Fig. 4 ablation; all keep the guide residual ``+ e``):

    ========== ===========================================================================
    mtsa       :func:`redundancy_aggregate` with the similarity redundancy (Eq. 2-3)
    lineara    the same without the redundancy term (``r = 1``)
    lineara_r  ``r_j = exp(ρ_j)``, one learnable ``ρ_j`` per shallow feature, init 0 (r = 1)
    maxpool    ``max_j E_j + e`` (element-wise over the M features of a token)
    avepool    ``mean_j E_j + e``
    mhsa       4-head attention per token, query ``e``, keys / values ``E`` ``+ e``
    ========== ===========================================================================

    ``norm=True`` adds a LayerNorm after the up-projection (the official ``fc_out`` has one);
    default off, so the output is exactly ``up(e')`` at initialisation.

    Trainable parameters: :func:`mtsa_num_parameters` (``L·(D·d + d + 2d² + 2d) + d·D + D + 1``
    for the defaults; 134,737 for D=384, r=8, L=5).

    Departures from the paper's wording / the official code (deliberate):

    * the paper writes the score as a plain inner product; the official code learns it
      (``score="learned"``). Default: the paper.
    * the paper's Eq. 1 projects each layer with ReLU and a gated residual; the official
      ``Downsample`` is ``Linear + LayerNorm`` with no gate. Default: the paper.
    * the output gate ``tanh(α/T) · x_last`` and the shared up-projection come from the
      official code (the paper describes feeding the merged feature to the last layer).
    * the official code's LayerNorm / Dropout after the up-projection are off by default
      (``norm=True`` restores the LayerNorm); the official ``eps`` in l1/l2 norms is replaced by
      the exact conventions of the module docstring.
    """

    def __init__(
        self,
        dim: int,
        num_layers: int,
        reduction: int = 8,
        *,
        score: str = "inner",
        aggregator: str = "mtsa",
        norm: bool = False,
        temperature: float = GATE_TEMPERATURE,
        in_dims: Sequence[int] | None = None,
    ):
        super().__init__()
        self.in_dims = _validate(dim, num_layers, reduction, score, aggregator, in_dims)
        if not temperature > 0:
            raise ValueError(f"gate temperature must be > 0; got {temperature}")
        self.dim, self.num_layers, self.reduction = dim, num_layers, reduction
        self.hidden = d = dim // reduction
        self.score, self.aggregator, self.temperature = score, aggregator, float(temperature)

        self.tiers = nn.ModuleList(SensingTier(w, d) for w in self.in_dims)
        self.score_fc = nn.Linear(d, 1) if score == "learned" else None
        self.log_r = nn.Parameter(torch.zeros(num_layers - 1)) if aggregator == "lineara_r" else None
        self.attn = nn.MultiheadAttention(d, MHSA_HEADS, batch_first=True) if aggregator == "mhsa" else None
        self.up = nn.Linear(d, dim)
        self.norm = nn.LayerNorm(dim) if norm else None
        self.alpha = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        widths = "" if set(self.in_dims) == {self.dim} else f"in_dims={list(self.in_dims)}, "
        return (
            f"dim={self.dim}, num_layers={self.num_layers}, reduction={self.reduction}, {widths}"
            f"hidden={self.hidden}, score={self.score!r}, aggregator={self.aggregator!r}, "
            f"T={self.temperature}"
        )

    def gate(self) -> torch.Tensor:
        """``tanh(α / T)``: the weight of ``x_last`` in the output (0 at initialisation)."""
        return torch.tanh(self.alpha / self.temperature)

    def project(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1 on every feature; returns the guide ``e`` ``(B, K, d)`` and ``E`` ``(B, K, M, d)``."""
        if len(features) != self.num_layers:
            raise ValueError(f"MTSA was built for {self.num_layers} shallow features; got {len(features)}")
        lead = tuple(features[0].shape[:-1])
        for i, (x, w) in enumerate(zip(features, self.in_dims)):
            if x.dim() != 3 or tuple(x.shape[:-1]) != lead or x.shape[-1] != w:
                raise ValueError(
                    f"shallow feature {i} has shape {tuple(x.shape)}; it must be (B, K, {w}) with "
                    f"(B, K) = {lead} of feature 0"
                )
        projected = [tier(x) for tier, x in zip(self.tiers, features)]
        return projected[-1], torch.stack(projected[:-1], dim=-2)

    def aggregate(self, e: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        """``e' = agg(e, E)`` for the configured aggregator; ``(B, K, d)``."""
        kind = self.aggregator
        if kind == "maxpool":
            return E.amax(dim=-2) + e
        if kind == "avepool":
            return E.mean(dim=-2) + e
        if kind == "mhsa":
            B, K, M, d = E.shape
            q = e.reshape(B * K, 1, d)
            kv = E.reshape(B * K, M, d)
            out, _ = self.attn(q, kv, kv, need_weights=False)
            return out.reshape(B, K, d) + e
        scores = self.score_fc(e.unsqueeze(-2) * E).squeeze(-1) if self.score_fc is not None else None
        if kind == "lineara":
            mode: str | torch.Tensor = "none"
        elif kind == "lineara_r":
            mode = self.log_r.exp()
        else:
            mode = "similarity"
        return redundancy_aggregate(e, E, scores=scores, redundancy_mode=mode)

    def forward(self, features: Sequence[torch.Tensor], x_last: torch.Tensor) -> torch.Tensor:
        e, E = self.project(features)
        expected = (*features[0].shape[:-1], self.dim)
        if tuple(x_last.shape) != expected:
            raise ValueError(
                f"x_last has shape {tuple(x_last.shape)}; expected {expected} (the shallow features' (B, K) "
                f"and the width {self.dim})"
            )
        out = self.up(self.aggregate(e, E))
        if self.norm is not None:
            out = self.norm(out)
        return out + self.gate() * x_last
