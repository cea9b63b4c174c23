"""DAS skip policy (Wu et al. 2023, Sec. 3; official vilt_module_search.py): sampling without
replacement, exact inclusion probabilities, the update rule by hand, choice, resume, errors."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from vlkit.methods.das import SkipPolicy, reward_from_loss, sample_distinct
from vlkit.models.protocol import UnknownNameError

NAMES5 = ["En0", "En1", "En2", "En3", "En4"]


def logit(p):
    return math.log(p / (1 - p))


# ---------------------------------------------------------------- sampling
@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
def test_sample_never_repeats_a_unit(data, n, seed):
    k = data.draw(st.integers(1, n - 1))
    logits = data.draw(st.lists(st.floats(-800, 800), min_size=n, max_size=n))  # extremes: no 0/0
    names = [f"U{i}" for i in range(n)]
    pol = SkipPolicy(names, k, seed=seed)
    pol.set_logits(logits)
    for _ in range(5):
        s = pol.sample()
        assert len(s) == k and len(set(s)) == k and set(s) <= set(names)
    probs = pol.set_probs()
    assert len(probs) == math.comb(n, k) and math.isclose(sum(probs.values()), 1.0, rel_tol=1e-9)


def exact_sequential_probs(p, k):
    """Ordered draws without replacement, each ~ p over the remaining units: P(unordered set)."""
    out = {}
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, sum(p)
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        key = frozenset(order)
        out[key] = out.get(key, 0.0) + prob
    return out


def test_frequencies_match_exact_probabilities_of_sequential_sampling():
    p = [0.1, 0.3, 0.5, 0.7, 0.9]
    pol = SkipPolicy(NAMES5, 2, seed=11)
    pol.set_logits([logit(q) for q in p])
    sets = exact_sequential_probs(p, 2)
    assert math.isclose(sum(sets.values()), 1.0)
    incl = [sum(v for s, v in sets.items() if i in s) for i in range(5)]
    assert math.isclose(sum(incl), 2.0)
    # e.g. P(En0 in set) = 0.1/2.5 * sum_{j!=0} p_j/(2.5-0.1) + sum_{j!=0} p_j/2.5 * 0.1/(2.5-p_j)
    n = 20_000
    counts_u, counts_s = np.zeros(5), {}
    for _ in range(n):
        s = pol.sample()
        idx = frozenset(NAMES5.index(u) for u in s)
        for i in idx:
            counts_u[i] += 1
        counts_s[idx] = counts_s.get(idx, 0) + 1
    for i in range(5):  # 5 binomial standard errors
        se = math.sqrt(incl[i] * (1 - incl[i]) / n)
        assert abs(counts_u[i] / n - incl[i]) < 5 * se, (i, counts_u[i] / n, incl[i])
    for s, q in sets.items():
        se = math.sqrt(q * (1 - q) / n)
        assert abs(counts_s.get(s, 0) / n - q) < 5 * se, (sorted(s), q)
    # ... which is neither p_i (independent Bernoulli) nor k p_i / sum p (proportional to size):
    # for En4, 0.654 vs 0.9 vs 0.72 -- both more than 15 standard errors away
    assert incl[4] == pytest.approx(0.6540909090909091)
    se4 = math.sqrt(incl[4] * (1 - incl[4]) / n)
    for wrong in (p[4], 2 * p[4] / sum(p)):
        assert abs(counts_u[4] / n - wrong) > 15 * se4
    # the policy's own exact set probabilities (subset DP) agree with the enumeration
    exact = pol.set_probs()
    assert len(exact) == 10
    for s, q in sets.items():
        assert exact[tuple(NAMES5[i] for i in sorted(s))] == pytest.approx(q, rel=1e-12)


def test_sampling_is_seeded_and_independent_of_global_rng():
    a, b = SkipPolicy(NAMES5, 2, seed=5), SkipPolicy(NAMES5, 2, seed=5)
    seq_a = []
    for i in range(20):
        torch.manual_seed(i)
        np.random.seed(i)
        seq_a.append(a.sample())
        torch.rand(3), np.random.rand(3)
    seq_b = [b.sample() for _ in range(20)]
    assert seq_a == seq_b
    assert [SkipPolicy(NAMES5, 2, seed=6).sample() for _ in range(20)] != seq_a


# ---------------------------------------------------------------- update rule
def test_update_rule_hand_worked():
    pol = SkipPolicy(["a", "b", "c"], 2, lr=2.0)
    # Round 1: p = .5 for all, p(1-p) = .25; rewards 1.0, 0.0 -> mean .5
    #   a in {a,b}:         2 * (1 - .5) * .25               = +0.25
    #   b in {a,b},{b,c}:   2 * (1 - .5) * .25 + 2 * (0 - .5) * .25 = 0
    #   c in {b,c}:         2 * (0 - .5) * .25               = -0.25
    pol.update([("a", "b"), ("b", "c")], [1.0, 0.0])
    assert pol.logits() == pytest.approx({"a": 0.25, "b": 0.0, "c": -0.25}, abs=1e-15)
    # Round 2: p_a = sigmoid(.25) = 0.5621765008857981, g_a = p_a(1-p_a) = 0.24613408273759835,
    #   g_b = .25, g_c = g_a; sets {a,b}:.9 {a,c}:.2 {b,c}:.4 -> mean .5
    #   a: 2 * ((.9-.5) + (.2-.5)) * g_a = 0.2 * g_a  -> 0.25 + 0.04922681654751967 = 0.2992268165475197
    #   b: 2 * ((.9-.5) + (.4-.5)) * g_b = 0.6 * .25  -> 0.15
    #   c: 2 * ((.2-.5) + (.4-.5)) * g_c = -0.8 * g_a -> -0.25 - 0.19690726619007868 = -0.4469072661900787
    # (p is read once per round: updating a after {a,b} and re-reading p_a for {a,c} would differ)
    probs = pol.update([("a", "b"), ("c", "a"), ("b", "c")], [0.9, 0.2, 0.4])
    assert pol.logits() == pytest.approx({"a": 0.2992268165475197, "b": 0.15, "c": -0.4469072661900787}, abs=1e-12)
    assert probs == pytest.approx({n: 1 / (1 + math.exp(-v)) for n, v in pol.logits().items()})
    assert len(pol.history) == 3 and pol.history[0] == [0.5, 0.5, 0.5]
    assert pol.history[1] == pytest.approx([1 / (1 + math.exp(-v)) for v in (0.25, 0.0, -0.25)])
    assert pol.history[2] == pytest.approx(list(probs.values()))


def test_equal_rewards_change_nothing_and_reward_is_exp_minus_loss():
    pol = SkipPolicy(NAMES5, 2)
    pol.update([("En0", "En1"), ("En2", "En3")], [0.7, 0.7])
    assert all(v == 0.0 for v in pol.logits().values())
    assert reward_from_loss(0.5) == pytest.approx(math.exp(-0.5))


# ---------------------------------------------------------------- choice
def test_best_picks_highest_logits_ties_by_unit_order():
    pol = SkipPolicy(NAMES5, 2)
    pol.set_logits([0.3, 1.0, 1.0, -2.0, 0.3])
    assert pol.ranking() == ["En1", "En2", "En0", "En4", "En3"]
    assert pol.best() == ("En1", "En2")
    pol3 = SkipPolicy(NAMES5, 3)
    pol3.set_logits({"En4": 0.3, "En0": 0.3, "En1": 1.0, "En2": 1.0, "En3": -2.0})
    assert pol3.best() == ("En0", "En1", "En2")  # En0 beats En4 on the tie; listed in unit order
    pol3.set_logits([0.0, 0.0, 0.0, 0.0, 5.0])
    assert pol3.best() == ("En0", "En1", "En4")


# ---------------------------------------------------------------- state
def test_state_round_trip_gives_identical_future():
    pol = SkipPolicy(NAMES5, 2, lr=0.5, seed=3)
    for _ in range(3):
        sets = sample_distinct(pol, 4)
        pol.update(sets, [0.1, 0.5, 0.2, 0.9])
    state = json.loads(json.dumps(pol.state_dict()))  # JSON-serialisable
    resumed = SkipPolicy(NAMES5, 2, seed=999)
    resumed.load_state_dict(state)
    assert resumed.logits() == pol.logits() and resumed.history == pol.history and resumed.lr == 0.5
    assert [resumed.sample() for _ in range(10)] == [pol.sample() for _ in range(10)]
    assert sample_distinct(resumed, 5) == sample_distinct(pol, 5)
    with pytest.raises(ValueError, match="k=2.*k=3"):
        SkipPolicy(NAMES5, 3).load_state_dict(state)
    with pytest.raises(ValueError, match="units"):
        SkipPolicy(NAMES5[:4], 2).load_state_dict(state)


# ---------------------------------------------------------------- distinct sets
def test_sample_distinct():
    pol = SkipPolicy(NAMES5, 2, seed=1)
    pol.set_logits([5.0, 5.0, -5.0, -5.0, -5.0])  # peaked: rejection alone would stall
    sets = sample_distinct(pol, 10)  # all C(5, 2) = 10 (the last ones by the exact fallback)
    assert len(sets) == 10 and len({frozenset(s) for s in sets}) == 10
    assert all(list(s) == sorted(s, key=NAMES5.index) for s in sets)  # canonical unit order
    assert sets[0] == ("En0", "En1")
    with pytest.raises(ValueError, match="S=11.*C\\(5, 2\\) = 10"):
        sample_distinct(pol, 11)
    with pytest.raises(ValueError, match="positive"):
        sample_distinct(pol, 0)


def test_sample_distinct_exact_fallback_follows_the_set_distribution():
    names = NAMES5[:4]
    pol = SkipPolicy(names, 2, seed=2)
    pol.set_logits([logit(q) for q in (0.2, 0.4, 0.6, 0.8)])
    exact = pol.set_probs()
    n, counts = 6_000, {}
    for _ in range(n):
        (s,) = sample_distinct(pol, 1, max_tries=0)  # skip rejection: exact path only
        counts[s] = counts.get(s, 0) + 1
    for s, q in exact.items():
        assert abs(counts.get(s, 0) / n - q) < 5 * math.sqrt(q * (1 - q) / n), (s, q)
    # with sets already seen, the rest are drawn among unseen sets only
    sets = sample_distinct(pol, 6, max_tries=2)
    assert len({frozenset(s) for s in sets}) == 6


# ---------------------------------------------------------------- errors
def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="k=5.*En0, En1"):
        SkipPolicy(NAMES5, 5)
    with pytest.raises(ValueError, match="k=0"):
        SkipPolicy(NAMES5, 0)
    with pytest.raises(ValueError, match="duplicate unit names \\['En1'\\]"):
        SkipPolicy(["En0", "En1", "En1"], 1)
    with pytest.raises(ValueError, match="empty"):
        SkipPolicy([], 1)
    with pytest.raises(ValueError, match="non-empty strings, got ''"):
        SkipPolicy(["En0", ""], 1)
    pol = SkipPolicy(NAMES5, 2)
    with pytest.raises(ValueError, match="2 skip sets but 1 rewards"):
        pol.update([("En0", "En1"), ("En2", "En3")], [1.0])
    with pytest.raises(UnknownNameError, match="'En9'.*En0, En1, En2, En3, En4"):
        pol.update([("En0", "En1"), ("En2", "En9")], [1.0, 0.0])
    with pytest.raises(ValueError, match="twice"):
        pol.update([("En0", "En0")], [1.0])
    with pytest.raises(ValueError, match="k=2"):
        pol.update([("En0", "En1", "En2")], [1.0])
    with pytest.raises(ValueError, match="finite"):
        pol.update([("En0", "En1"), ("En2", "En3")], [1.0, float("nan")])
    # nothing changed by the failed calls
    assert all(v == 0.0 for v in pol.logits().values()) and len(pol.history) == 1
