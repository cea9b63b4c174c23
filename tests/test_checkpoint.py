"""vlkit.checkpoint: round trips, atomic layout, pointer fallback, pruning, and the checks
that name what differs. (Kill, corruption and resume tests: tests/reliability/.)"""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vlkit import checkpoint as ck
from vlkit.checkpoint import (
    CheckpointError,
    decode_state,
    encode_state,
    hash_params,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)


class Net(nn.Module):
    preset = "net"

    def __init__(self, hidden=5, extra=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Linear(3, hidden)
        self.norm = nn.BatchNorm1d(hidden)
        self.b = nn.Linear(hidden, 2)
        if extra:
            self.c = nn.Linear(2, 2)

    def forward(self, x):
        y = self.b(torch.relu(self.norm(self.a(x))))
        return self.c(y) if hasattr(self, "c") else y


def trained(seed=0, steps=3):
    """A Net, AdamW and a StepLR after a few steps (so every state is non-trivial)."""
    model = Net(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(8, 3, generator=g)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def one_more_step(model, opt, sched):
    loss = model(torch.ones(4, 3)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_round_trip_model_optimizer_scheduler_rng(tmp_path):
    model, opt, sched = trained()
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 3, model, opt, sched, extra={"note": "x"}, params_hash="abc")
    after_save = torch.rand(3)
    assert path == tmp_path / "ckpt-00000003" and (tmp_path / "latest").read_text() == "ckpt-00000003\n"

    model2, _, _ = trained(seed=1, steps=0)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    meta = load_checkpoint(tmp_path, model2, opt2, sched2, params_hash="abc", restore_rng=True)
    assert torch.equal(torch.rand(3), after_save)  # RNG restored
    assert meta["step"] == 3 and meta["extra"] == {"note": "x"} and meta["path"] == str(path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert sched2.state_dict() == sched.state_dict()
    # identical continuation: optimiser moments, step counts and lr all came back
    assert torch.equal(one_more_step(model, opt, sched), one_more_step(model2, opt2, sched2))


def test_tied_weights_are_stored_once_and_come_back_tied(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(4, 3)
            self.out = nn.Linear(3, 4, bias=False)
            self.out.weight = self.emb.weight

    m = Tied()
    save_checkpoint(tmp_path, 0, m)
    meta = read_meta(tmp_path)
    assert meta["model"]["aliases"] == {"out.weight": "emb.weight"}
    assert list(meta["model"]["tensors"]) == ["emb.weight"]
    m2 = Tied()
    load_checkpoint(tmp_path, m2)
    assert torch.equal(m2.emb.weight, m.emb.weight) and m2.out.weight is m2.emb.weight


def test_trainable_only_saves_trainable_params_and_buffers(tmp_path):
    model, _, _ = trained()
    model.a.requires_grad_(False)
    save_checkpoint(tmp_path, 1, model, trainable_only=True)
    names = set(read_meta(tmp_path)["model"]["tensors"])
    assert names == {"b.weight", "b.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                     "norm.num_batches_tracked"}
    fresh = Net(seed=0)  # frozen part rebuilt by the caller
    fresh.a.requires_grad_(False)
    load_checkpoint(tmp_path, fresh)
    assert torch.equal(fresh.b.weight, model.b.weight) and torch.equal(fresh.norm.running_mean, model.norm.running_mean)
    unfrozen = Net(seed=0)  # if `a` is trainable here, the checkpoint lacks it: named
    with pytest.raises(CheckpointError, match=r"2 missing from the checkpoint: a\.weight, a\.bias"):
        load_checkpoint(tmp_path, unfrozen)


def test_missing_and_unexpected_names_are_listed(tmp_path):
    save_checkpoint(tmp_path / "small", 0, Net())
    with pytest.raises(CheckpointError, match=r"2 missing from the checkpoint: c\.weight, c\.bias"):
        load_checkpoint(tmp_path / "small", Net(extra=True))
    save_checkpoint(tmp_path / "big", 0, Net(extra=True))
    with pytest.raises(CheckpointError, match=r"2 not in the model: c\.weight, c\.bias"):
        load_checkpoint(tmp_path / "big", Net())
    m = Net(extra=True)
    load_checkpoint(tmp_path / "small", m, strict=False)  # tolerated when asked
    assert torch.equal(m.a.weight, Net().a.weight)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*a\.weight \[5, 3\] vs model \[7, 3\]"):
        load_checkpoint(tmp_path / "small", Net(hidden=7), strict=False)  # shapes: never tolerated


def test_long_lists_are_cut(tmp_path):
    class Many(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(n))

    save_checkpoint(tmp_path, 0, Many(1))
    name = r"layers\.\d+\.\w+"
    five_then_count = rf"({name}, ){{4}}{name} \.\.\. \(\+13 more\)"
    with pytest.raises(CheckpointError, match=rf"18 missing from the checkpoint: {five_then_count}"):
        load_checkpoint(tmp_path, Many(10))


def test_preset_and_params_hash_mismatch_are_named(tmp_path):
    save_checkpoint(tmp_path, 0, Net(), params_hash="aaaa")
    with pytest.raises(CheckpointError, match=r"written for preset 'net', not 'vilt-b32'"):
        load_checkpoint(tmp_path, Net(), expected_preset="vilt-b32")
    other = Net()
    other.preset = "net-v2"
    with pytest.raises(CheckpointError, match=r"written for preset 'net', not 'net-v2'"):
        load_checkpoint(tmp_path, other)
    with pytest.raises(CheckpointError, match=r"params hash 'aaaa', this run has 'bbbb'"):
        load_checkpoint(tmp_path, Net(), params_hash="bbbb")


def test_optimizer_that_does_not_fit_is_named(tmp_path):
    model, opt, _ = trained()
    save_checkpoint(tmp_path, 0, model, opt)
    with pytest.raises(CheckpointError, match=r"optimizer has 2 param groups, checkpoint 1"):
        m = Net()
        load_checkpoint(tmp_path, m, torch.optim.AdamW([{"params": [m.a.weight]}, {"params": [m.b.weight]}]))
    with pytest.raises(CheckpointError, match=r"optimizer param group 0 has 2 parameters, checkpoint 6"):
        m = Net()
        load_checkpoint(tmp_path, m, torch.optim.AdamW([m.a.weight, m.a.bias]))
    with pytest.raises(CheckpointError, match=r"holds no scheduler state"):
        m = Net()
        o = torch.optim.AdamW(m.parameters())
        load_checkpoint(tmp_path, m, o, torch.optim.lr_scheduler.StepLR(o, 1))


def test_crash_leftovers_are_ignored_then_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, Net())
    # a crashed save of step 2: complete-looking files, but never renamed
    leftover = tmp_path / ".tmp-ckpt-00000002-dead"
    leftover.mkdir()
    (leftover / "meta.json").write_text((tmp_path / "ckpt-00000001" / "meta.json").read_text())
    (tmp_path / ".tmp-latest-dead").write_text("ckpt-00000002\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000001"
    assert list_checkpoints(tmp_path) == [tmp_path / "ckpt-00000001"]
    save_checkpoint(tmp_path, 3, Net())
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001", "ckpt-00000003", "latest"]


def test_failed_write_leaves_nothing_and_latest_untouched(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, Net())

    class Boom(Exception):
        pass

    def hook(event, path):
        if event == ck.META_FILE:
            raise Boom()

    monkeypatch.setattr(ck, "write_hook", hook)
    with pytest.raises(Boom):
        save_checkpoint(tmp_path, 2, Net())
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000001", "latest"]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000001"


def test_latest_pointer_fallbacks(tmp_path):
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path / "nope") is None
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*no 'latest' pointer"):
        load_checkpoint(tmp_path, Net())
    for s in (1, 2, 10):
        save_checkpoint(tmp_path, s, Net(), keep=None)
    (tmp_path / "latest").write_text("ckpt-00000002\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000002"  # the pointer wins
    for junk in ("ckpt-00000077\n", "../../etc\n", ""):
        (tmp_path / "latest").write_text(junk)
        assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000010"  # newest complete (10 > 2 numerically)
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000010"
    with pytest.raises(CheckpointError, match=r"ckpt-00000005/meta.json: missing"):
        load_checkpoint(tmp_path / "ckpt-00000005", Net())


def test_pruning_keeps_the_newest(tmp_path):
    for s in range(5):
        save_checkpoint(tmp_path, s, Net(), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000003", "ckpt-00000004"]
    save_checkpoint(tmp_path, 2, Net(), keep=2)  # an older step re-saved after a resume: it is `latest`
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000002"
    assert (tmp_path / "ckpt-00000002").exists()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"keep must be an int >= 1 or None"):
            save_checkpoint(tmp_path, 9, Net(), keep=bad)


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 4, Net(seed=0))
    save_checkpoint(tmp_path, 4, Net(seed=1))
    m = Net(seed=2)
    load_checkpoint(tmp_path, m)
    assert torch.equal(m.a.weight, Net(seed=1).a.weight)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000004", "latest"]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"step must be an int >= 0, got -1"):
        save_checkpoint(tmp_path, -1, Net())
    with pytest.raises(ValueError, match=r"extra must be JSON-able"):
        save_checkpoint(tmp_path, 0, Net(), extra={"x": float("nan")})
    with pytest.raises(CheckpointError, match=r"cannot store value of type object at optimizer\.x"):
        encode_state({"x": object()}, "optimizer", {})


def test_hash_params_is_canonical():
    assert hash_params({"a": 1, "b": [1, 2]}) == hash_params({"b": [1, 2], "a": 1})
    assert hash_params({"a": 1}) != hash_params({"a": 2})
    assert len(hash_params(None)) == 16


def test_meta_is_json_and_files_are_safetensors(tmp_path):
    model, opt, sched = trained()
    path = save_checkpoint(tmp_path, 3, model, opt, sched)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format"] == "vlkit-checkpoint" and meta["step"] == 3
    assert meta["optimizer"]["param_groups"][0]["betas"] == {"__tuple__": [0.9, 0.999]}
    assert meta["files"]["model.safetensors"]["bytes"] == (path / "model.safetensors").stat().st_size
    with open(path / "optimizer.safetensors", "rb") as f:  # safetensors header: u64 length + JSON
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert "optimizer.state.0.exp_avg" in header and "optimizer.state.0.step" in header


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=False), st.text(max_size=4))
tensors = st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=4).map(lambda v: torch.tensor(v, dtype=torch.float64))
leaves = st.one_of(scalars, tensors)
nested = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(st.one_of(st.integers(0, 9), st.text(max_size=3)), kids, max_size=3),
    ),
    max_leaves=12,
)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=60, deadline=None)
@given(nested)
def test_encode_decode_round_trip(obj):
    tensors: dict = {}
    data = json.loads(json.dumps(encode_state(obj, "s", tensors)))
    assert same(decode_state(data, tensors), obj)
