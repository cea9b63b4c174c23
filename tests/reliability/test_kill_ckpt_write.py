"""SIGKILL while a checkpoint is being written never leaves a corrupt `latest`; the run
resumes from the last complete checkpoint and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import signal

import pytest
from killing import assert_same_state, finish, reference_run, resume_run, start_child

from vlkit.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from tiny_task import TinyMLP


@pytest.fixture(scope="module")
def reference():
    return reference_run()


# event -> (step `latest` names after the kill, does ckpt-00000008 exist?)
CASES = {
    "optimizer.safetensors": (4, False),  # weights + optimizer written, meta.json not yet
    "renamed": (4, True),  # directory complete and renamed, pointer not yet updated
    "latest": (8, True),  # pointer updated, old checkpoints not yet pruned
}


@pytest.mark.parametrize("event", list(CASES))
def test_sigkill_during_checkpoint_write(tmp_path, reference, event):
    ref_result, ref_state = reference
    want_step, ckpt8_exists = CASES[event]
    run = tmp_path / "run"
    rc, out, err = finish(start_child(run, "--kill-event", event, "--kill-step", "8"))
    assert rc == -signal.SIGKILL, f"child was not killed (rc={rc}):\n{out}\n{err}"
    assert f"KILLING at {event} of ckpt-00000008" in out

    ckpt = latest_checkpoint(run)
    assert ckpt == run / f"ckpt-{want_step:08d}"
    assert read_meta(ckpt)["step"] == want_step
    load_checkpoint(ckpt, TinyMLP())
    assert (run / "ckpt-00000008").exists() == ckpt8_exists
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".tmp-")]
    assert bool(leftovers) == (event == "optimizer.safetensors"), leftovers

    result, state = resume_run(run)
    assert result.resumed_from == ckpt
    assert result.losses == ref_result.losses
    assert_same_state(state, ref_state)
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")], "crash leftovers not cleaned up"
    assert latest_checkpoint(run) == run / "ckpt-00000024"
