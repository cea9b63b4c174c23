"""Training guards: a non-finite loss, logged value, gradient or metric stops the run with
a message naming the step, the batch index and the last good checkpoint; no checkpoint of
the broken state is written and no NaN reaches the history (reliability issue item 4)."""

from __future__ import annotations

import math

import pytest
import tiny_task
import torch

from vlkit.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from vlkit.train import NonFiniteLossError, NonFiniteMetricError, fit


def nan_at_call(n: int, value: float = math.nan, key: str | None = None):
    """A loss_fn that behaves like the tiny task's but returns ``value`` on its ``n``-th call
    (1-based), either as the loss or (``key``) as a logged extra value."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = tiny_task.loss_fn(model, batch)
        bad = calls["n"] == n
        if key is not None:
            return {"loss": loss, key: torch.tensor(value if bad else 1.0)}
        return loss * value if bad else loss

    return loss_fn


def test_nan_loss_at_step_5_names_step_batch_and_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_task.config(steps=12, ckpt_every=2)
    with pytest.raises(NonFiniteLossError) as info:
        fit(tiny_task.TinyMLP(), nan_at_call(5), tiny_task.make_data(), config=cfg, run_dir=run)
    err = info.value
    # 96 examples / batch 8 = 12 batches per epoch; step 5 is batch index 4 of epoch 0.
    assert (err.step, err.epoch, err.batch) == (5, 0, 4)
    assert err.checkpoint == run / "ckpt-00000004"
    msg = str(err)
    assert "non-finite loss (nan) at step 5 (epoch 0, batch 4)" in msg
    assert str(run / "ckpt-00000004") in msg
    assert [read_meta(p)["step"] for p in list_checkpoints(run)] == [2, 4]
    assert latest_checkpoint(run) == run / "ckpt-00000004"
    history = read_meta(latest_checkpoint(run))["extra"]["history"]
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)


def test_nan_before_any_checkpoint_says_none_and_leaves_params_untouched(tmp_path):
    model = tiny_task.TinyMLP()
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(epoch 0, batch 0\).*last good checkpoint: none"):
        fit(model, nan_at_call(1), tiny_task.make_data(), config=tiny_task.config(), run_dir=tmp_path / "run")
    assert torch.equal(tiny_task.flat_params(model), tiny_task.flat_params(tiny_task.TinyMLP()))
    assert list_checkpoints(tmp_path / "run") == []


def test_inf_in_second_accumulated_micro_batch_names_that_batch(tmp_path):
    cfg = tiny_task.config(steps=6, batch_size=4, grad_accum=2, ckpt_every=None)
    # call 6 = step 3, micro-batch 2 of 2 = stream micro-batch 5 = batch index 5 of epoch 0
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(inf\) at step 3 \(epoch 0, batch 5\)"):
        fit(tiny_task.TinyMLP(), nan_at_call(6, math.inf), tiny_task.make_data(), config=cfg)


def test_nan_in_second_epoch_gives_index_within_epoch():
    cfg = tiny_task.config(steps=20, ckpt_every=None)
    with pytest.raises(NonFiniteLossError) as info:  # call 15 = step 15 = epoch 1, batch 2
        fit(tiny_task.TinyMLP(), nan_at_call(15), tiny_task.make_data(), config=cfg)
    assert (info.value.step, info.value.epoch, info.value.batch) == (15, 1, 2)


def test_nan_logged_value_is_caught_too():
    with pytest.raises(NonFiniteLossError, match=r"logged value 'kd'.*at step 3"):
        fit(tiny_task.TinyMLP(), nan_at_call(3, key="kd"), tiny_task.make_data(), config=tiny_task.config())


def test_non_finite_gradient_with_finite_loss_names_the_parameter():
    model = tiny_task.TinyMLP()
    model.net[3].bias.register_hook(lambda g: g * math.inf)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm.*at step 1 .*net\.3\.bias"):
        fit(model, tiny_task.loss_fn, tiny_task.make_data(), config=tiny_task.config(max_grad_norm=None))


def test_non_finite_eval_metric_stops_before_the_table(tmp_path):
    with pytest.raises(NonFiniteMetricError, match=r"'acc' is nan at step 4"):
        fit(tiny_task.TinyMLP(), tiny_task.loss_fn, tiny_task.make_data(), config=tiny_task.config(eval_every=4),
            eval_fn=lambda m: {"acc": math.nan}, run_dir=tmp_path / "run")
    assert list_checkpoints(tmp_path / "run") == []  # the eval runs before that step's checkpoint
