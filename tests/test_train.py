"""vlkit.train.fit on tiny models: equivalence with a plain PyTorch loop, gradient
accumulation, data order, schedules (against transformers), in-process resume, eval,
frozen parameters, precision settings and input checks. Kill / NaN / determinism /
multi-process tests: tests/reliability/."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlkit.checkpoint import read_meta
from vlkit.models.protocol import UnknownNameError
from vlkit.seeding import data_generator
from vlkit.train import TrainConfig, default_param_groups, fit

DIM = 5


def make_data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    y = (x @ torch.randn(DIM, 1, generator=g)).sin()
    return list(zip(x, y))


def make_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 12), nn.Tanh(), nn.Dropout(dropout), nn.Linear(12, 1))


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def cfg(**kw):
    base = dict(steps=10, batch_size=8, lr=1e-2, log_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def test_one_process_cpu_equals_plain_pytorch_bit_for_bit():
    """fit with Accelerate inside == a hand-written AdamW loop over the same seeded order."""
    data, c = make_data(), cfg(steps=9, weight_decay=0.1, max_grad_norm=0.5, seed=3)
    model = make_model()
    result = fit(model, mse, data, config=c)

    ref = make_model()
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    no_decay = [p for p in ref.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2)
    losses, bpe = [], len(data) // 8
    for step in range(9):
        epoch, b = divmod(step, bpe)
        idx = torch.randperm(len(data), generator=data_generator(3, epoch))[b * 8:(b + 1) * 8]
        batch = torch.utils.data.default_collate([data[int(i)] for i in idx])
        loss = mse(ref, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert result.losses == losses
    assert torch.equal(params(model), params(ref))


def test_grad_accumulation_equals_a_bigger_batch():
    """accum=2 x batch 4 == accum=1 x batch 8 (mean-loss semantics), to float rounding."""
    data = make_data(n=48)
    a, b = make_model(), make_model()
    ra = fit(a, mse, data, config=cfg(batch_size=4, grad_accum=2, steps=12))
    rb = fit(b, mse, data, config=cfg(batch_size=8, grad_accum=1, steps=12))
    torch.testing.assert_close(params(a), params(b), rtol=0, atol=1e-6)
    assert ra.losses == pytest.approx(rb.losses, abs=1e-6)
    assert [h["grad_norm"] for h in ra.history] == pytest.approx([h["grad_norm"] for h in rb.history], abs=1e-5)


def test_every_epoch_is_a_fresh_seeded_permutation_without_the_tail():
    data = [(torch.tensor([float(i)]), torch.tensor([0.0])) for i in range(10)]
    seen = []

    def record(model, batch):
        seen.append(batch[0].reshape(-1).long().tolist())
        return model(batch[0]).sum() * 0.0

    result = fit(nn.Linear(1, 1), record, data, config=cfg(epochs=3, batch_size=3, steps=None))
    assert result.total_steps == 9 and len(seen) == 9  # 10 // 3 = 3 batches per epoch, the 10th item dropped
    epochs = [sum(seen[i:i + 3], []) for i in (0, 3, 6)]
    for e, visited in enumerate(epochs):
        assert len(set(visited)) == 9
        assert visited == torch.randperm(10, generator=data_generator(0, e))[:9].tolist()
    assert epochs[0] != epochs[1]


def test_resume_mid_epoch_in_process_is_bit_identical(tmp_path):
    """Stopped at step 7 (mid-epoch, between checkpoints), resumed, with dropout, accumulation,
    a schedule and evaluations: the same history, evals and weights as one uninterrupted run."""
    data = make_data(n=40)
    c = cfg(steps=16, batch_size=4, grad_accum=2, schedule="cosine", warmup_steps=2, ckpt_every=5, eval_every=3,
            max_grad_norm=1.0, seed=11)
    evaluate = lambda m: {"p0": float(params(m)[0])}  # noqa: E731
    full_model = make_model(dropout=0.3)
    full = fit(full_model, mse, data, config=c, eval_fn=evaluate)

    run = tmp_path / "run"
    first = fit(make_model(dropout=0.3), mse, data, config=c, eval_fn=evaluate, run_dir=run, stop_at_step=7)
    assert first.step == 7 and not first.finished and first.checkpoint == run / "ckpt-00000007"
    assert read_meta(run)["extra"]["data"] == {"micro_batches": 14, "epoch": 1, "batch": 4, "batches_per_epoch": 10}
    resumed_model = make_model(seed=5, dropout=0.3)
    resumed = fit(resumed_model, mse, data, config=c, eval_fn=evaluate, run_dir=run)
    assert resumed.resumed_from == run / "ckpt-00000007" and resumed.finished
    assert resumed.history == full.history
    assert resumed.evals == full.evals and [e["step"] for e in full.evals] == [3, 6, 9, 12, 15, 16]
    assert torch.equal(params(resumed_model), params(full_model))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_matches_transformers(kind):
    import transformers

    ref_fn = {"linear": transformers.get_linear_schedule_with_warmup,
              "cosine": transformers.get_cosine_schedule_with_warmup}[kind]
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = ref_fn(opt, num_warmup_steps=3, num_training_steps=11)
    want = []
    for _ in range(11):
        want.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    result = fit(make_model(), mse, make_data(), config=cfg(steps=11, lr=0.5, schedule=kind, warmup_steps=3))
    assert [h["lr"] for h in result.history] == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_linear_schedule_hand_worked():
    # warm-up 2, 6 steps: lr multipliers 0, 1/2, then 1 - (s-2)/4 for s = 2..5
    result = fit(make_model(), mse, make_data(), config=cfg(steps=6, lr=1.0, schedule="linear", warmup_steps=2))
    assert [h["lr"] for h in result.history] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]


def test_frozen_parameters_stay_put_and_are_not_optimised(tmp_path):
    model = make_model()
    model[0].requires_grad_(False)
    before = model[0].weight.detach().clone()
    fit(model, mse, make_data(), config=cfg(weight_decay=0.5, ckpt_trainable_only=True), run_dir=tmp_path)
    assert torch.equal(model[0].weight, before)
    assert set(read_meta(tmp_path)["model"]["tensors"]) == {"3.weight", "3.bias"}
    groups = default_param_groups(model, 0.5)
    assert [[tuple(p.shape) for p in g["params"]] for g in groups] == [[(1, 12)], [(1,)]]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(model, mse, make_data(), config=cfg())


def test_logged_extras_are_averaged_over_micro_batches():
    calls = iter(range(100))

    def loss_fn(model, batch):
        return {"loss": mse(model, batch), "call": torch.tensor(float(next(calls))), "ignored": "text"}

    result = fit(make_model(), loss_fn, make_data(), config=cfg(steps=3, batch_size=4, grad_accum=2))
    assert [h["call"] for h in result.history] == [0.5, 2.5, 4.5]
    assert "ignored" not in result.history[0]


def test_eval_runs_in_eval_mode_without_grad():
    modes = []

    def evaluate(m):
        modes.append((m.training, torch.is_grad_enabled()))
        return {"one": torch.tensor(1.0)}

    model = make_model()
    result = fit(model, mse, make_data(), config=cfg(steps=4, eval_every=2), eval_fn=evaluate)
    assert modes == [(False, False)] * 2 and model.training
    assert result.evals == [{"step": 2, "one": 1.0}, {"step": 4, "one": 1.0}]


def test_bf16_autocast_on_cpu_trains_and_differs_from_fp32():
    data = make_data()
    r32 = fit(make_model(), mse, data, config=cfg(amp="off"))
    r16 = fit(make_model(), mse, data, config=cfg(amp="bf16"))
    assert r32.losses != r16.losses
    assert r16.losses == pytest.approx(r32.losses, rel=0.05)
    assert fit(make_model(), mse, data, config=cfg(amp="auto")).losses == r32.losses  # auto = fp32 on the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_cpu_only_refusals():
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        fit(make_model(), mse, make_data(), config=cfg(amp="fp16"))
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available"):
        fit(make_model(), mse, make_data(), config=cfg(device="cuda"))


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"steps": None}, ValueError, r"exactly one of steps or epochs \(got steps=None, epochs=None\)"),
    ({"epochs": 2}, ValueError, r"exactly one of steps or epochs"),
    ({"batch_size": 0}, ValueError, r"batch_size must be an int >= 1, got 0"),
    ({"grad_accum": 1.5}, ValueError, r"grad_accum must be an int >= 1, got 1.5"),
    ({"lr": float("nan")}, ValueError, r"lr must be a finite number > 0, got nan"),
    ({"max_grad_norm": 0}, ValueError, r"max_grad_norm must be a number > 0 or None, got 0"),
    ({"seed": -3}, ValueError, r"seed must be an int in \[0, 4294967295\], got -3"),
    ({"amp": "fp8"}, UnknownNameError, r"unknown amp mode 'fp8'; valid amp modes: auto, off, bf16, fp16"),
    ({"schedule": "step"}, UnknownNameError, r"unknown schedule 'step'; valid schedules: constant, linear, cosine"),
    ({"device": "tpu"}, UnknownNameError, r"unknown device 'tpu'; valid devices: auto, cpu, cuda"),
])
def test_bad_config_is_named(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        cfg(**kwargs)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"the training data has 5 examples, fewer than batch_size=8"):
        fit(make_model(), mse, make_data(n=5), config=cfg())
    with pytest.raises(TypeError, match=r"loss_fn must return a scalar tensor .*got \(8, 1\)"):
        fit(make_model(), lambda m, b: m(b[0]), make_data(), config=cfg())
    with pytest.raises(KeyError, match=r"dict without 'loss' \(keys: mse\)"):
        fit(make_model(), lambda m, b: {"mse": mse(m, b)}, make_data(), config=cfg())
    with pytest.raises(TypeError, match=r"loss that does not require grad"):
        fit(make_model(), lambda m, b: mse(m, b).detach(), make_data(), config=cfg())
    with pytest.raises(TypeError, match=r"config must be a TrainConfig, got dict"):
        fit(make_model(), mse, make_data(), config={"steps": 3})
    with pytest.raises(ValueError, match=r"2 epoch\(s\) of 1 micro-batches give no step of grad_accum=4"):
        fit(make_model(), mse, make_data(n=8), config=cfg(steps=None, epochs=2, grad_accum=4))


def test_progress_bar_only_on_request(capsys):
    fit(make_model(), mse, make_data(), config=cfg(steps=3))
    assert "train" not in capsys.readouterr().err  # stderr is not a terminal under pytest
    fit(make_model(), mse, make_data(), config=cfg(steps=3, progress=True))
    assert "train:" in capsys.readouterr().err
