"""DAS, step 4: the reinforcement-learning search for the k units to skip.

Paper: Wu et al., "Parameter and Computation Efficient Transfer Learning for Vision-Language
Pre-trained Models" (DAS, NeurIPS 2023), Sec. 3.1, Alg. 1; official code ``DoubtedSteam/DAS``,
``ViLT/vilt/modules/vilt_module_search.py`` and ``METER/meter/modules/meter_module_search.py``
(``forward``: ``das_turn``, ``das_step``, the reward ``exp(-loss)``, the gate update).

The procedure (one :func:`vlkit.train.fit` run on a deep copy of the backbone and head):

1. **Supernet** (:class:`~vlkit.methods.das.apply.SkipSupernet`): every candidate unit gets its
   parallel adapters *and* its skip adapter; all subnetworks share them. What trains is what
   DAS trains (:func:`~vlkit.methods.das.apply.das_trainable`): adapters, poolers, token-type
   embeddings, the task head.
2. **Warm-up** (``warmup_epochs``, official 1): every training forward call runs a skip set of
   k candidates drawn *uniformly* (the official sampler at its initial p = 0.5 everywhere)
   from a private seeded generator.
3. **Search** (``rounds`` rounds of ``every`` forward calls each, official ``das_turn``): each
   training call runs a set sampled from the policy (:meth:`SkipPolicy.sample`, as the official
   code keeps training on policy samples); after every ``every`` calls, one **policy round**:

   * one fresh validation batch (below) is collated, once, and shared by the round's sets;
   * ``S`` distinct skip sets (official ``das_step``; ``S > C(n, k)`` is an error) are drawn
     (:func:`sample_distinct`) and each is scored without gradients on that batch, in eval
     mode (dropout off -- the official code scores in train mode; eval mode makes the S sets
     differ only by their skips): reward ``exp(-loss)`` (:func:`reward_from_loss`);
   * :meth:`SkipPolicy.update` (REINFORCE with the mean reward as baseline, step ``policy_lr``).

4. The result is ``policy.best()``: the k candidates with the highest logits.

Validation batches. ``val_data`` is cut into ``len(val_data) // val_batch_size`` batches of a
seeded permutation; round r uses batch ``r mod nb`` of permutation ``r // nb``. So rounds never
share an example until every batch of a pass has been used; after that a new permutation
starts (wrap-around, so any number of rounds works on a small validation set), reordered so
that its first batch avoids the examples of the round just before (:class:`ValBatches`).
The indices of every round's batch are in :attr:`SearchResult.val_batches`.

Differences from the official loop, by design: the policy round runs after the optimiser step
of the call that completes ``every`` calls (official: inside that call's forward, before its
backward) -- the same cadence; with ``grad_accum = a`` a round comes every ``ceil(every / a)``
steps. The final run restarts from the pre-trained weights (:meth:`SearchResult.apply_to` on
the caller's untouched backbone), as the paper does.

Determinism. Adapters (``seed``), warm-up sets, policy and validation order each draw from
their own generator derived from ``seed`` (:func:`vlkit.seeding.derive_seed`); the training
data order and dropout follow ``train_config.seed`` through :func:`vlkit.train.fit`. The same
seeds give the same result and history on the CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from vlkit.seeding import check_seed, data_generator, derive_seed
from vlkit.train import TrainConfig, fit

from .apply import DEFAULT_BOTTLENECK, SkipSupernet, apply_skips, candidates, das_trainable
from .policy import SkipPolicy, reward_from_loss, sample_distinct

__all__ = ["DASModel", "SearchResult", "ValBatches", "search"]


class DASModel(nn.Module):
    """The model a DAS ``loss_fn`` receives: ``model.backbone`` and ``model.head`` (or ``None``).

    ``model(**inputs)`` returns ``head(backbone(**inputs).pooled)``, or the backbone's output
    when there is no head. Loss functions that need more (NLVR2's two passes, retrieval) call
    ``model.backbone`` and ``model.head`` themselves.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, **inputs):
        out = self.backbone(**inputs)
        return out if self.head is None else self.head(out.pooled)


class ValBatches:
    """Round r's validation batch: batch ``r mod nb`` of pass ``r // nb``, where a pass is a
    seeded permutation of ``range(n)`` cut into ``nb = n // batch_size`` batches (the
    incomplete tail is unused in that pass).

    Rounds of one pass never share an example. At a wrap-around the new pass's permutation is
    reordered (stably) so that the examples of the previous round come last: whenever
    ``nb >= 2``, *successive* rounds never share an example, across passes too (with
    ``nb = 1`` every round necessarily reuses the one batch).
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"val_batch_size must be a positive int, got {batch_size!r}")
        if batch_size > n:
            raise ValueError(f"val_batch_size={batch_size} exceeds the {n} validation examples")
        self.n, self.batch_size, self.seed = n, batch_size, check_seed(seed)
        self.per_pass = n // batch_size
        self._passes: list[list[int]] = []

    def _pass(self, p: int) -> list[int]:
        while len(self._passes) <= p:
            q = len(self._passes)
            perm = torch.randperm(self.n, generator=data_generator(self.seed, q)).tolist()
            if q:
                last = self._passes[q - 1]
                prev = set(last[(self.per_pass - 1) * self.batch_size:self.per_pass * self.batch_size])
                perm = [i for i in perm if i not in prev] + [i for i in perm if i in prev]
            self._passes.append(perm)
        return self._passes[p]

    def indices(self, r: int) -> list[int]:
        """Example indices of round ``r`` (0-based)."""
        p, b = divmod(int(r), self.per_pass)
        return self._pass(p)[b * self.batch_size:(b + 1) * self.batch_size]


@dataclass
class SearchResult:
    """What :func:`search` returns (JSON-able through :meth:`to_dict`).

    best:           the k units to skip (``policy.best()``), in unit order
    rounds:         one dict per policy round: ``round``, ``step`` (optimiser step after which
                    it ran), ``val_indices``, ``sets``, ``losses``, ``rewards``, ``probs`` (after)
    policy_history: probabilities per round (row 0 = before the first round), candidate order
    lr:             the policy's step size; ``train_history``: :func:`fit`'s per-step records
    """

    best: tuple[str, ...]
    scope: str
    candidates: tuple[str, ...]
    k: int
    S: int
    every: int
    lr: float
    seed: int
    warmup_steps: int
    total_steps: int
    rounds: list[dict]
    policy_history: list[list[float]]
    policy_state: dict
    train_history: list[dict]
    adapters: dict = field(default_factory=dict)

    @property
    def rewards(self) -> list[list[float]]:
        """Rewards per round (one per scored set)."""
        return [r["rewards"] for r in self.rounds]

    @property
    def val_batches(self) -> list[list[int]]:
        """Validation example indices used in each round."""
        return [r["val_indices"] for r in self.rounds]

    def probs(self) -> dict[str, float]:
        """Final skip probabilities per candidate."""
        return dict(zip(self.candidates, self.policy_history[-1]))

    def apply_to(self, backbone, **overrides):
        """``apply_skips(backbone, best, scope=..., <the search's adapter sizes>)``: the final
        model, built on ``backbone`` (pass the pre-trained one: the paper restarts from it)."""
        return apply_skips(backbone, self.best, scope=self.scope, **{**self.adapters, **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["best"], d["candidates"] = list(self.best), list(self.candidates)
        return d


def _scalar_loss(out: Any) -> float:
    """The validation loss of one set: ``loss_fn``'s scalar, or its ``"loss"`` entry."""
    if isinstance(out, dict):
        if "loss" not in out:
            raise KeyError(f"loss_fn returned a dict without 'loss' (keys: {', '.join(map(str, out))})")
        out = out["loss"]
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar, got shape {tuple(out.shape)}")
        return float(out.detach().float())
    return float(out)


def _to_device(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    from accelerate.utils import send_to_device

    return send_to_device(batch, device)


def _autocast(device: torch.device, amp: str):
    """The autocast :func:`vlkit.train.fit` trains under (same ``amp`` rules), for scoring."""
    if device.type == "cpu" and amp == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if device.type == "cuda" and amp in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cuda" and amp == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def _positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def search(backbone, loss_fn: Callable[[nn.Module, Any], Any], train_data: Sequence, val_data: Sequence, *,
           k: int, scope: str = "fusion", rounds: int, S: int, every: int, policy_lr: float = 1.0,
           val_batch_size: int | None = None, warmup_epochs: int = 1, seed: int = 0, head: nn.Module | None = None,
           collate_fn: Callable[[list], Any] | None = None, val_collate_fn: Callable[[list], Any] | None = None,
           train_config: TrainConfig | None = None,
           kept_bottleneck: int = DEFAULT_BOTTLENECK, skip_bottleneck: int | None = None, act: str = "relu",
           init: str = "bert") -> SearchResult:
    """Search the ``k`` units of ``backbone`` to skip (module docstring; DAS Sec. 3.1).

    backbone, head:  the pre-trained backbone and the task head; both are deep-copied, so the
                     caller's modules are left untouched (the final run restarts from them)
    loss_fn:         ``loss_fn(model, batch)`` with ``model`` a :class:`DASModel`; returns the
                     mean loss of the batch (a scalar tensor or a dict with ``"loss"``), as in
                     :func:`vlkit.train.fit` -- the same function trains and scores
    train_data, val_data: indexable datasets, batched by ``collate_fn`` (default torch's) and
                     ``val_collate_fn`` (default ``collate_fn``): two splits whose examples index
                     different image stores need one collate each
    k, scope:        units skipped per set; candidates :func:`~vlkit.methods.das.apply.candidates`
    rounds, S, every: policy rounds, sets scored per round (official ``das_step``), training
                     forward calls between rounds (official ``das_turn``)
    policy_lr:       step of :meth:`SkipPolicy.update` (official 1.0 for VQA); reported
    val_batch_size:  examples per validation batch (default: the training batch size)
    warmup_epochs:   epochs of uniformly random sets before the first round (official 1)
    seed:            adapters, warm-up sets, policy, validation order
    train_config:    optimiser / batch / device settings for :func:`fit` (its ``steps`` /
                     ``epochs`` are replaced by the search's length; its ``seed`` orders the
                     training data); default ``TrainConfig(batch_size=min(32, len(train_data)),
                     lr=1e-3, seed=seed)``
    kept_bottleneck, skip_bottleneck, act, init: adapter layout, as in :func:`apply_skips`
    """
    seed = check_seed(seed)
    k = _positive_int("k", k)
    rounds = _positive_int("rounds", rounds)
    every = _positive_int("every", every)
    S = _positive_int("S", S)
    warmup_epochs = _positive_int("warmup_epochs", warmup_epochs, 0)
    if not (isinstance(policy_lr, (int, float)) and math.isfinite(policy_lr)):
        raise ValueError(f"policy_lr must be a finite number, got {policy_lr!r}")
    cands = candidates(backbone, scope)
    n = len(cands)
    if k >= n:
        raise ValueError(f"k={k} must be < the number of {scope}-scope candidates ({n}: {', '.join(cands)})")
    if S > math.comb(n, k):
        raise ValueError(f"S={S} distinct skip sets requested, but only C({n}, {k}) = {math.comb(n, k)} exist for "
                         f"the {scope}-scope candidates {', '.join(cands)}")
    base = train_config if train_config is not None else TrainConfig(
        steps=1, batch_size=min(32, len(train_data)), lr=1e-3, seed=seed)
    if not isinstance(base, TrainConfig):
        raise TypeError(f"train_config must be a TrainConfig, got {type(base).__name__}")
    bpe = len(train_data) // base.batch_size
    if bpe == 0:
        raise ValueError(f"the training data has {len(train_data)} examples, fewer than batch_size={base.batch_size}")
    val = ValBatches(len(val_data), base.batch_size if val_batch_size is None else val_batch_size,
                     derive_seed(seed, "das-val") % 2**32)
    accum = base.grad_accum
    warm_steps = warmup_epochs * bpe // accum
    steps_per_round = -(-every // accum)
    total = warm_steps + rounds * steps_per_round
    cfg = dataclasses.replace(base, steps=total, epochs=None, eval_every=None, ckpt_every=None)
    collate = collate_fn if collate_fn is not None else torch.utils.data.default_collate
    val_collate = val_collate_fn if val_collate_fn is not None else collate

    adapters = dict(kept_bottleneck=kept_bottleneck, skip_bottleneck=skip_bottleneck, act=act, init=init)
    model = DASModel(copy.deepcopy(backbone), copy.deepcopy(head))
    supernet = SkipSupernet(model.backbone, scope, seed=derive_seed(seed, "das-adapters") % 2**32, **adapters)
    das_trainable(model.backbone, model.head)
    policy = SkipPolicy(cands, k, lr=float(policy_lr), seed=derive_seed(seed, "das-policy") % 2**32)
    warm_rng = np.random.Generator(np.random.PCG64(derive_seed(seed, "das-warmup")))
    calls = {"n": 0}
    records: list[dict] = []

    def train_loss(m: DASModel, batch):
        step = calls["n"] // accum + 1  # the optimiser step this call belongs to
        calls["n"] += 1
        if step <= warm_steps:
            chosen = [cands[i] for i in warm_rng.choice(n, size=k, replace=False)]
        else:
            chosen = policy.sample()
        supernet.set_skips(chosen)
        return loss_fn(m, batch)

    def policy_round(step: int, _rec: dict) -> None:
        if step <= warm_steps or (step - warm_steps) % steps_per_round:
            return
        r = len(records)
        idx = val.indices(r)
        device = next(model.parameters()).device
        batch = _to_device(val_collate([val_data[i] for i in idx]), device)
        sets = sample_distinct(policy, S)
        was = model.training
        model.eval()
        losses = []
        try:
            with torch.no_grad(), _autocast(device, cfg.amp):
                for s in sets:
                    supernet.set_skips(s)
                    losses.append(_scalar_loss(loss_fn(model, batch)))
        finally:
            model.train(was)
        bad = [(s, v) for s, v in zip(sets, losses) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite validation loss in policy round {r} (after step {step}): "
                                     f"{bad}; validation indices {idx}")
        rewards = [reward_from_loss(v) for v in losses]
        probs = policy.update(sets, rewards)
        records.append({"round": r, "step": step, "val_indices": idx, "sets": [list(s) for s in sets],
                        "losses": losses, "rewards": rewards, "probs": probs})

    trained = fit(model, train_loss, train_data, config=cfg, collate_fn=collate_fn, callbacks=[policy_round])
    if len(records) != rounds:  # a guard on the step arithmetic above
        raise RuntimeError(f"expected {rounds} policy rounds, ran {len(records)}")
    return SearchResult(best=policy.best(), scope=scope, candidates=tuple(cands), k=k, S=S, every=every,
                        lr=float(policy_lr), seed=seed, warmup_steps=warm_steps, total_steps=total, rounds=records,
                        policy_history=[list(h) for h in policy.history], policy_state=policy.state_dict(),
                        train_history=trained.history, adapters=adapters)
