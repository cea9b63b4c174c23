"""Task metrics, each with the uncertainty a results table needs.

* :func:`accuracy` -- fraction correct and its binomial standard error sqrt(p(1-p)/n)
  (VQA on easy-VQA, where each question has exactly one answer, so VQA accuracy is plain
  accuracy; NLVR; text classification);
* :func:`macro_f1` -- unweighted mean of per-class F1 (text classification);
* :func:`recall_at_k` -- image->text and text->image R@K from a score matrix, where each image
  owns several captions (Flickr30K/COCO protocol: an image query is a hit when *any* of its
  captions ranks in the top K; a caption query is a hit when its image ranks in the top K);
* :func:`seed_sd` -- the spread of one score over seeds (sample SD, ddof 1; 0 for one run).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def accuracy(pred, target) -> dict:
    """``{"acc", "se", "n"}`` for predicted and true labels (1-D, same length)."""
    pred, target = _as_tensor(pred).flatten(), _as_tensor(target).flatten()
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} entries, target {target.numel()}")
    n = target.numel()
    if n == 0:
        raise ValueError("accuracy of an empty set is undefined")
    p = (pred == target).double().mean().item()
    return {"acc": p, "se": math.sqrt(p * (1 - p) / n), "n": n}


def macro_f1(pred, target, num_classes: int | None = None) -> float:
    """Mean over classes of F1 = 2TP / (2TP + FP + FN); a class absent from both pred and
    target is skipped (its F1 is undefined), as scikit-learn does with ``zero_division``."""
    pred, target = _as_tensor(pred).flatten().long(), _as_tensor(target).flatten().long()
    k = num_classes or int(max(pred.max(), target.max()).item()) + 1
    scores = []
    for c in range(k):
        tp = ((pred == c) & (target == c)).sum().item()
        fp = ((pred == c) & (target != c)).sum().item()
        fn = ((pred != c) & (target == c)).sum().item()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def recall_at_k(scores: torch.Tensor, caption_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """R@K in both directions.

    scores: (n_images, n_captions) similarity, higher = better match.
    caption_to_image: for each caption, the index of its image.
    Returns ``{"i2t_R@1": ..., "t2i_R@1": ..., ..., "rsum": ...}`` in percent.
    """
    scores = _as_tensor(scores).float()
    owner = _as_tensor(caption_to_image).long()
    n_img, n_cap = scores.shape
    if owner.numel() != n_cap:
        raise ValueError(f"{owner.numel()} caption owners for {n_cap} captions")
    if owner.min() < 0 or owner.max() >= n_img:
        raise ValueError(f"caption owners must lie in [0, {n_img}), got [{owner.min()}, {owner.max()}]")
    out = {}
    # image -> text: rank of the best-ranked own caption
    order = scores.argsort(dim=1, descending=True, stable=True)  # (n_img, n_cap)
    own = owner[order] == torch.arange(n_img)[:, None]
    i2t_rank = own.float().argmax(dim=1)
    # text -> image: rank of the caption's image
    order_t = scores.t().argsort(dim=1, descending=True, stable=True)  # (n_cap, n_img)
    t2i_rank = (order_t == owner[:, None]).float().argmax(dim=1)
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        out[f"t2i_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    out["rsum"] = sum(v for key, v in out.items() if key.startswith(("i2t", "t2i")))
    return out


def seed_sd(scores) -> float:
    """Sample standard deviation (``ddof=1``) of one score over seeds or runs; 0.0 for a
    single run (no spread measured)."""
    xs = [float(x) for x in scores]
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
