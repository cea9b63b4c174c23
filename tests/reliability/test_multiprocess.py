"""The same fit() runs unchanged under torchrun (2 CPU processes, gloo): the processes end
with identical weights, a stopped-and-resumed two-process run equals an uninterrupted one
bit for bit, and without dropout the two-process run follows the one-process run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_task
import torch
from killing import child_env
from safetensors.torch import load_file

from vlkit.checkpoint import read_meta
from vlkit.train import fit

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = child_env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(HERE / "ddp_child.py"), str(out)], capture_output=True, text=True, env=env,
                          timeout=180, cwd=HERE.parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_both_processes_ran_and_agree_bit_for_bit(ddp_out):
    infos = [json.loads((ddp_out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [i["rank"] for i in infos] == [0, 1] and {i["world"] for i in infos} == {2}
    w0, w1 = (load_file(str(ddp_out / f"rank{r}.safetensors")) for r in range(2))
    assert list(w0) == list(w1)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert infos[0]["A"] == infos[1]["A"]  # logged loss = mean over processes, identical on both


def test_two_process_resume_equals_uninterrupted(ddp_out):
    info = json.loads((ddp_out / "rank0.json").read_text())
    assert info["B_stopped_at"] == 10 and info["B_resumed_from"].endswith("ckpt-00000010")
    assert info["B"] == info["A"]
    w = load_file(str(ddp_out / "rank1.safetensors"))  # rank 1: its own RNG state came back too
    for k in [k for k in w if k.startswith("A.")]:
        assert torch.equal(w[k], w["B." + k[2:]]), k
    rngs = read_meta(ddp_out / "run-a")["rng"]
    assert len(rngs) == 2 and rngs[0]["torch"] != rngs[1]["torch"]  # one RNG state per process


def test_two_processes_follow_one_process(ddp_out):
    tiny_task.setup()
    model = tiny_task.TinyMLP()
    model.net[2].p = 0.0
    ref = fit(model, tiny_task.loss_fn, tiny_task.make_data(), config=tiny_task.config())
    info = json.loads((ddp_out / "rank0.json").read_text())
    assert info["C"] == pytest.approx(ref.losses, rel=1e-5, abs=1e-6)
    w = load_file(str(ddp_out / "rank0.safetensors"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(w["C." + k], v, rtol=1e-5, atol=1e-6)
