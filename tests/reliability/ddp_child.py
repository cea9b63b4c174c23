"""Two-process smoke run of vlkit.train.fit, launched by test_multiprocess.py as

    python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_child.py OUT_DIR

Each process (gloo on the CPU) runs, on the tiny task:
  A  24 steps uninterrupted, dropout on (ranks draw different masks);
  B  the same run stopped at step 10 and resumed from its checkpoint in a second fit call
     (exercises the per-process RNG states saved in the checkpoint);
  C  24 steps with dropout off, to compare with a one-process run.
and writes OUT_DIR/rank<r>.safetensors (final weights of A, B, C) and OUT_DIR/rank<r>.json
(loss histories, world size, process index).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_task  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vlkit.train import fit  # noqa: E402


def train(run_dir, dropout: bool = True, stop_at_step=None):
    model = tiny_task.TinyMLP()
    if not dropout:
        model.net[2].p = 0.0
    result = fit(model, tiny_task.loss_fn, tiny_task.make_data(), config=tiny_task.config(), run_dir=run_dir,
                 stop_at_step=stop_at_step)
    return model, result


def main() -> None:
    out = Path(sys.argv[1])
    tiny_task.setup()
    a, ra = train(out / "run-a")
    _, rb1 = train(out / "run-b", stop_at_step=10)
    b, rb = train(out / "run-b")
    c, rc = train(out / "run-c", dropout=False)
    from accelerate import PartialState

    state = PartialState()
    rank = state.process_index
    tensors = {f"{tag}.{k}": v.contiguous()
               for tag, m in (("A", a), ("B", b), ("C", c)) for k, v in m.state_dict().items()}
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    info = {"rank": rank, "world": state.num_processes, "A": ra.losses, "B": rb.losses, "C": rc.losses,
            "B_stopped_at": rb1.step, "B_resumed_from": str(rb.resumed_from)}
    (out / f"rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
