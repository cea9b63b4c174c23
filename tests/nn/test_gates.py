"""Hard-concrete gates: sampling vs closed form, the binary eval rule, freezing, bad input.

Hand values use the paper's defaults l=-0.1, r=1.1, beta=2/3 (Louizos et al. 2018), for which
P(z > 0) = sigmoid(log_alpha + (2/3) ln 11) and P(z = 1) = sigmoid(log_alpha - (2/3) ln 11).
"""

import math

import pytest
import torch

from vlkit.nn import HardConcreteGate

LOG_ALPHAS = [-3.0, -1.0, 0.0, 1.5, 3.0]
DRAWS = 20_000


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@pytest.fixture(scope="module")
def mc_samples():
    """DRAWS independent training samples per log_alpha value, as one wide gate (entries are iid)."""
    init = torch.tensor(LOG_ALPHAS).repeat_interleave(DRAWS)
    gate = HardConcreteGate(init.numel(), init_log_alpha=init).train()
    with torch.no_grad():
        z = gate(generator=torch.Generator().manual_seed(0))
    return gate, z.view(len(LOG_ALPHAS), DRAWS)


def test_monte_carlo_p_nonzero_matches_closed_form(mc_samples):
    gate, z = mc_samples
    p_closed = gate.prob_nonzero().detach().view(len(LOG_ALPHAS), DRAWS)[:, 0]
    for i, la in enumerate(LOG_ALPHAS):
        p = p_closed[i].item()
        assert p == pytest.approx(sigmoid(la + (2 / 3) * math.log(11)), abs=1e-6)  # hand formula
        se = math.sqrt(p * (1 - p) / DRAWS)
        p_mc = (z[i] > 0).double().mean().item()
        assert abs(p_mc - p) < 4 * se, (la, p_mc, p, se)


def test_samples_in_unit_interval_and_hit_both_ends(mc_samples):
    _, z = mc_samples
    assert z.min() >= 0.0 and z.max() <= 1.0
    z0 = z[LOG_ALPHAS.index(0.0)]
    frac_zero = (z0 == 0).double().mean().item()
    frac_one = (z0 == 1).double().mean().item()
    # log_alpha = 0: P(z = 0) = 1 - 0.8318 = 0.1682 and, by symmetry of the stretch, P(z = 1) = 0.1682.
    p_end = 1 - 11 ** (2 / 3) / (1 + 11 ** (2 / 3))
    se = math.sqrt(p_end * (1 - p_end) / DRAWS)
    assert abs(frac_zero - p_end) < 4 * se
    assert abs(frac_one - p_end) < 4 * se
    inside = ((z0 > 0) & (z0 < 1)).double().mean().item()
    assert 0.5 < inside < 0.8  # the rest is spread over (0, 1)


def test_one_sample_per_call_seeded_and_differentiable():
    gate = HardConcreteGate(6, init_log_alpha=0.5).train()
    a = gate(generator=torch.Generator().manual_seed(1))
    b = gate(generator=torch.Generator().manual_seed(1))
    c = gate(generator=torch.Generator().manual_seed(2))
    assert a.shape == (6,) and torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    inside = (a > 0) & (a < 1)
    assert inside.any()
    assert (gate.log_alpha.grad[inside] > 0).all()  # larger log_alpha -> larger z
    assert (gate.log_alpha.grad[~inside] == 0).all()  # clamped ends pass no gradient


def test_expected_l0_hand_value_at_log_alpha_zero():
    gate = HardConcreteGate(3)
    # P(z > 0) = sigmoid((2/3) ln 11) = 11^(2/3) / (1 + 11^(2/3)) = 4.9461 / 5.9461 = 0.831822
    assert gate.expected_l0().item() == pytest.approx(3 * 0.831822, abs=1e-5)
    assert gate.expected_num_zeros() == pytest.approx(3 * 0.168178, abs=1e-5)


def test_eval_mask_hand_worked_five_gates():
    # log_alpha        -1.5    1.0    -2.0   -0.8   -1.0
    # P(z>0)          .5246  .9308  .4010  .6897  .6453   (sigmoid(log_alpha + 1.5986))
    # E[#zeros] = 5 - 3.1914 = 1.8086 -> round -> 2 zeros: the two smallest log_alpha (-2.0, -1.5).
    # (Thresholding P(z>0) at 0.5 would drop only one: the rule counts, it does not threshold.)
    gate = HardConcreteGate(5, init_log_alpha=[-1.5, 1.0, -2.0, -0.8, -1.0]).eval()
    assert gate.expected_num_zeros() == pytest.approx(1.8086, abs=1e-4)
    torch.manual_seed(0)
    m1 = gate()
    torch.manual_seed(123)
    m2 = gate(generator=torch.Generator().manual_seed(5))
    assert m1.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert torch.equal(m1, m2)  # deterministic, independent of any RNG
    assert gate.keep_indices().tolist() == [1, 3, 4]
    assert not m1.requires_grad


def test_eval_mask_keeps_n_minus_rounded_expected_zeros_property():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 40, (1,), generator=g))
        la = torch.randn(n, generator=g) * 4
        gate = HardConcreteGate(n, init_log_alpha=la.clamp(-10, 10)).eval()
        mask = gate()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        k = n - round(gate.expected_num_zeros())
        assert int(mask.sum()) == k
        if 0 < k < n:  # every kept gate has log_alpha >= every dropped one
            assert gate.log_alpha[mask == 1].min() >= gate.log_alpha[mask == 0].max()


def test_eval_mask_ties_go_to_lower_index():
    gate = HardConcreteGate(5, init_log_alpha=-1.0).eval()  # E[#zeros] = 5 * .3547 = 1.77 -> 2
    assert gate().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_log_alpha_clamped_in_forward_and_still_trainable():
    gate = HardConcreteGate(2, init_log_alpha=[0.0, 0.0], log_alpha_range=(-4.0, 4.0)).train()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([50.0, -50.0]))
    p = gate.prob_nonzero()
    assert gate.log_alpha.tolist() == [4.0, -4.0]
    p.sum().backward()
    assert (gate.log_alpha.grad > 0).all()  # not zeroed at the bound (clamp is outside the graph)


def test_freeze_fixes_the_mask_for_good():
    gate = HardConcreteGate(4, init_log_alpha=[3.0, -3.0, -2.5, 2.0])
    gate.freeze()
    assert gate.frozen and not gate.log_alpha.requires_grad
    expected = [1.0, 0.0, 0.0, 1.0]
    gate.train()
    for seed in range(3):
        assert gate(generator=torch.Generator().manual_seed(seed)).tolist() == expected
    with torch.no_grad():  # even if log_alpha is changed afterwards, the mask stays
        gate.log_alpha.copy_(torch.tensor([-3.0, 3.0, 3.0, -3.0]))
    assert gate().tolist() == expected
    assert gate.prob_nonzero().tolist() == expected and gate.expected_l0().item() == 2.0
    # the frozen state travels with the state dict
    fresh = HardConcreteGate(4)
    fresh.load_state_dict(gate.state_dict())
    assert fresh.frozen and not fresh.log_alpha.requires_grad
    assert fresh.train()().tolist() == expected and fresh.expected_num_zeros() == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), "n must be a positive int"),
        (dict(n=3, l=0.1), "l=0.1"),
        (dict(n=3, r=1.0), "r=1.0"),
        (dict(n=3, beta=0.0), "beta=0.0"),
        (dict(n=3, init_log_alpha=[0.0, 1.0]), "3 values"),
        (dict(n=2, init_log_alpha=11.0), r"inside log_alpha_range \[-10.0, 10.0\]"),
    ],
)
def test_bad_input_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardConcreteGate(**kwargs)
