"""Child process for the kill-and-resume tests: trains the tiny task and can die by SIGKILL.

    python train_child.py RUN_DIR [--steps N] [--sleep S] [--kill-event EVENT --kill-step K]
                                  [--save-final PATH]

Prints ``STEP k`` (flushed) after every optimiser step so a parent can kill it mid-training.
``--kill-event`` (a file name written inside a checkpoint, ``renamed`` or ``latest``) makes
the process SIGKILL itself at that point of writing checkpoint ``K`` -- a real SIGKILL (no
cleanup, no atexit), at a deterministic place. ``--save-final`` writes the final weights.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_task  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vlkit import checkpoint  # noqa: E402
from vlkit.train import fit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--kill-event")
    ap.add_argument("--kill-step", type=int)
    ap.add_argument("--save-final")
    args = ap.parse_args()
    tiny_task.setup()

    if args.kill_event:
        target = checkpoint.checkpoint_name(args.kill_step)

        def hook(event: str, path: Path) -> None:
            where = path.read_text() if event == checkpoint.LATEST else str(path)
            if event == args.kill_event and target in where:
                print(f"KILLING at {event} of {target}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.write_hook = hook

    def report(step: int, rec: dict) -> None:
        print(f"STEP {step} {rec['loss']!r}", flush=True)
        if args.sleep:
            time.sleep(args.sleep)

    model = tiny_task.TinyMLP()
    result = fit(model, tiny_task.loss_fn, tiny_task.make_data(), config=tiny_task.config(steps=args.steps),
                 run_dir=args.run_dir, callbacks=[report])
    if args.save_final:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.save_final)
    print(f"DONE {result.step}", flush=True)


if __name__ == "__main__":
    main()
