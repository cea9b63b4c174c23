"""Determinism (reliability issue item 3): on the CPU the same seed gives the same loss
history and byte-identical checkpoint files; another seed gives another run."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import tiny_task
import torch

from vlkit.checkpoint import MODEL_FILE, STATE_FILE
from vlkit.seeding import data_generator, derive_seed, rng_state, seed_everything, set_rng_state
from vlkit.train import fit


def run(tmp_path, name: str, **overrides):
    tiny_task.setup()
    model = tiny_task.TinyMLP()
    result = fit(model, tiny_task.loss_fn, tiny_task.make_data(), config=tiny_task.config(**overrides),
                 run_dir=tmp_path / name, eval_fn=lambda m: {"w": float(tiny_task.flat_params(m).sum())})
    ckpt = result.checkpoint
    return result, (ckpt / MODEL_FILE).read_bytes(), (ckpt / STATE_FILE).read_bytes(), (ckpt / "meta.json").read_text()


def test_same_seed_same_bytes(tmp_path):
    a = run(tmp_path, "a")
    b = run(tmp_path, "b")
    assert a[0].losses == b[0].losses
    assert a[0].history == b[0].history and a[0].evals == b[0].evals
    assert a[1] == b[1], "model.safetensors differs between two runs with the same seed"
    assert a[2] == b[2], "optimizer.safetensors differs between two runs with the same seed"
    assert a[3] == b[3], "meta.json differs between two runs with the same seed"


def test_other_seed_other_run(tmp_path):
    a = run(tmp_path, "a", seed=7)
    b = run(tmp_path, "b", seed=8)
    assert a[0].losses != b[0].losses
    assert a[1] != b[1]


def test_global_rng_state_does_not_leak_into_the_run(tmp_path):
    """fit seeds everything itself: what was drawn before the call does not matter."""
    a = run(tmp_path, "a")
    torch.rand(17), np.random.rand(3), random.random()
    b = run(tmp_path, "b")
    assert a[1] == b[1]


def test_rng_state_round_trip_through_json():
    import json

    seed_everything(3)
    torch.rand(5), np.random.rand(2), random.random(), np.random.randn()  # leave a cached gaussian
    state = json.loads(json.dumps(rng_state()))
    want = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    seed_everything(99)
    set_rng_state(state)
    got = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]


def test_data_order_depends_on_seed_and_epoch_only():
    order = lambda s, e: torch.randperm(50, generator=data_generator(s, e))  # noqa: E731
    torch.rand(3)  # global state is irrelevant
    assert torch.equal(order(1, 2), order(1, 2))
    assert not torch.equal(order(1, 2), order(1, 3))
    assert not torch.equal(order(1, 2), order(2, 2))
    # hashing, not addition: (seed 1, epoch 0) is unrelated to (seed 0, epoch 1)
    assert derive_seed(1, "data", 0) != derive_seed(0, "data", 1)


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "3", True, None])
def test_bad_seed_is_named(bad):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 4294967295\], got " + re.escape(repr(bad))):
        seed_everything(bad)
