"""Helpers for the kill-and-resume tests: launch ``train_child.py``, kill it, compute the
uninterrupted reference in-process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import tiny_task

from vlkit.train import fit

HERE = Path(__file__).resolve().parent
CHILD = HERE / "train_child.py"
ROOT = HERE.parent.parent
TIMEOUT_S = 120


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def start_child(run_dir: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(CHILD), str(run_dir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT)
    watchdog = threading.Timer(TIMEOUT_S, proc.kill)  # never let a stuck child hang the suite
    watchdog.daemon = True
    watchdog.start()
    proc.watchdog = watchdog
    return proc


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate()
    proc.watchdog.cancel()
    return proc.returncode, out, err


def kill_after_step(proc: subprocess.Popen, step: int) -> list[str]:
    """Read the child's ``STEP k`` lines; SIGKILL it once step ``step`` was reported."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(f"STEP {step} "):
            os.kill(proc.pid, signal.SIGKILL)
            break
    return lines


def reference_run(steps: int = 24):
    """The uninterrupted run, in this process: (TrainResult, final state dict)."""
    tiny_task.setup()
    model = tiny_task.TinyMLP()
    result = fit(model, tiny_task.loss_fn, tiny_task.make_data(), config=tiny_task.config(steps=steps))
    return result, {k: v.clone() for k, v in model.state_dict().items()}


def resume_run(run_dir: Path, steps: int = 24, init_seed: int = 123):
    """Resume ``run_dir`` in this process with a freshly built model: (TrainResult, state dict).

    The model is initialised with another seed by default: everything must come from the
    checkpoint."""
    tiny_task.setup()
    model = tiny_task.TinyMLP(seed=init_seed)
    result = fit(model, tiny_task.loss_fn, tiny_task.make_data(), config=tiny_task.config(steps=steps),
                 run_dir=run_dir)
    return result, model.state_dict()


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert bool((a[k] == b[k]).all()), f"{k} differs (max abs diff {(a[k] - b[k]).abs().max().item()})"
