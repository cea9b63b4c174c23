"""A training process killed with SIGKILL mid-training resumes from its last checkpoint and
ends bit-identical to an uninterrupted run (CPU, same seed) -- reliability issue items 2, 6."""

from __future__ import annotations

import signal

import pytest
from killing import assert_same_state, finish, kill_after_step, reference_run, resume_run, start_child

from vlkit.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, read_meta
from tiny_task import TinyMLP


@pytest.fixture(scope="module")
def reference():
    return reference_run()


def test_sigkill_mid_training_then_resume_equals_uninterrupted(tmp_path, reference):
    ref_result, ref_state = reference
    run = tmp_path / "run"
    proc = start_child(run, "--sleep", "0.05")
    lines = kill_after_step(proc, 10)
    rc, out, err = finish(proc)
    assert rc == -signal.SIGKILL, f"child was not killed (rc={rc}):\n{out}\n{err}"
    lines += out.splitlines()
    steps = [line.split() for line in lines if line.startswith("STEP ")]
    assert len(steps) >= 10 and not any(line.startswith("DONE") for line in lines)

    # The child's losses (another process) equal the in-process reference bit for bit.
    for _, k, loss in steps:
        assert float(loss) == ref_result.losses[int(k) - 1]

    # Whatever instant the kill hit, `latest` names a complete, loadable checkpoint.
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    step = read_meta(ckpt)["step"]
    assert step % 4 == 0 and 8 <= step <= len(steps)
    load_checkpoint(ckpt, TinyMLP())  # sizes + sha256 + names/shapes all check out
    assert all(p.name.startswith("ckpt-") for p in list_checkpoints(run))

    result, state = resume_run(run)
    assert result.resumed_from == ckpt
    assert result.step == 24 and result.finished
    assert result.losses == ref_result.losses
    assert_same_state(state, ref_state)


def test_resuming_a_finished_run_changes_nothing(tmp_path, reference):
    ref_result, ref_state = reference
    run = tmp_path / "run"
    first, state1 = resume_run(run, init_seed=0)  # no checkpoint yet: a fresh run
    assert first.resumed_from is None and first.losses == ref_result.losses
    again, state2 = resume_run(run)
    assert again.resumed_from == run / "ckpt-00000024"
    assert again.losses == ref_result.losses
    assert_same_state(state2, ref_state)
