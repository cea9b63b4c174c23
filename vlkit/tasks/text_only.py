"""The text-only ("blind") baseline of a classification task: logistic regression on the bag
of token n-grams of the example's text, no image.

For a vision-language task it measures how much of the label the text alone gives away --
VQA's question-only prior (Goyal et al., CVPR 2017, Sec. 1) and NLVR2's text-only baseline
(Suhr et al., ACL 2019, Sec. 5). A model's score means little unless it clears this row: on a
generated NLVR set without minimal pairs, for instance, the statements' wording carries some
label information even though the labels are balanced. For a text task it is the classic
bag-of-n-grams linear classifier. The task runner exposes it as
:meth:`vlkit.tasks.runner.ClassifyTask.text_only`; the baselines table has a row per task.

Features: presence (0/1) of every token 1..``n``-gram seen in the train split's ids (the
task's own MiniLM word pieces, ``[CLS]`` / ``[SEP]`` included, so a bigram can mark the
first or last word). Model: ``softmax(X W + b)``, fit by full-batch L-BFGS on the mean
cross-entropy plus ``l2 * ||W||^2`` (fixed, not tuned: nothing here reads val or test
before scoring). Deterministic: no random draw anywhere.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ngrams", "NgramVocab", "fit_text_only"]


def ngrams(ids: Sequence[int], n: int = 2) -> set[tuple[int, ...]]:
    """Every contiguous 1..``n``-gram of ``ids`` (as tuples)."""
    ids = [int(i) for i in ids]
    return {tuple(ids[s:s + k]) for k in range(1, n + 1) for s in range(len(ids) - k + 1)}


class NgramVocab:
    """The n-grams of a training set, in first-seen order; ``features`` encodes any texts."""

    def __init__(self, texts: Sequence[Sequence[int]], n: int = 2):
        if n < 1:
            raise ValueError(f"n-gram order must be >= 1, got {n}")
        self.n = n
        self.index: dict[tuple[int, ...], int] = {}
        for ids in texts:
            for g in sorted(ngrams(ids, n)):
                self.index.setdefault(g, len(self.index))

    def __len__(self) -> int:
        return len(self.index)

    def features(self, texts: Sequence[Sequence[int]]) -> torch.Tensor:
        """``(N, V)`` float 0/1 presence of each vocabulary n-gram (unseen n-grams dropped)."""
        x = torch.zeros(len(texts), len(self.index))
        for r, ids in enumerate(texts):
            cols = [self.index[g] for g in ngrams(ids, self.n) if g in self.index]
            x[r, cols] = 1.0
        return x


def fit_text_only(texts: Sequence[Sequence[int]], labels: Sequence[int], num_classes: int, *, n: int = 2,
                  l2: float = 1e-3, max_iter: int = 200):
    """Fit the bag-of-n-grams logistic regression; returns ``predict(texts) -> (N,) long``."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if len(texts) == 0:
        raise ValueError("no training texts")
    vocab = NgramVocab(texts, n)
    x = vocab.features(texts)
    y = torch.as_tensor([int(v) for v in labels], dtype=torch.long)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}); got {int(y.min())}..{int(y.max())}")
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda new: (vocab.features(new) @ w + b).argmax(-1)
