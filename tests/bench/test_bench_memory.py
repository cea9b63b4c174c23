"""bench/bench_memory.py: the test-time target really runs without autograd and in eval mode
(a forward hook records the modes the head sees), and :func:`memory_checks` turns hand-made rows
into the right verdicts. No memory or wall-clock assertion: those are the benchmark's output."""

from __future__ import annotations

import pytest
import torch

from bench import bench_memory as bm
from vlkit.models import build


@pytest.fixture
def head_modes(monkeypatch):
    """Tiny models, a fake ``latency`` that just calls the step ``warmup + repeats`` times, and
    the list of (inference mode, head.training, output requires grad) the head sees per call."""
    monkeypatch.setattr(bm, "build", lambda preset: build(preset, **bm.TINY[preset]))

    def fake_latency(fn, **kw):
        for _ in range(kw["warmup"] + kw["repeats"]):
            fn()
        return {"median_s": 0.0, "times_s": [0.0]}

    monkeypatch.setattr(bm, "latency", fake_latency)
    seen, real = [], bm._build_with_head

    def spy(*a, **k):
        model, head, inputs, labels = real(*a, **k)
        head.register_forward_hook(lambda m, i, o: seen.append(
            (torch.is_inference_mode_enabled(), m.training, o.requires_grad)))
        return model, head, inputs, labels

    monkeypatch.setattr(bm, "_build_with_head", spy)
    return seen


@pytest.mark.parametrize("method", ["full", "sherl"])
def test_test_steps_runs_inference_mode_and_eval(head_modes, method):
    bm.test_steps("bert-base", method, batch_size=2, seq_len=8, warmup=1, repeats=2)
    assert head_modes == [(True, False, False)] * 3


def test_train_steps_builds_a_graph(head_modes):
    """The training twin, same spy: grad mode on, train mode (so the test above can fail)."""
    bm.train_steps("bert-base", "sherl", batch_size=2, seq_len=8, warmup=0, repeats=1)
    assert head_modes == [(False, True, True)]


def _row(preset, method, peak, saved, test, full_peak, full_test):
    return {"preset": preset, "method": method, "peak_gib": peak, "saved_gib": saved, "test_peak_gib": test,
            "mem_vs_full": round(peak / full_peak, 4), "test_mem_vs_full": round(test / full_test, 4)}


def test_memory_checks_by_hand():
    rows = [_row("bert-base", "full", 2.0, 0.8, 0.5, 2.0, 0.5),
            _row("bert-base", "lst", 0.6, 0.12, 0.55, 2.0, 0.5),
            _row("bert-base", "unipt", 0.45, 0.06, 0.52, 2.0, 0.5),
            _row("bert-base", "sherl", 0.5, 0.08, 0.51, 2.0, 0.5)]
    c = bm.memory_checks(rows)
    assert c["bert_sherl_mem_vs_full"] == 0.25 and c["bert_sherl_le_0.25_full"] is True
    assert c["bert_sherl_peak_below_lst"] is True and c["bert_sherl_peak_below_unipt"] is False
    assert c["bert_sherl_saved_below_lst"] is True and c["bert_sherl_saved_below_unipt"] is False
    assert c["bert_sherl_test_mem_vs_full"] == 1.02
    rows[-1] = _row("bert-base", "sherl", 0.6, 0.08, 0.51, 2.0, 0.5)
    assert bm.memory_checks(rows)["bert_sherl_le_0.25_full"] is False
