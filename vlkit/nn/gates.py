"""Hard-concrete L0 gates: one stochastic keep-mask vector per pruned structure.

Implements the hard-concrete distribution of Louizos, Welling & Kingma (2018), "Learning
Sparse Neural Networks through L0 Regularization" (ICLR), as used for structured pruning by
CoFi (Xia, Zhong & Chen, ACL 2022) and EfficientVLM (Wang et al., ACL Findings 2023, Sec. 3.3).

A :class:`HardConcreteGate` owns ``log_alpha`` of shape ``(n,)`` -- one entry per prunable
structure (the heads of one attention layer, the FFN units of one layer, ...) -- and returns a
mask ``z`` of shape ``(n,)`` on every call; the gated model multiplies each structure's output
by its entry of ``z``. One gate should cover the structures of *one* layer and kind: the eval
rule below rounds the expected number of zeros per gate, exactly as the reference code rounds
per layer (``_deterministic_z`` is applied row by row).

Training (Louizos et al. Eq. 10; CoFi ``_sample_z``)::

    u ~ U(eps, 1 - eps)                                  one draw per entry, shared by the batch
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (r - l) + l, 0, 1)

Closed form used by the size constraint (Louizos et al. Eq. 12; CoFi ``1 - cdf_qz(0)``)::

    P(z > 0) = sigmoid(log_alpha - beta * log(-l / r))

It follows from the sampling rule: ``z > 0`` iff ``s > -l / (r - l)``, iff
``logit(u) > beta * log(-l / r) - log_alpha``, and ``logit(u)`` is standard logistic.
(Unlike the reference ``cdf_qz`` we do not clamp this probability to ``[eps, 1 - eps]``;
the difference is at most ``1e-6`` per entry.)

Evaluation (EfficientVLM's ``_deterministic_z``, which follows CoFi / FLOP): a **binary**
mask keeping the ``n - round(E[#zeros])`` entries with the largest ``log_alpha``, where
``E[#zeros] = sum(1 - P(z > 0))`` and ``round`` is Python's (half to even), as in the
reference. CoFi keeps a soft value ``sigmoid(0.8 * log_alpha / beta)`` on the kept entries;
EfficientVLM (and we) keep exactly 1, so the masked model equals the physically pruned one.
Ties in ``log_alpha`` are broken towards the lower index (stable sort), so the mask is a pure
function of ``log_alpha``.

``log_alpha`` range: the reference code clamps it in place after every optimiser step
(``constrain_parameters``) to ``[log 1e-2, log 1e2] = [-4.61, 4.61]``, which bounds
``P(z > 0)`` below by about 0.047. We clamp it in place (without touching autograd, like the
reference) at the start of every :meth:`~HardConcreteGate.forward`,
:meth:`~HardConcreteGate.prob_nonzero` and :meth:`~HardConcreteGate.deterministic_mask`
call, so a caller cannot forget it, to ``log_alpha_range = (-10, 10)`` by default (``P(z > 0)``
then spans about ``[2e-4, 1 - 2e-5]``). Pass ``log_alpha_range=(-math.log(100),
math.log(100))`` for the reference range. :meth:`~HardConcreteGate.constrain_` does the
same clamp explicitly. A parameter held at a bound still gets gradients (the clamp is not in
the graph), so it can move back inside.

Freezing (our choice, differs from the reference code): :meth:`~HardConcreteGate.freeze`
stores the current eval mask and from then on the gate returns that mask in training and in
evaluation, reports it as ``prob_nonzero``, and ``log_alpha`` stops receiving gradients.
EfficientVLM's code, after its ``stop_prune`` epoch, uses the deterministic masks in the
forward pass but keeps stepping ``log_alpha`` (and the Lagrangian), so its masks can still
change; ours cannot. The frozen state is saved in ``state_dict`` (buffers).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["HardConcreteGate"]


class HardConcreteGate(nn.Module):
    """A vector of ``n`` hard-concrete L0 gates (Louizos et al. 2018; CoFi; EfficientVLM).

    Args:
        n: number of gated structures (e.g. heads of one layer, FFN units of one layer).
        init_log_alpha: initial ``log_alpha``: a float (all entries) or ``n`` values. ``0``
            is CoFi's FFN init (drop rate 0.5); the reference inits heads at ``10``.
        l, r: stretch interval ``(gamma, zeta)``, ``l < 0`` and ``r > 1`` (paper: -0.1, 1.1).
        beta: temperature, ``> 0`` (paper: 2/3).
        eps: the uniform noise is drawn from ``U(eps, 1 - eps)`` (reference: 1e-6).
        log_alpha_range: ``(low, high)`` that ``log_alpha`` is clamped to (see module doc).

    Call ``gate(generator=None)``: in training mode (and not frozen) a fresh sample ``z``
    (differentiable w.r.t. ``log_alpha``), one per call for the whole batch; otherwise the
    binary eval mask. Both have shape ``(n,)`` and the dtype/device of ``log_alpha``.

    >>> gate = HardConcreteGate(4, init_log_alpha=[3.0, -3.0, -2.5, 2.0]).eval()
    >>> round(gate.expected_l0().item(), 3), gate().tolist()  # E[#zeros] = 1.55 -> 2 zeros
    (2.45, [1.0, 0.0, 0.0, 1.0])
    """

    log_alpha: nn.Parameter

    def __init__(
        self,
        n: int,
        init_log_alpha: float | Sequence[float] | Tensor = 0.0,
        l: float = -0.1,
        r: float = 1.1,
        beta: float = 2.0 / 3.0,
        *,
        eps: float = 1e-6,
        log_alpha_range: tuple[float, float] = (-10.0, 10.0),
    ):
        super().__init__()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int (number of gated structures), got {n!r}")
        if not (l < 0.0):
            raise ValueError(f"l (gamma) must be < 0 so that z hits exactly 0, got l={l!r}")
        if not (r > 1.0):
            raise ValueError(f"r (zeta) must be > 1 so that z hits exactly 1, got r={r!r}")
        if not (beta > 0.0):
            raise ValueError(f"beta (temperature) must be > 0, got beta={beta!r}")
        if not (0.0 < eps < 0.5):
            raise ValueError(f"eps must be in (0, 0.5), got eps={eps!r}")
        lo, hi = (float(v) for v in log_alpha_range)
        if not (lo < hi):
            raise ValueError(f"log_alpha_range must be (low, high) with low < high, got {log_alpha_range!r}")
        self.n, self.l, self.r, self.beta, self.eps = n, float(l), float(r), float(beta), float(eps)
        self.log_alpha_range = (lo, hi)

        init = torch.as_tensor(init_log_alpha, dtype=torch.float32).detach().clone()
        if init.ndim == 0:
            init = init.expand(n).clone()
        if init.shape != (n,):
            raise ValueError(f"init_log_alpha must be a float or {n} values, got shape {tuple(init.shape)}")
        if not torch.isfinite(init).all() or init.min() < lo or init.max() > hi:
            raise ValueError(
                f"init_log_alpha must be finite and inside log_alpha_range [{lo}, {hi}], "
                f"got values in [{init.min().item()}, {init.max().item()}]"
            )
        self.log_alpha = nn.Parameter(init)
        # Frozen state lives in buffers so that it travels with state_dict / checkpoints.
        self.register_buffer("frozen_mask", torch.ones(n))
        self.register_buffer("is_frozen", torch.zeros((), dtype=torch.bool))
        # Python mirror of ``is_frozen``: reading a CUDA buffer every call would sync the device.
        self._frozen = False
        self.register_load_state_dict_post_hook(_sync_frozen_flag)

    # ------------------------------------------------------------------ parameters
    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def log_ratio(self) -> float:
        """``beta * log(-l / r)``: ``P(z > 0) = sigmoid(log_alpha - log_ratio)``."""
        return self.beta * math.log(-self.l / self.r)

    def constrain_(self) -> "HardConcreteGate":
        """Clamp ``log_alpha`` in place to ``log_alpha_range`` (reference: ``constrain_parameters``).

        Done through ``.data`` so autograd's version counter is untouched (as the reference
        does); called automatically before every use of ``log_alpha``.
        """
        with torch.no_grad():
            self.log_alpha.data.clamp_(*self.log_alpha_range)
        return self

    # ------------------------------------------------------------------ distribution
    def prob_nonzero(self) -> Tensor:
        """``P(z_i > 0) = sigmoid(log_alpha_i - beta * log(-l / r))``, shape ``(n,)``.

        Differentiable w.r.t. ``log_alpha`` (Louizos et al. Eq. 12). Once frozen, the frozen
        mask (a constant: the gate is then deterministic).
        """
        if self.frozen:
            return self.frozen_mask.to(self.log_alpha.dtype).clone()
        self.constrain_()
        return torch.sigmoid(self.log_alpha - self.log_ratio)

    def expected_l0(self) -> Tensor:
        """Expected number of non-zero gates, ``sum_i P(z_i > 0)`` (Louizos et al. Eq. 12)."""
        return self.prob_nonzero().sum()

    def expected_num_zeros(self) -> float:
        """``E[#zeros] = sum_i (1 - P(z_i > 0))`` as a Python float (float64); frozen: the mask's zeros."""
        if self.frozen:
            return float(self.n - self.frozen_mask.double().sum())
        return self._expected_zeros_from_log_alpha()

    def _expected_zeros_from_log_alpha(self) -> float:
        self.constrain_()
        p = torch.sigmoid(self.log_alpha.detach().double() - self.log_ratio)
        return float((1.0 - p).sum())

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One training sample ``z`` in ``[0, 1]^n`` (differentiable), whatever the mode."""
        self.constrain_()
        la = self.log_alpha
        u = torch.rand(self.n, generator=generator, device=la.device, dtype=la.dtype)
        u = self.eps + (1.0 - 2.0 * self.eps) * u
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
        return torch.clamp(s * (self.r - self.l) + self.l, 0.0, 1.0)

    @torch.no_grad()
    def deterministic_mask(self) -> Tensor:
        """The binary eval mask: keep the ``n - round(E[#zeros])`` largest ``log_alpha``.

        EfficientVLM ``_deterministic_z`` (binary variant of CoFi's). Ignores the frozen
        state (see :meth:`mask` for the mask the gate actually applies).
        """
        num_zeros = min(self.n, max(0, round(self._expected_zeros_from_log_alpha())))
        la = self.log_alpha.detach()
        order = torch.argsort(la, descending=True, stable=True)
        mask = torch.zeros_like(la)
        mask[order[: self.n - num_zeros]] = 1.0
        return mask

    def mask(self) -> Tensor:
        """The binary mask applied outside training: the frozen one, or the eval rule's."""
        if self.frozen:
            return self.frozen_mask.to(self.log_alpha.dtype).clone()
        return self.deterministic_mask()

    def keep_indices(self) -> Tensor:
        """Sorted indices of the entries kept by :meth:`mask` (for physical pruning)."""
        return torch.nonzero(self.mask() > 0, as_tuple=False).flatten()

    # ------------------------------------------------------------------ module
    def forward(self, generator: torch.Generator | None = None) -> Tensor:
        """``z`` of shape ``(n,)``: a sample in training (unless frozen), else the binary mask.

        ``generator`` (optional, on ``log_alpha``'s device) seeds the sample; without it the
        global RNG of that device is used. The eval / frozen mask uses no randomness.
        """
        if self.training and not self.frozen:
            return self.sample(generator)
        return self.mask()

    @torch.no_grad()
    def freeze(self) -> "HardConcreteGate":
        """Fix the current eval mask for good: no more sampling, no more gradient to ``log_alpha``."""
        self.frozen_mask.copy_(self.deterministic_mask())
        self.is_frozen.fill_(True)
        self._frozen = True
        self.log_alpha.requires_grad_(False)
        return self

    def extra_repr(self) -> str:
        return (
            f"n={self.n}, l={self.l}, r={self.r}, beta={self.beta:.4g}, "
            f"log_alpha_range={self.log_alpha_range}, frozen={self.frozen}"
        )


def _sync_frozen_flag(module, incompatible_keys) -> None:
    """After ``load_state_dict``: mirror the loaded ``is_frozen`` buffer in the Python flag."""
    module._frozen = bool(module.is_frozen)
    module.log_alpha.requires_grad_(not module._frozen)
