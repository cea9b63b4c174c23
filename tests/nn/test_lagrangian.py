"""Lagrangian controller: schedule, ascent sign, convergence from both sides, scopes, bad input."""

import math

import pytest
import torch

from vlkit.models.protocol import UnknownNameError
from vlkit.nn import HardConcreteGate, LagrangianController, SparsityBudget, expected_size, full_size, kept_size

P0 = 11 ** (2 / 3) / (1 + 11 ** (2 / 3))  # P(z > 0) at log_alpha = 0, default l, r, beta


# ----------------------------------------------------------------------------- sizes
def test_expected_and_full_size_hand_values():
    a = HardConcreteGate(2)  # both entries P0
    b = HardConcreteGate(3, init_log_alpha=[0.0, 10.0, -10.0])
    costs_b = torch.tensor([1.0, 2.0, 4.0])
    pairs = [(a, 10.0), (b, costs_b)]
    p_hi, p_lo = 1 / (1 + math.exp(-(10 + 1.598597))), 1 / (1 + math.exp(-(-10 + 1.598597)))
    assert expected_size(pairs).item() == pytest.approx(2 * 10 * P0 + 1 * P0 + 2 * p_hi + 4 * p_lo, rel=1e-6)
    assert full_size(pairs) == 27.0
    a.eval(), b.eval()
    # masks: a keeps 2 - round(0.336) = 2; b: E[#zeros] = .168 + 0 + 1 -> 1 zero, the -10 entry
    assert kept_size(pairs) == 20.0 + 1.0 + 2.0
    expected_size(pairs).backward()
    assert (a.log_alpha.grad > 0).all()


def test_cost_shape_is_checked():
    with pytest.raises(ValueError, match="3 values"):
        expected_size([(HardConcreteGate(3), torch.ones(2))])


# ----------------------------------------------------------------------------- schedule
def test_warmup_schedule_linear_from_zero_to_target():
    c = LagrangianController(0.6, warmup_steps=10)
    assert c.target(0) == 0.0
    assert c.target(10) == pytest.approx(0.6) and c.target(25) == pytest.approx(0.6)
    for step in range(11):
        assert c.target(step) == pytest.approx(0.06 * step)
    assert LagrangianController(0.6, warmup_steps=0).target(0) == 0.6
    with pytest.raises(ValueError, match="-1"):
        c.target(-1)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan")])
def test_bad_target_names_value_and_range(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)") as err:
        LagrangianController(bad, warmup_steps=5)
    assert repr(bad) in str(err.value)


def test_bad_warmup_steps():
    with pytest.raises(ValueError, match="warmup_steps.*-3"):
        LagrangianController(0.5, warmup_steps=-3)


# ----------------------------------------------------------------------------- ascent sign
def one_gate_problem(init_log_alpha: float, target: float):
    gate = HardConcreteGate(4, init_log_alpha=init_log_alpha)
    pairs = [(gate, 1.0)]
    ctl = LagrangianController(target, warmup_steps=0)
    return gate, pairs, ctl


@pytest.mark.parametrize("init, target, below", [(3.0, 0.5, True), (-3.0, 0.2, False)])
def test_sign_lambda_step_pushes_sparsity_toward_target(init, target, below):
    gate, pairs, ctl = one_gate_problem(init, target)
    lam_opt = torch.optim.SGD(ctl.parameters(), lr=1.0)  # positive lr: ascent comes from the controller
    term = ctl(expected_size(pairs), full_size(pairs), step=0)
    s0 = term.expected_sparsity.item()
    assert (s0 < target) == below
    term.penalty.backward()
    # the lambdas' .grad holds -d penalty / d lambda = -(s - t) and -(s - t)^2
    assert ctl.lambda_1.grad.item() == pytest.approx(-(s0 - target), rel=1e-5)
    assert ctl.lambda_2.grad.item() == pytest.approx(-((s0 - target) ** 2), rel=1e-5)
    assert gate.log_alpha.grad.abs().max() == 0  # lambdas start at 0: no push yet
    lam_opt.step()
    assert (ctl.lambda_1.item() < 0) == below  # s < t: lambda1 goes negative (and vice versa)
    assert ctl.lambda_2.item() > 0

    gate.log_alpha.grad = None
    term = ctl(expected_size(pairs), full_size(pairs), step=1)
    term.penalty.backward()
    # s < t: the penalty's gradient on log_alpha is positive, so descent lowers log_alpha and
    # raises sparsity; s > t: the opposite.
    assert ((gate.log_alpha.grad > 0).all() if below else (gate.log_alpha.grad < 0).all())
    with torch.no_grad():
        gate.log_alpha -= 0.5 * gate.log_alpha.grad
    s1 = ctl(expected_size(pairs), full_size(pairs), step=2).expected_sparsity.item()
    assert abs(s1 - target) < abs(s0 - target)
    assert (s1 > s0) == below


# ----------------------------------------------------------------------------- convergence
def train_toy(gates_by_group, budget, steps, task_fn, lr=0.1, seed=0, model_params=()):
    """log_alpha by descent, lambdas by (negated-gradient) descent = ascent; Adam for both."""
    gen = torch.Generator().manual_seed(seed)
    gates = [g for gs in gates_by_group.values() for g in gs]
    opt = torch.optim.Adam(
        [
            {"params": [g.log_alpha for g in gates] + list(model_params)},
            {"params": list(budget.parameters()), "weight_decay": 0.0},
        ],
        lr=lr,
    )
    for step in range(steps):
        zs = {k: [g(generator=gen) for g in gs] for k, gs in gates_by_group.items()}
        term = budget(step)
        loss = task_fn(zs) + term.penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    return budget(steps)


@pytest.mark.parametrize("init", [4.0, -4.0], ids=["start_below_target", "start_above_target"])
def test_converges_to_target_from_both_sides(init):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(int(init > 0))
    gates = [HardConcreteGate(8, init_log_alpha=init + 0.1 * torch.randn(8, generator=gen)) for _ in range(3)]
    costs = [10.0, torch.linspace(1.0, 5.0, 8), 3.0]
    budget = SparsityBudget({"all": list(zip(gates, costs))}, target_sparsity=0.5, warmup_steps=20)
    start = budget(0).expected_sparsity.item()
    assert (start < 0.1) if init > 0 else (start > 0.9)
    w = torch.randn(24, generator=gen)

    def task(zs):  # a small, arbitrary task term (some gates useful, some harmful)
        return 0.01 * (w * torch.cat(zs["all"])).mean()

    final = train_toy({"all": gates}, budget, steps=300, task_fn=task)
    assert final.target == 0.5
    assert final.expected_sparsity.item() == pytest.approx(0.5, abs=0.02)


def two_group_setup(scope, target):
    groups = {k: [HardConcreteGate(6, init_log_alpha=2.0) for _ in range(2)] for k in ("vision", "text")}
    budget = SparsityBudget({k: [(g, 5.0) for g in gs] for k, gs in groups.items()}, target, 30, scope)

    def task(zs):  # the vision structures are useful, the text ones are not
        return -0.05 * sum(z.mean() for z in zs["vision"])

    return groups, budget, task


def test_global_scope_is_modal_adaptive():
    groups, budget, task = two_group_setup("global", 0.5)
    assert list(budget.controllers) == ["global"]
    final = train_toy(groups, budget, steps=250, task_fn=task)
    assert final.expected_sparsity.item() == pytest.approx(0.5, abs=0.02)
    # one global budget: the useless modality pays for the useful one
    assert final.group_sparsity["text"].item() > final.group_sparsity["vision"].item() + 0.4


def test_per_group_scope_holds_each_group_to_its_target():
    groups, budget, task = two_group_setup("per_group", {"vision": 0.3, "text": 0.7})
    assert list(budget.controllers) == ["vision", "text"]
    final = train_toy(groups, budget, steps=400, task_fn=task)
    assert final.group_sparsity["vision"].item() == pytest.approx(0.3, abs=0.02)
    assert final.group_sparsity["text"].item() == pytest.approx(0.7, abs=0.02)
    assert final.target == pytest.approx(0.5)  # size-weighted mean of the group targets


# ----------------------------------------------------------------------------- freeze
def test_freeze_stops_lambda_updates_and_gates():
    groups, budget, task = two_group_setup("global", 0.5)
    train_toy(groups, budget, steps=20, task_fn=task)
    budget.freeze()
    ctl = budget.controllers["global"]
    lam = (ctl.lambda_1.item(), ctl.lambda_2.item())
    masks = [g.mask().clone() for g in budget.gates()]
    assert lam[1] > 0 and ctl.frozen and all(g.frozen for g in budget.gates())
    w = torch.nn.Parameter(torch.zeros(()))  # the model's own weights keep training

    def task_and_model(zs):
        return task(zs) + (w - 1) ** 2

    final = train_toy(groups, budget, steps=5, task_fn=task_and_model, model_params=[w])
    assert w.item() > 0.2
    assert (ctl.lambda_1.item(), ctl.lambda_2.item()) == lam
    assert all(torch.equal(g.mask(), m) for g, m in zip(budget.gates(), masks))
    assert not final.penalty.requires_grad
    # frozen gates report their masks: expected sparsity == the masks' sparsity
    assert final.expected_sparsity.item() == pytest.approx(budget.kept_sparsity(), abs=1e-6)


def test_controller_freeze_alone():
    gate, pairs, ctl = one_gate_problem(3.0, 0.5)
    with torch.no_grad():
        ctl.lambda_1.fill_(-0.2)
    ctl.freeze()
    term = ctl(expected_size(pairs), full_size(pairs), step=0)
    term.penalty.backward()
    assert ctl.lambda_1.grad is None and ctl.lambda_2.grad is None
    assert (gate.log_alpha.grad > 0).all()  # the (constant) multipliers still act on the gates
    fresh = LagrangianController(0.5)
    fresh.load_state_dict(ctl.state_dict())  # the frozen state travels with checkpoints
    assert fresh.frozen and fresh.lambda_1.item() == pytest.approx(-0.2) and not fresh.lambda_1.requires_grad


# ----------------------------------------------------------------------------- budget input
def test_budget_bad_input():
    groups = {"vision": [(HardConcreteGate(2), 1.0)], "text": [(HardConcreteGate(2), 1.0)]}
    with pytest.raises(UnknownNameError, match="global, per_group"):
        SparsityBudget(groups, 0.5, scope="uniform")
    with pytest.raises(UnknownNameError, match="'fusion'"):
        SparsityBudget(groups, {"vision": 0.5, "text": 0.5, "fusion": 0.5}, scope="per_group")
    with pytest.raises(ValueError, match="text"):
        SparsityBudget(groups, {"vision": 0.5}, scope="per_group")
    with pytest.raises(ValueError, match=r"target_sparsity\['text'\].*1.0"):
        SparsityBudget(groups, {"vision": 0.5, "text": 1.0}, scope="per_group")
    with pytest.raises(ValueError, match="one target_sparsity"):
        SparsityBudget(groups, {"vision": 0.5, "text": 0.5}, scope="global")
    with pytest.raises(ValueError, match="1.0"):
        SparsityBudget(groups, 1.0)
