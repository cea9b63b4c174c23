"""Corrupted, truncated and foreign checkpoints are refused with a message naming the file
or the tensors at fault -- by load_checkpoint and by a resuming fit (reliability items 1, 6)."""

from __future__ import annotations

import json

import pytest
import tiny_task
import torch
from torch import nn

from vlkit.checkpoint import META_FILE, MODEL_FILE, STATE_FILE, CheckpointError, load_checkpoint
from vlkit.train import fit


@pytest.fixture()
def run(tmp_path):
    """A finished 8-step run of the tiny task; returns (run_dir, final checkpoint)."""
    run_dir = tmp_path / "run"
    result = fit(tiny_task.TinyMLP(), tiny_task.loss_fn, tiny_task.make_data(), config=tiny_task.config(steps=8),
                 run_dir=run_dir)
    return run_dir, result.checkpoint


def resume(run_dir, model=None, **cfg):
    return fit(model or tiny_task.TinyMLP(), tiny_task.loss_fn, tiny_task.make_data(),
               config=tiny_task.config(steps=8, **cfg), run_dir=run_dir)


def flip_byte(path, offset_from_end=5):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fname", [MODEL_FILE, STATE_FILE])
def test_flipped_byte_is_named(run, fname):
    run_dir, ckpt = run
    flip_byte(ckpt / fname)
    with pytest.raises(CheckpointError, match=rf"{ckpt / fname}: corrupted \(sha256"):
        load_checkpoint(ckpt, tiny_task.TinyMLP(), torch.optim.AdamW(tiny_task.TinyMLP().parameters()))
    with pytest.raises(CheckpointError, match=rf"{ckpt / fname}: corrupted"):
        resume(run_dir)


@pytest.mark.parametrize("fname", [MODEL_FILE, STATE_FILE])
def test_truncated_file_is_named(run, fname):
    run_dir, ckpt = run
    path = ckpt / fname
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size // 2])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated or altered \({size // 2} bytes, expected {size}\)"):
        resume(run_dir)


def test_truncated_file_without_hash_check_still_fails_in_safetensors(run):
    _, ckpt = run
    path = ckpt / MODEL_FILE
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=rf"{path}: unreadable safetensors file"):
        load_checkpoint(ckpt, tiny_task.TinyMLP(), verify=False)


def test_missing_file_is_named(run):
    run_dir, ckpt = run
    (ckpt / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{ckpt / STATE_FILE}: missing"):
        resume(run_dir)


@pytest.mark.parametrize("garbage", [b"", b"{not json", b'{"format": "something-else"}', b"\xff\xfe\x00"])
def test_corrupt_meta_is_named(run, garbage):
    run_dir, ckpt = run
    (ckpt / META_FILE).write_bytes(garbage)
    with pytest.raises(CheckpointError, match=rf"{ckpt / META_FILE}: (unreadable or corrupt|not a vlkit checkpoint)"):
        load_checkpoint(ckpt, tiny_task.TinyMLP())


class OtherPreset(nn.Module):
    preset = "other-mlp"

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(tiny_task.DIM, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)


def test_checkpoint_from_another_preset_is_refused_by_name(run):
    run_dir, ckpt = run
    with pytest.raises(CheckpointError, match=r"written for preset 'tiny-mlp', not 'other-mlp'"):
        load_checkpoint(ckpt, OtherPreset())
    with pytest.raises(CheckpointError, match=r"written for preset 'tiny-mlp', not 'other-mlp'"):
        resume(run_dir, OtherPreset())


def test_another_architecture_lists_the_mismatched_tensors(run):
    _, ckpt = run
    model = OtherPreset()
    model.preset = "?"  # no preset to compare: the tensor check must catch it
    before = tiny_task.flat_params(model)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt, model)
    msg = str(info.value)
    assert "3 shape mismatch(es)" in msg  # net.3.bias is [1] in both
    for diff in ("net.0.weight [16, 6] vs model [32, 6]", "net.0.bias [16] vs model [32]",
                 "net.3.weight [1, 16] vs model [1, 32]"):
        assert diff in msg
    assert torch.equal(before, tiny_task.flat_params(model)), "nothing may be loaded when a check fails"


def test_changed_training_params_are_refused(run):
    run_dir, _ = run
    with pytest.raises(CheckpointError, match=r"params hash '[0-9a-f]{16}', this run has '[0-9a-f]{16}'"):
        resume(run_dir, lr=1e-4)


def test_resume_false_starts_over(run):
    run_dir, _ = run
    flip_byte(run_dir / "ckpt-00000008" / MODEL_FILE)
    result = fit(tiny_task.TinyMLP(), tiny_task.loss_fn, tiny_task.make_data(),
                 config=tiny_task.config(steps=8), run_dir=run_dir, resume=False)
    assert result.resumed_from is None and result.step == 8
    load_checkpoint(run_dir, tiny_task.TinyMLP())  # the new checkpoint is sound


def test_latest_pointing_at_a_deleted_checkpoint_falls_back(run):
    run_dir, ckpt = run
    (run_dir / "latest").write_text("ckpt-00000099\n")
    meta = load_checkpoint(run_dir, tiny_task.TinyMLP())
    assert meta["step"] == 8


def test_meta_json_lists_what_the_issue_asks_for(run):
    _, ckpt = run
    meta = json.loads((ckpt / META_FILE).read_text())
    assert meta["step"] == 8 and len(meta["params_hash"]) == 16
    assert set(meta["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert meta["model"]["preset"] == "tiny-mlp"
    assert meta["model"]["tensors"]["net.0.weight"] == [[16, 6], "float32"]
    assert set(meta["files"]) == {MODEL_FILE, STATE_FILE}
