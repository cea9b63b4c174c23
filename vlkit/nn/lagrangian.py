"""Lagrangian sparsity control for hard-concrete gates (CoFi Sec. 3.3, EfficientVLM Sec. 3.3).

The expected size of the gated model is ``E_size = sum_structures cost * P(z > 0)``
(:func:`expected_size`), where ``cost`` is the number of parameters each gate entry owns
(a head: ``4 * D * D / H (+ biases)``; an FFN unit: ``2 * D (+ 1)``). The expected sparsity
is ``s = 1 - E_size / full`` with ``full`` the size of all gated structures
(:func:`full_size`, CoFi's ``prunable_model_size``). The penalty added to the loss is
(CoFi Eq. 6, following Wang, Wohlwend & Lei 2020)::

    penalty = lambda1 * (s - t) + lambda2 * (s - t) ** 2

with ``t`` the target, warmed up linearly from 0 to ``target_sparsity`` over
``warmup_steps`` (CoFi/EfficientVLM ``get_target_sparsity`` with ``start_sparsity = 0``).
The gates' ``log_alpha`` *descend* this penalty; the multipliers ``lambda1, lambda2``
*ascend* it (a min-max game).

How the ascent is done (explicit, differs from the reference code): the reference puts the
lambdas in their own AdamW with a **negative** learning rate (``lr=-reg_learning_rate``),
which current torch optimisers reject. Here the penalty feeds the lambdas through a
gradient-negating identity, so after ``loss.backward()`` their ``.grad`` holds
``-d penalty / d lambda`` and **any optimiser with a positive learning rate ascends**. Put
the lambdas in their own parameter group (``controller.parameters()``), with
``weight_decay=0``; the reference uses the same learning rate as for ``log_alpha``.
The sign in practice: while ``s < t``, ``lambda1`` decreases, so ``d penalty / d s < 0`` and
descent raises the sparsity; while ``s > t`` the opposite. ``lambda2`` only grows
(its gradient is ``(s - t)^2 >= 0``), stiffening the constraint.

Modal-adaptive vs uniform (EfficientVLM Sec. 3.3 vs its "uniform" baseline):
:class:`SparsityBudget` takes the gates in named groups (e.g. ``vision``, ``text``,
``fusion``) and one ``scope`` argument:

* ``scope="global"`` -- modal-adaptive: **one** controller over the summed size of all
  groups, so the optimiser decides how much each modality gives up;
* ``scope="per_group"`` -- uniform / manual per-encoder: one controller per group, each
  held to its own target (one float for all groups, or a mapping group -> target as in
  EfficientVLM Tab. 1).

After the pruning phase call ``freeze()`` (the budget freezes its controllers and gates):
the lambdas stop being updated (they no longer receive gradients).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from vlkit.models.protocol import UnknownNameError

from .gates import HardConcreteGate

__all__ = [
    "GateCost",
    "LagrangianTerm",
    "BudgetTerm",
    "LagrangianController",
    "SparsityBudget",
    "expected_size",
    "full_size",
    "kept_size",
    "SCOPES",
    "check_target_sparsity",
]

#: ``(gate, cost)``: ``cost`` is the parameter count each entry of ``gate`` owns, a number
#: or a tensor of shape ``(gate.n,)``.
GateCost = tuple[HardConcreteGate, "float | Tensor"]

SCOPES = ("global", "per_group")


def _costs(gate: HardConcreteGate, cost) -> Tensor:
    c = torch.as_tensor(cost, dtype=torch.float32)
    if c.ndim == 0:
        c = c.expand(gate.n)
    if c.shape != (gate.n,):
        raise ValueError(f"cost must be a number or {gate.n} values (one per gate entry), got shape {tuple(c.shape)}")
    if not torch.isfinite(c).all() or (c < 0).any():
        raise ValueError(f"costs must be finite and >= 0, got {c.tolist()}")
    return c


def _check_gates(gates_and_costs) -> list[tuple[HardConcreteGate, Tensor]]:
    pairs = []
    for item in gates_and_costs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], HardConcreteGate)):
            raise TypeError(f"expected (HardConcreteGate, cost) pairs, got {item!r}")
        pairs.append((item[0], _costs(*item)))
    if not pairs:
        raise ValueError("need at least one (gate, cost) pair")
    return pairs


def expected_size(gates_and_costs: Iterable[GateCost]) -> Tensor:
    """``E_size = sum_gates sum_i cost_i * P(z_i > 0)``: differentiable w.r.t. every ``log_alpha``.

    CoFi/EfficientVLM ``get_num_parameters_and_constraint`` (heads and FFN units, no
    hidden-dimension or whole-layer gates).
    """
    total = None
    for gate, c in _check_gates(gates_and_costs):
        p = gate.prob_nonzero()
        term = (p * c.to(device=p.device, dtype=p.dtype)).sum()
        total = term if total is None else total + term
    return total


def full_size(gates_and_costs: Iterable[GateCost]) -> float:
    """``sum_gates sum_i cost_i``: the size of every gated structure (CoFi ``prunable_model_size``)."""
    return float(sum(c.double().sum() for _, c in _check_gates(gates_and_costs)))


@torch.no_grad()
def kept_size(gates_and_costs: Iterable[GateCost]) -> float:
    """Size kept by the binary masks (``gate.mask()``): what physical pruning leaves."""
    return float(sum((g.mask().double().cpu() * c.double()).sum() for g, c in _check_gates(gates_and_costs)))


def check_target_sparsity(value, name: str = "target_sparsity") -> float:
    """Return ``value`` as a float in ``[0, 1)``, else raise naming the value and the range."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not (0.0 <= v < 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1) (fraction of gated parameters removed), got {value!r}")
    return v


class _NegateGrad(torch.autograd.Function):
    """Identity forward, ``-grad`` backward: turns the optimiser's descent into ascent."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -grad


class LagrangianTerm(NamedTuple):
    """``penalty`` to add to the loss; ``expected_sparsity`` (a tensor); ``target`` at this step."""

    penalty: Tensor
    expected_sparsity: Tensor
    target: float


class LagrangianController(nn.Module):
    """Multipliers ``lambda1, lambda2`` (init 0, as the reference) for one sparsity budget.

    Args:
        target_sparsity: final target ``t`` in ``[0, 1)``.
        warmup_steps: ``t(step) = target * min(1, step / warmup_steps)``; ``0`` = no warm-up.

    ``controller(expected_size, full_size, step)`` returns a :class:`LagrangianTerm` with
    ``penalty = lambda1 (s - t) + lambda2 (s - t)^2``, ``s = 1 - expected_size / full_size``.
    Gradients: ordinary to ``expected_size`` (hence to the gates), negated to the lambdas
    (ascent under any descent optimiser; see the module doc). After :meth:`freeze`, the
    lambdas are constants.
    """

    def __init__(self, target_sparsity: float, warmup_steps: int = 0):
        super().__init__()
        self.target_sparsity = check_target_sparsity(target_sparsity)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))
        self.register_buffer("is_frozen", torch.zeros((), dtype=torch.bool))
        self._frozen = False  # Python mirror of the buffer (no device sync per step)
        self.register_load_state_dict_post_hook(_sync_frozen_flag)

    @property
    def frozen(self) -> bool:
        return self._frozen

    def target(self, step: int) -> float:
        """Warmed-up target: 0 at step 0, ``target_sparsity`` from ``warmup_steps`` on, linear between."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if self.warmup_steps == 0:
            return self.target_sparsity
        return self.target_sparsity * min(1.0, step / self.warmup_steps)

    def forward(self, expected_size: Tensor, full_size: float, step: int) -> LagrangianTerm:
        full = float(full_size)
        if not (full > 0 and math.isfinite(full)):
            raise ValueError(f"full_size must be a finite number > 0, got {full_size!r}")
        t = self.target(step)
        s = 1.0 - expected_size / full
        if self.frozen:
            l1, l2 = self.lambda_1.detach(), self.lambda_2.detach()
        else:
            l1, l2 = _NegateGrad.apply(self.lambda_1), _NegateGrad.apply(self.lambda_2)
        d = s - t
        return LagrangianTerm(l1 * d + l2 * d * d, s, t)

    @torch.no_grad()
    def freeze(self) -> "LagrangianController":
        """End of the pruning phase: the lambdas keep their values and stop being updated."""
        self.is_frozen.fill_(True)
        self._frozen = True
        self.lambda_1.requires_grad_(False)
        self.lambda_2.requires_grad_(False)
        return self

    def extra_repr(self) -> str:
        return f"target_sparsity={self.target_sparsity}, warmup_steps={self.warmup_steps}, frozen={self.frozen}"


def _sync_frozen_flag(module, incompatible_keys) -> None:
    """After ``load_state_dict``: mirror the loaded ``is_frozen`` buffer in the Python flag."""
    module._frozen = bool(module.is_frozen)
    module.lambda_1.requires_grad_(not module._frozen)
    module.lambda_2.requires_grad_(not module._frozen)


class BudgetTerm(NamedTuple):
    """What :class:`SparsityBudget` returns each step.

    penalty: add to the loss. expected_sparsity: over all groups (tensor). target: the
    overall target at this step (``per_group``: the size-weighted mean of the group targets).
    group_sparsity: expected sparsity of each group (tensors), for logging.
    """

    penalty: Tensor
    expected_sparsity: Tensor
    target: float
    group_sparsity: dict[str, Tensor]


class SparsityBudget(nn.Module):
    """Gates in named groups under a global (modal-adaptive) or per-group (uniform) budget.

    Args:
        groups: ``{"vision": [(gate, cost), ...], "text": [...], "fusion": [...]}``.
        target_sparsity: a float in ``[0, 1)``; with ``scope="per_group"`` also a mapping
            group -> target (every group named once).
        warmup_steps: linear warm-up of the target(s), see :class:`LagrangianController`.
        scope: ``"global"`` (one controller: EfficientVLM's modal-adaptive pruning) or
            ``"per_group"`` (one controller per group: uniform / manual per-encoder sparsity).

    The gates are *not* registered as submodules (they belong to the gated model), so
    ``budget.parameters()`` are exactly the Lagrange multipliers: give them their own
    optimiser parameter group with ``weight_decay=0``.
    """

    def __init__(
        self,
        groups: Mapping[str, Sequence[GateCost]],
        target_sparsity: float | Mapping[str, float],
        warmup_steps: int = 0,
        scope: str = "global",
    ):
        super().__init__()
        if scope not in SCOPES:
            raise UnknownNameError("scope", scope, SCOPES)
        if not groups:
            raise ValueError("groups must name at least one group of (gate, cost) pairs")
        self.scope = scope
        self._groups = {str(k): _check_gates(v) for k, v in groups.items()}
        self._full = {k: full_size(v) for k, v in self._groups.items()}
        for k, f in self._full.items():
            if f <= 0:
                raise ValueError(f"group {k!r} has full size {f}: give its gates positive costs")
        names = list(self._groups)
        if isinstance(target_sparsity, Mapping):
            if scope == "global":
                raise ValueError("scope='global' takes one target_sparsity (a float), got a mapping")
            for k in target_sparsity:
                if k not in self._groups:
                    raise UnknownNameError("group", k, names)
            missing = [k for k in names if k not in target_sparsity]
            if missing:
                raise ValueError(f"target_sparsity has no entry for group(s) {missing}; groups: {names}")
            targets = {k: check_target_sparsity(target_sparsity[k], f"target_sparsity[{k!r}]") for k in names}
        else:
            targets = {k: check_target_sparsity(target_sparsity) for k in names}
        if scope == "global":
            self.controllers = nn.ModuleDict({"global": LagrangianController(targets[names[0]], warmup_steps)})
        else:
            self.controllers = nn.ModuleDict({k: LagrangianController(targets[k], warmup_steps) for k in names})

    @property
    def group_names(self) -> list[str]:
        return list(self._groups)

    def gates(self, group: str | None = None) -> list[HardConcreteGate]:
        """The gates of one group, or of all groups."""
        if group is not None and group not in self._groups:
            raise UnknownNameError("group", group, self.group_names)
        keys = [group] if group is not None else self.group_names
        return [g for k in keys for g, _ in self._groups[k]]

    def full_size(self, group: str | None = None) -> float:
        if group is not None and group not in self._groups:
            raise UnknownNameError("group", group, self.group_names)
        return self._full[group] if group is not None else sum(self._full.values())

    def kept_sparsity(self, group: str | None = None) -> float:
        """Sparsity of the binary masks (what physical pruning will remove)."""
        keys = [group] if group is not None else self.group_names
        kept = sum(kept_size(self._groups[k]) for k in keys)
        return 1.0 - kept / self.full_size(group)

    def forward(self, step: int) -> BudgetTerm:
        sizes = {k: expected_size(v) for k, v in self._groups.items()}
        group_sparsity = {k: 1.0 - sizes[k] / self._full[k] for k in sizes}
        full = self.full_size()
        total = sum(sizes.values())
        if self.scope == "global":
            term = self.controllers["global"](total, full, step)
            return BudgetTerm(term.penalty, term.expected_sparsity, term.target, group_sparsity)
        terms = {k: self.controllers[k](sizes[k], self._full[k], step) for k in sizes}
        penalty = sum(t.penalty for t in terms.values())
        target = sum(terms[k].target * self._full[k] for k in terms) / full
        return BudgetTerm(penalty, 1.0 - total / full, target, group_sparsity)

    def freeze(self) -> "SparsityBudget":
        """End of pruning: freeze every controller and every gate (masks fixed for good)."""
        for c in self.controllers.values():
            c.freeze()
        for g in self.gates():
            g.freeze()
        return self

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{k}={int(v)}" for k, v in self._full.items())
        return f"scope={self.scope!r}, full_sizes=({sizes})"
