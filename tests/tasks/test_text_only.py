"""The text-only baseline: hand-made texts where the answer is (or is not) in the words."""

import numpy as np
import pytest
import torch

from vlkit.tasks.text_only import NgramVocab, fit_text_only, ngrams


def test_ngrams_hand_example():
    assert ngrams([1, 2, 3], 2) == {(1,), (2,), (3,), (1, 2), (2, 3)}
    assert ngrams([5, 5], 1) == {(5,)}


def test_vocab_features_presence_and_unseen_dropped():
    v = NgramVocab([[1, 2], [2, 3]], n=1)
    assert len(v) == 3
    x = v.features([[3, 3, 9], [1]])
    assert x.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]


def test_learns_a_word_that_decides_the_label():
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for _ in range(200):
        y = int(rng.integers(2))
        filler = [int(t) for t in rng.integers(10, 40, size=5)]
        texts.append([101, 7 if y else 8, *filler, 102])  # token 7 <-> true, 8 <-> false
        labels.append(y)
    predict = fit_text_only(texts, labels, 2)
    test = [[101, 7, 12, 30, 102], [101, 8, 12, 30, 102], [101, 8, 39, 102]]
    assert predict(test).tolist() == [1, 0, 0]


def test_order_decides_only_with_bigrams():
    # the same two words in either order; the label is the order, so unigrams carry nothing
    texts = [[1, 2], [2, 1]] * 20
    labels = [1, 0] * 20
    assert predict_acc(fit_text_only(texts, labels, 2, n=2), texts, labels) == 1.0
    assert predict_acc(fit_text_only(texts, labels, 2, n=1), texts, labels) == 0.5


def predict_acc(predict, texts, labels):
    return float((predict(texts) == torch.as_tensor(labels)).float().mean())


def test_bad_input():
    with pytest.raises(ValueError, match="labels"):
        fit_text_only([[1], [2]], [0], 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        fit_text_only([[1], [2]], [0, 3], 2)
    with pytest.raises(ValueError, match="order"):
        NgramVocab([[1]], n=0)


def _task_data(task, split, texts, labels):
    from vlkit.tasks.data import TaskData

    examples = [{"ids": t, "label": y} for t, y in zip(texts, labels)]
    return TaskData(task, split, examples, None, list(range(len(examples))), len(examples))


def test_task_text_only_and_the_baselines_reference_rows():
    """A text task whose label is one word: the text-only row scores 100, chance 50, and
    the baselines table gets both rows with their val scores."""
    from vlkit.tasks.baselines import chance_rows
    from vlkit.tasks.runner import get_task

    spec = get_task("movie_reviews")
    texts = [[101, 7 if i % 2 else 8, 20 + i % 5, 102] for i in range(40)]
    labels = [i % 2 for i in range(40)]
    data = {s: _task_data("movie_reviews", s, texts, labels) for s in ("train", "val", "test")}
    got = spec.text_only(data["train"])(data["test"])
    assert got["score"] == 100.0 and got["n"] == 40
    rows = {r["method"]: r for r in chance_rows("movie_reviews", spec, data)}
    assert set(rows) == {"chance (majority class)", "text only (n-gram LR)"}
    assert rows["text only (n-gram LR)"]["test"] == 100.0 and rows["text only (n-gram LR)"]["val"] == 100.0
    assert rows["chance (majority class)"]["test"] == 50.0 and rows["chance (majority class)"]["n_val"] == 40
