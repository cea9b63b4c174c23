"""The DAS skip policy: which k units to replace by skip adapters.

Paper: Wu et al., "Parameter and Computation Efficient Transfer Learning for Vision-Language
Pre-trained Models" (DAS, NeurIPS 2023), Sec. 3 (the reinforcement-learning search); official code
``DoubtedSteam/DAS``, ``ViLT/vilt/modules/vilt_module_search.py`` (``das_gate``,
``get_prob``, the update in ``forward``, the final choice in ``training_epoch_end``).

The policy keeps one logit ``a_i`` per candidate unit (init 0) and ``p_i = sigmoid(a_i)``.

* **Sampling** (official ``torch.multinomial(prob, k)``, without replacement): k distinct
  units drawn one after another, each draw with probability proportional to ``p_i`` among
  the units not drawn yet.
* **Update** (official rule, one round): the search scores S distinct skip sets
  ``s_1..s_S`` with rewards ``r_j`` (officially ``exp(-validation loss)``, see
  :func:`reward_from_loss`); with ``p`` read once *before* any change and the mean reward
  ``r_bar`` as baseline, for every set j and every unit i in it::

      a_i += lr * (r_j - r_bar) * p_i * (1 - p_i)

  (a REINFORCE step; ``p_i (1 - p_i)`` is d sigmoid / d a_i). A unit in several sets
  collects one term per set.
* **Choice** (official ``torch.sort(das_gate)[1][-k:]``): the k units with the highest
  logits. Ties go to the unit that comes first in ``unit_names`` (torch's sort leaves them
  unspecified); the result is listed in unit order.

Randomness comes only from the policy's own ``numpy.random.Generator`` (PCG64) seeded by
``seed``: samples are the same for a seed whatever the global torch / numpy RNG state, and
:meth:`SkipPolicy.state_dict` (JSON-serialisable: logits, RNG state, history) lets a search
resume exactly.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from vlkit.models.protocol import UnknownNameError


def reward_from_loss(loss: float) -> float:
    """The official DAS reward of a skip set: ``exp(-loss)`` of its validation loss (summed
    over the task's losses) -- in (0, 1], larger is better."""
    return math.exp(-float(loss))


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -a))


class SkipPolicy:
    """Bernoulli-logit policy over ``unit_names``; samples and learns sets of ``k`` units.

    unit_names: candidate units (e.g. ``backbone.units_of("fusion")``), distinct, non-empty
    k:          units skipped per set, ``1 <= k < len(unit_names)``
    lr:         step size of :meth:`update` (official: 1.0 for VQA)
    seed:       seed of the policy's own RNG

    ``history`` holds the probabilities after each round (row 0 = before the first update),
    one float per unit in ``unit_names`` order: the policy trajectory of the DAS plots.
    """

    def __init__(self, unit_names: Sequence[str], k: int, lr: float = 1.0, seed: int = 0):
        names = list(unit_names) if not isinstance(unit_names, str) else [unit_names]
        if not names:
            raise ValueError("unit_names is empty: the skip policy needs at least two candidate units")
        for n in names:
            if not isinstance(n, str) or not n:
                raise ValueError(f"unit names must be non-empty strings, got {n!r} in {names}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate unit names {dup} in {names}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an int, got {k!r}")
        if not 1 <= k < len(names):
            raise ValueError(f"k must satisfy 1 <= k < number of candidates ({len(names)}), got k={k}; "
                             f"candidates: {', '.join(names)}")
        if not math.isfinite(lr):
            raise ValueError(f"lr must be finite, got {lr!r}")
        self.unit_names: tuple[str, ...] = tuple(names)
        self.k, self.lr, self.seed = int(k), float(lr), int(seed)
        self._index = {n: i for i, n in enumerate(self.unit_names)}
        self._logits = np.zeros(len(names), dtype=np.float64)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.history: list[list[float]] = [self._probs_array().tolist()]

    # ------------------------------------------------------------------ views
    @property
    def n(self) -> int:
        return len(self.unit_names)

    def _probs_array(self) -> np.ndarray:
        return _sigmoid(self._logits)

    def logits(self) -> dict[str, float]:
        """``{unit: logit}`` in unit order."""
        return dict(zip(self.unit_names, self._logits.tolist()))

    def probs(self) -> dict[str, float]:
        """``{unit: sigmoid(logit)}`` in unit order."""
        return dict(zip(self.unit_names, self._probs_array().tolist()))

    def set_logits(self, logits: dict[str, float] | Sequence[float]) -> None:
        """Overwrite the logits (a ``{unit: logit}`` dict covering every unit, or one float per
        unit in order); for tests, warm starts and plots. History is left as it is."""
        if isinstance(logits, dict):
            for name in logits:
                self._check_name(name)
            missing = [n for n in self.unit_names if n not in logits]
            if missing:
                raise ValueError(f"set_logits: no logit given for units {missing}")
            values = [logits[n] for n in self.unit_names]
        else:
            values = list(logits)
            if len(values) != self.n:
                raise ValueError(f"set_logits: got {len(values)} logits for {self.n} units {list(self.unit_names)}")
        arr = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"logits must be finite, got {values}")
        self._logits = arr

    def ranking(self) -> list[str]:
        """All units by decreasing logit; ties broken by unit order (earlier first)."""
        order = sorted(range(self.n), key=lambda i: (-self._logits[i], i))
        return [self.unit_names[i] for i in order]

    def best(self) -> tuple[str, ...]:
        """The k units with the highest logits (ties: earlier unit wins), in unit order."""
        chosen = set(self.ranking()[: self.k])
        return tuple(n for n in self.unit_names if n in chosen)

    # ------------------------------------------------------------------ sampling
    def sample(self) -> tuple[str, ...]:
        """k distinct units, in draw order: each draw picks among the remaining units with
        probability ``p_i / sum_remaining p_j`` (sampling without replacement, as
        ``torch.multinomial(p, k)``). Weights are normalised in log space, so extreme
        logits never give 0/0."""
        logp = -np.logaddexp(0.0, -self._logits)  # log sigmoid
        remaining = list(range(self.n))
        drawn = []
        for _ in range(self.k):
            lw = logp[remaining]
            w = np.exp(lw - lw.max())
            j = int(self._rng.choice(len(remaining), p=w / w.sum()))
            drawn.append(remaining.pop(j))
        return tuple(self.unit_names[i] for i in drawn)

    def set_probs(self, log: bool = False, max_subsets: int = 100_000) -> dict[tuple[str, ...], float]:
        """Exact probability (``log=True``: its natural log) that :meth:`sample` returns each
        set, in any draw order.

        Keys are the ``C(n, k)`` sets as tuples in unit order. Computed by dynamic programming
        over subsets in log space: ``f(T) = sum_{i in T} f(T - i) * p_i / sum_{j not in T - i} p_j``
        (the chance that the first ``|T|`` draws are exactly ``T``), with ``f({}) = 1``.
        Raises if more than ``max_subsets`` subsets of size <= k would be visited.
        """
        n, k = self.n, self.k
        visited = sum(math.comb(n, j) for j in range(k + 1))
        if visited > max_subsets:
            raise ValueError(f"set_probs would visit {visited} subsets of {n} units (k={k}); "
                             f"the limit is max_subsets={max_subsets}")
        logw = (-np.logaddexp(0.0, -self._logits)).tolist()  # log p_i
        logf = {0: 0.0}
        for _ in range(k):
            nxt: dict[int, list[float]] = {}
            for mask, lf in logf.items():
                rest = [i for i in range(n) if not mask >> i & 1]
                lrest = float(np.logaddexp.reduce([logw[i] for i in rest]))  # log sum_{j not in T} p_j
                for i in rest:
                    nxt.setdefault(mask | 1 << i, []).append(lf + logw[i] - lrest)
            logf = {m: float(np.logaddexp.reduce(v)) for m, v in nxt.items()}
        return {tuple(self.unit_names[i] for i in range(n) if m >> i & 1): lf if log else math.exp(lf)
                for m, lf in sorted(logf.items())}

    # ------------------------------------------------------------------ learning
    def _check_name(self, name) -> int:
        if name not in self._index:
            raise UnknownNameError("unit", name, self.unit_names)
        return self._index[name]

    def _check_set(self, skip_set) -> list[int]:
        if isinstance(skip_set, str):
            raise TypeError(f"a skip set must be a collection of unit names, got the string {skip_set!r}")
        members = list(skip_set)
        idx = [self._check_name(n) for n in members]
        if len(set(idx)) != len(idx):
            raise ValueError(f"skip set {members} names a unit twice")
        if len(idx) != self.k:
            raise ValueError(f"skip set {members} has {len(idx)} units; this policy skips k={self.k}")
        return idx

    def update(self, skip_sets: Sequence[Iterable[str]], rewards: Sequence[float]) -> dict[str, float]:
        """One round of the official rule (module docstring); returns the new ``probs()`` and
        appends them to ``history``."""
        sets = list(skip_sets)
        rs = [float(r) for r in rewards]
        if len(sets) != len(rs):
            raise ValueError(f"got {len(sets)} skip sets but {len(rs)} rewards; one reward per set")
        if not sets:
            raise ValueError("update needs at least one (skip set, reward) pair")
        bad = [r for r in rs if not math.isfinite(r)]
        if bad:
            raise ValueError(f"rewards must be finite, got {bad} in {rs}")
        indices = [self._check_set(s) for s in sets]  # validate everything before changing anything
        p = self._probs_array()  # read once, before any change
        grad = p * (1.0 - p)
        baseline = sum(rs) / len(rs)
        new = self._logits.copy()
        for idx, r in zip(indices, rs):
            for i in idx:
                new[i] += self.lr * (r - baseline) * grad[i]
        self._logits = new
        probs = self._probs_array()
        self.history.append(probs.tolist())
        return dict(zip(self.unit_names, probs.tolist()))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to resume exactly; JSON-serialisable."""
        return {
            "unit_names": list(self.unit_names),
            "k": self.k,
            "lr": self.lr,
            "seed": self.seed,
            "logits": self._logits.tolist(),
            "rng": self._rng.bit_generator.state,
            "history": [list(row) for row in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; the candidates and k must match this policy's."""
        if list(state["unit_names"]) != list(self.unit_names):
            raise ValueError(f"state is for units {list(state['unit_names'])}, this policy has {list(self.unit_names)}")
        if int(state["k"]) != self.k:
            raise ValueError(f"state is for k={state['k']}, this policy has k={self.k}")
        logits = np.asarray(state["logits"], dtype=np.float64)
        if logits.shape != (self.n,):
            raise ValueError(f"state has {logits.size} logits for {self.n} units")
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = state["rng"]
        self.lr, self.seed = float(state["lr"]), int(state["seed"])
        self._logits, self._rng = logits, rng
        self.history = [list(map(float, row)) for row in state["history"]]

    def __repr__(self) -> str:
        ps = ", ".join(f"{n}={p:.3f}" for n, p in self.probs().items())
        return f"SkipPolicy(k={self.k}, lr={self.lr}, rounds={len(self.history) - 1}, p: {ps})"


def sample_distinct(policy: SkipPolicy, S: int, max_tries: int = 1_000) -> list[tuple[str, ...]]:
    """S skip sets from ``policy``, distinct as sets (order-insensitive), as in the official
    search (``while tensor_in_list(selects, select): resample``): a draw that repeats a set
    already drawn is rejected, so each new set follows the policy's set distribution
    restricted to the sets not drawn yet.

    When the policy is so peaked that ``max_tries`` draws in all have not given S sets, the
    remaining sets are drawn *exactly* from that same restricted distribution
    (:meth:`SkipPolicy.set_probs`), so the search never stalls. Each set is returned as a
    tuple in unit order (a canonical form that does not depend on string hashing). Raises if
    ``S`` exceeds the number of distinct sets ``C(n, k)``.
    """
    if isinstance(S, bool) or not isinstance(S, (int, np.integer)) or S < 1:
        raise ValueError(f"S must be a positive int, got {S!r}")
    total = math.comb(policy.n, policy.k)
    if S > total:
        raise ValueError(f"cannot draw S={S} distinct skip sets: only C({policy.n}, {policy.k}) = {total} exist "
                         f"for candidates {', '.join(policy.unit_names)}")
    order = {n: i for i, n in enumerate(policy.unit_names)}
    seen: set[tuple[str, ...]] = set()
    out: list[tuple[str, ...]] = []
    tries = 0
    while len(out) < S and tries < max_tries:
        tries += 1
        s = tuple(sorted(policy.sample(), key=order.__getitem__))
        if s not in seen:
            seen.add(s)
            out.append(s)
    if len(out) < S:  # exact draws from the set distribution restricted to unseen sets
        try:
            logq_all = policy.set_probs(log=True)
        except ValueError as e:
            raise RuntimeError(f"only {len(out)} distinct skip sets of the {S} requested after {max_tries} draws, "
                               f"and the exact fallback is too large: {e}") from None
        cands = [s for s in logq_all if s not in seen]
        logq = np.array([logq_all[s] for s in cands], dtype=np.float64)
        while len(out) < S:
            w = np.exp(logq - logq.max())
            j = int(policy._rng.choice(len(cands), p=w / w.sum()))
            out.append(cands.pop(j))
            logq = np.delete(logq, j)
    return out


__all__ = ["SkipPolicy", "sample_distinct", "reward_from_loss"]
