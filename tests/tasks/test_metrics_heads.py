"""Metrics on hand-worked examples; heads' shapes and the contrastive loss's limits."""

import math

import pytest
import torch

from vlkit.tasks import heads, metrics


def test_accuracy_and_standard_error():
    r = metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0])
    assert r["acc"] == 0.5 and r["n"] == 4
    assert r["se"] == pytest.approx(math.sqrt(0.25 / 4))
    with pytest.raises(ValueError, match="3 entries"):
        metrics.accuracy([1, 0, 1], [1, 0])


def test_macro_f1_hand_example():
    # class 0: tp=1 fp=1 fn=0 -> 2/3; class 1: tp=1 fp=0 fn=1 -> 2/3; class 2: tp=1 -> 1
    pred, target = [0, 0, 1, 2], [0, 1, 1, 2]
    assert metrics.macro_f1(pred, target) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_recall_at_k_hand_example():
    # 2 images, 4 captions (2 each). Image 0 ranks its caption 1 first; image 1 ranks its own
    # captions 3rd and 4th. Caption 2 (image 1) prefers image 0.
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1],
                           [0.5, 0.6, 0.2, 0.3]])
    owner = [0, 0, 1, 1]
    r = metrics.recall_at_k(scores, owner, ks=(1, 2, 3))
    assert r["i2t_R@1"] == 50.0 and r["i2t_R@2"] == 50.0 and r["i2t_R@3"] == 100.0
    # t2i: cap0 -> img0 (hit@1), cap1 -> img0 (hit@1), cap2 -> img0 first (miss@1), cap3 -> img1 (hit@1)
    assert r["t2i_R@1"] == 75.0 and r["t2i_R@2"] == 100.0
    assert r["rsum"] == pytest.approx(50 + 50 + 100 + 75 + 100 + 100)
    with pytest.raises(ValueError, match="owners"):
        metrics.recall_at_k(scores, [0, 0, 1, 2])


def test_heads_shapes_and_pair_order_matters():
    torch.manual_seed(0)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    assert heads.ClassifierHead(8, 13)(x).shape == (3, 13)
    assert heads.ClassifierHead(8, 5, hidden=0)(x).shape == (3, 5)
    pair = heads.PairHead(8)
    assert pair(x, y).shape == (3, 2)
    assert not torch.allclose(pair(x, y), pair(y, x))
    with pytest.raises(ValueError, match="num_classes"):
        heads.ClassifierHead(8, 1)


def test_contrastive_loss_limits():
    e = torch.eye(4)
    # perfectly aligned, orthogonal pairs at low temperature -> loss near 0
    assert heads.contrastive_loss(e, e, temperature=0.01) < 1e-6
    # identical embeddings for every pair -> loss = log(batch)
    same = torch.ones(4, 3)
    assert heads.contrastive_loss(same, same) == pytest.approx(math.log(4), rel=1e-5)


def test_seed_sd_hand_worked():
    # scores 70, 72, 77: mean 73, squared deviations 9 + 1 + 16 = 26, / (3 - 1) = 13
    assert metrics.seed_sd([70, 72, 77]) == pytest.approx(math.sqrt(13))
    assert metrics.seed_sd([81.2]) == 0.0 and metrics.seed_sd([]) == 0.0
