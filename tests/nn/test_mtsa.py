"""SHERL's MTSA: the redundancy-normalised aggregation (Eq. 2-3) by hand, its degenerate
cases, the module's shapes, gate, gradients, parameter count and errors."""

import pytest
import torch

from vlkit.models.protocol import UnknownNameError
from vlkit.nn.mtsa import (
    AGGREGATORS,
    MTSA,
    aggregation_weights,
    mtsa_num_parameters,
    redundancy,
    redundancy_aggregate,
)

D, L, R, B, K = 32, 4, 4, 2, 5  # tiny module: width 32, 4 shallow features, d = 8


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# A batch of one sample and three tokens, d = 2, M = 4.
#   token 0: a cohort of three identical features [1,0] beside one distinct [0,1]; guide [1,1]
#   token 1: the same directions with different lengths [2,0],[1,0],[0.5,0],[0,1]; guide [1,1]
#   token 2: guide [-1,0]: every score <= 0
E_HAND = t([[[[1, 0], [1, 0], [1, 0], [0, 1]],
             [[2, 0], [1, 0], [0.5, 0], [0, 1]],
             [[1, 0], [1, 0], [1, 0], [0, 1]]]])
e_HAND = t([[[1, 1], [1, 1], [-1, 0]]])


def test_redundancy_aggregate_matches_hand_computation():
    # Tokens 0 and 1: rows l2-normalised are [1,0],[1,0],[1,0],[0,1]; S = Ẽ Ẽᵀ has a 3x3
    # block of ones for the cohort and 1 on the distinct feature's diagonal, 0 elsewhere:
    # r = ReLU(S)·1 = [3, 3, 3, 1].
    S_cohort = t([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]])
    r_hand = S_cohort.sum(-1)
    assert r_hand.tolist() == [3, 3, 3, 1]
    torch.testing.assert_close(redundancy(E_HAND)[0, :2], torch.stack([r_hand, r_hand]))

    # token 0: scores e·E_j = [1, 1, 1, 1]; /r = [1/3, 1/3, 1/3, 1]; sum 2 ->
    #   m = [1/6, 1/6, 1/6, 1/2];  e' = (1/2)[1,0] + (1/2)[0,1] + [1,1] = [1.5, 1.5]
    # token 1: scores [2, 1, 0.5, 1]; /r = [2/3, 1/3, 1/6, 1]; sum 13/6 ->
    #   m = [4/13, 2/13, 1/13, 6/13]
    #   e' = (8/13 + 2/13 + 0.5/13)[1,0] + (6/13)[0,1] + [1,1] = [47/26, 19/13]
    # token 2: scores [-1, -1, -1, 0] -> ReLU gives all zeros -> m = 0, e' = e = [-1, 0]
    m_hand = t([[[1 / 6, 1 / 6, 1 / 6, 1 / 2], [4 / 13, 2 / 13, 1 / 13, 6 / 13], [0, 0, 0, 0]]])
    out_hand = t([[[1.5, 1.5], [47 / 26, 19 / 13], [-1, 0]]])
    torch.testing.assert_close(aggregation_weights(e_HAND, E_HAND), m_hand)
    torch.testing.assert_close(redundancy_aggregate(e_HAND, E_HAND), out_hand)


def test_redundancy_term_moves_weight_from_cohort_to_distinct_feature():
    # LinearA (r = 1) on token 0: m = [1/4]*4 and e' = [3/4, 1/4] + [1, 1] = [1.75, 1.25].
    m_lin = aggregation_weights(e_HAND, E_HAND, redundancy_mode="none")[0, 0]
    torch.testing.assert_close(m_lin, t([0.25, 0.25, 0.25, 0.25]))
    torch.testing.assert_close(
        redundancy_aggregate(e_HAND, E_HAND, redundancy_mode="none")[0, 0], t([1.75, 1.25])
    )
    m_red = aggregation_weights(e_HAND, E_HAND)[0, 0]
    assert m_red[:3].sum() == pytest.approx(0.5) and m_lin[:3].sum() == pytest.approx(0.75)
    assert m_red[:3].sum() < m_lin[:3].sum()  # the cohort loses weight ...
    assert m_red[3] > m_lin[3]  # ... and the distinct feature gains it (1/2 vs 1/4)


def test_explicit_redundancy_tensor_is_used_as_r():
    # LinearA(r) hook: r = [3, 3, 3, 1] passed by hand reproduces the similarity result;
    # r = 1 reproduces LinearA.
    r = t([3, 3, 3, 1])
    torch.testing.assert_close(
        aggregation_weights(e_HAND, E_HAND, redundancy_mode=r)[0, 0], t([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    )
    torch.testing.assert_close(
        aggregation_weights(e_HAND, E_HAND, redundancy_mode=torch.ones(4, dtype=torch.float64)),
        aggregation_weights(e_HAND, E_HAND, redundancy_mode="none"),
    )


def test_zero_rows_are_finite_and_leave_other_rows_unchanged():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    e = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    E0 = E.clone()
    E0[1, 2, 3] = 0  # one zero shallow-feature row
    E0[2, 0] = 0  # a token whose shallow features are all zero

    r = redundancy(E0)
    assert r[1, 2, 3] == 0 and (r[2, 0] == 0).all()
    assert (r[E0.abs().sum(-1) > 0] >= 1 - 1e-12).all()  # self-similarity: r >= 1

    out = redundancy_aggregate(e, E0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2, 0], e[2, 0])  # nothing to aggregate: e' = e
    # the zero row behaves as if it were absent from that token
    keep = [0, 1, 2, 4]
    torch.testing.assert_close(out[1, 2], redundancy_aggregate(e[1, 2], E[1, 2, keep]))
    # a zero row in one sample does not change any other sample / token
    clean = redundancy_aggregate(e, E)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = mask[2, 0] = False
    torch.testing.assert_close(out[mask], clean[mask])
    torch.testing.assert_close(redundancy_aggregate(e[:1], E0[:1]), clean[:1])

    # gradients stay finite through zero rows and all-zero scores
    E0.requires_grad_(True)
    e2 = e.clone().requires_grad_(True)
    redundancy_aggregate(e2, E0).square().sum().backward()
    assert torch.isfinite(E0.grad).all() and torch.isfinite(e2.grad).all()


def test_learned_score_with_zero_row_gets_zero_weight():
    # a zero row with a positive learned score must not take weight (0/0 limit is 0)
    E = t([[[[1, 0], [0, 0], [0, 1]]]])
    e = t([[[1, 1]]])
    m = aggregation_weights(e, E, scores=t([[[1.0, 5.0, 1.0]]]))
    torch.testing.assert_close(m, t([[[0.5, 0.0, 0.5]]]))


def feats(seed=0, n=L):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, K, D, generator=g) for _ in range(n)], torch.randn(B, K, D, generator=g)


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_every_aggregator_shape_gate_and_gradients(aggregator):
    torch.manual_seed(0)
    m = MTSA(D, L, R, aggregator=aggregator)
    xs, x_last = feats()
    out = m(xs, x_last)
    assert out.shape == (B, K, D) and torch.isfinite(out).all()
    # gate: tanh(α/T) = 0 at init, so the output is exactly up(e')
    assert m.gate().item() == 0
    e, E = m.project(xs)
    assert e.shape == (B, K, D // R) and E.shape == (B, K, L - 1, D // R)
    torch.testing.assert_close(out, m.up(m.aggregate(e, E)), rtol=0, atol=0)
    # the output does not depend on x_last at init ...
    torch.testing.assert_close(m(xs, x_last * 7), out, rtol=0, atol=0)
    # ... but α gets a gradient through it, as do every projection
    out.square().sum().backward()
    assert m.alpha.grad is not None and m.alpha.grad.abs().item() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for tier in m.tiers:  # every shallow feature's projection is trained
        assert tier.down.weight.grad.abs().sum() > 0
    assert m.up.weight.grad.abs().sum() > 0
    assert m.tiers[-1].gate.weight.grad.abs().sum() > 0  # the guide's tier


def test_gate_opens_and_mixes_x_last():
    torch.manual_seed(0)
    m = MTSA(D, L, R)
    xs, x_last = feats(1)
    with torch.no_grad():
        m.alpha.fill_(0.05)  # tanh(0.5)
    e, E = m.project(xs)
    expected = m.up(m.aggregate(e, E)) + torch.tanh(torch.tensor(0.5)) * x_last
    torch.testing.assert_close(m(xs, x_last), expected)


def test_module_matches_pure_function_and_guide_is_last_feature():
    torch.manual_seed(0)
    m = MTSA(D, L, R, aggregator="mtsa")
    xs, x_last = feats(2)
    e, E = m.project(xs)
    torch.testing.assert_close(e, m.tiers[-1](xs[-1]))
    torch.testing.assert_close(E[:, :, 0], m.tiers[0](xs[0]))
    torch.testing.assert_close(m.aggregate(e, E), redundancy_aggregate(e, E))
    lin = MTSA(D, L, R, aggregator="lineara")
    lin.load_state_dict(m.state_dict())
    torch.testing.assert_close(lin.aggregate(e, E), redundancy_aggregate(e, E, redundancy_mode="none"))
    # LinearA(r) starts at r = 1, i.e. equal to LinearA
    lr = MTSA(D, L, R, aggregator="lineara_r")
    lr.load_state_dict(m.state_dict(), strict=False)
    torch.testing.assert_close(lr.aggregate(e, E), lin.aggregate(e, E))
    torch.testing.assert_close(MTSA(D, L, R, aggregator="avepool").aggregate(e, E), E.mean(-2) + e)
    torch.testing.assert_close(MTSA(D, L, R, aggregator="maxpool").aggregate(e, E), E.amax(-2) + e)


def test_learned_score_changes_weights():
    torch.manual_seed(0)
    m = MTSA(D, L, R, score="learned")
    xs, x_last = feats(3)
    e, E = m.project(xs)
    scores = m.score_fc(e.unsqueeze(-2) * E).squeeze(-1)
    torch.testing.assert_close(m.aggregate(e, E), redundancy_aggregate(e, E, scores=scores))
    m(xs, x_last).sum().backward()
    assert m.score_fc.weight.grad.abs().sum() > 0


def test_parameter_count_d384_r8_5_layers():
    # d = 48. per tier: down 384*48 + 48 = 18,480; gate + linear 2*(48*48 + 48) = 4,704
    # -> 23,184; five tiers 115,920; up 48*384 + 384 = 18,816; α 1  => 134,737
    m = MTSA(384, 5, 8)
    assert sum(p.numel() for p in m.parameters()) == 134_737 == mtsa_num_parameters(384, 5, 8)
    # the variants add: learned score 48 + 1; lineara_r 4 (M = 4); mhsa 4*48*48 + 4*48
    for kw, extra in [({"score": "learned"}, 49), ({"aggregator": "lineara_r"}, 4),
                      ({"aggregator": "mhsa"}, 9408), ({"norm": True}, 768)]:
        n = sum(p.numel() for p in MTSA(384, 5, 8, **kw).parameters())
        assert n == 134_737 + extra == mtsa_num_parameters(384, 5, 8, **kw), kw


def test_accepts_any_count_of_at_least_two_features():
    torch.manual_seed(0)
    for n in (2, 7):
        xs, x_last = feats(4, n)
        assert MTSA(D, n, R)(xs, x_last).shape == (B, K, D)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(UnknownNameError, match=r"aggregator 'attention'.*maxpool.*mhsa"):
        MTSA(D, L, R, aggregator="attention")
    with pytest.raises(UnknownNameError, match=r"score 'cosine'.*inner, learned"):
        MTSA(D, L, R, score="cosine")
    with pytest.raises(ValueError, match=r"reduction factor 5 does not divide the width 32"):
        MTSA(D, L, 5)
    with pytest.raises(ValueError, match=r"at least 2 shallow features.*num_layers=1"):
        MTSA(D, 1, R)
    with pytest.raises(ValueError, match=r"4 heads.*reduced width 2"):
        MTSA(D, L, 16, aggregator="mhsa")
    with pytest.raises(ValueError, match=r"score='learned'.*maxpool"):
        MTSA(D, L, R, aggregator="maxpool", score="learned")
    m = MTSA(D, L, R)
    xs, x_last = feats()
    with pytest.raises(ValueError, match=r"built for 4 shallow features; got 3"):
        m(xs[:3], x_last)
    with pytest.raises(ValueError, match=r"shallow feature 2 has shape \(2, 5, 16\)"):
        m(xs[:2] + [torch.randn(B, K, 16)] + xs[3:], x_last)
    with pytest.raises(ValueError, match=r"x_last has shape \(2, 4, 32\)"):
        m(xs, x_last[:, :4])
    with pytest.raises(UnknownNameError, match=r"redundancy mode 'cosine'.*similarity, none"):
        aggregation_weights(e_HAND, E_HAND, redundancy_mode="cosine")
    with pytest.raises(ValueError, match=r"got e \(1, 3, 3\) and E \(1, 3, 4, 2\)"):
        redundancy_aggregate(torch.zeros(1, 3, 3, dtype=torch.float64), E_HAND)
    with pytest.raises(ValueError, match=r"scores must have shape \(1, 3, 4\)"):
        aggregation_weights(e_HAND, E_HAND, scores=torch.zeros(1, 3, 3, dtype=torch.float64))


def test_per_layer_input_widths():
    """``in_dims``: each tier down-projects from its own width (the CNN case: stages of different
    channel counts); x_last and the output keep ``dim``."""
    widths = [8, 16, 32]
    m = MTSA(D, 3, R, in_dims=widths)  # d = 32 / 4 = 8
    assert m.in_dims == (8, 16, 32) and [t.down.in_features for t in m.tiers] == widths
    # by hand: tiers sum_i (D_i*8 + 8 + 2*64 + 2*8) = 8*56 + 3*152 = 904; up 8*32 + 32 = 288; α 1
    assert sum(p.numel() for p in m.parameters()) == 1_193 == mtsa_num_parameters(D, 3, R, in_dims=widths)
    assert mtsa_num_parameters(D, 3, R, in_dims=[D] * 3) == mtsa_num_parameters(D, 3, R)
    torch.manual_seed(0)
    xs = [torch.randn(B, K, w) for w in widths]
    x_last = torch.randn(B, K, D)
    out = m(xs, x_last)
    assert out.shape == (B, K, D)
    e, E = m.project(xs)
    torch.testing.assert_close(out, m.up(m.aggregate(e, E)))  # gate 0 at init
    assert "in_dims=[8, 16, 32]" in repr(m) and "in_dims" not in repr(MTSA(D, 3, R))
    # equal widths given explicitly: the same module as the default (state dicts interchange)
    same = MTSA(D, L, R, in_dims=[D] * L)
    same.load_state_dict(MTSA(D, L, R).state_dict(), strict=True)
    with pytest.raises(ValueError, match=r"shallow feature 1 has shape \(2, 5, 8\); it must be \(B, K, 16\)"):
        m([xs[0], xs[0], xs[2]], x_last)
    with pytest.raises(ValueError, match=r"x_last has shape \(2, 5, 16\); expected \(2, 5, 32\)"):
        m(xs, torch.randn(B, K, 16))
    with pytest.raises(ValueError, match=r"one positive int width per shallow feature \(3\); got \[8, 16\]"):
        MTSA(D, 3, R, in_dims=[8, 16])
    with pytest.raises(ValueError, match=r"got \[8, 0, 32\]"):
        mtsa_num_parameters(D, 3, R, in_dims=[8, 0, 32])
