"""Helpers the benchmarks share (not a benchmark: ``bench.run_all`` runs only ``bench_*.py``).

* :data:`BATCH` / :data:`DTYPE`: the latency setting of DESIGN.md's efficiency accounting --
  CPU batch 1 in fp32, GPU batch 32 in bf16 (``bench_skip``, ``bench_prune_xvlm``);
* :func:`model_inputs`: a backbone's ``dummy_inputs`` on a device, float inputs cast;
* :func:`sync`: ``torch.cuda.synchronize()`` on CUDA, nothing on the CPU (between timed parts);
* :func:`rotated`: the round-robin order of interleaved timing (the list rotated by the round);
* :func:`loadavg` / :func:`contended`: the 1-minute load average recorded beside CPU timings,
  and whether it says other processes shared the cores.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

BATCH = {"cpu": 1, "cuda": 32}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}

__all__ = ["BATCH", "DTYPE", "model_inputs", "sync", "rotated", "loadavg", "contended"]


def model_inputs(model, batch_size: int, device: str, dtype: torch.dtype) -> dict:
    """``model.dummy_inputs(batch_size)`` on ``device``; floating-point inputs cast to ``dtype``
    (token ids and masks keep theirs)."""
    x = model.dummy_inputs(batch_size=batch_size)
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in x.items()}


def sync(device: str) -> None:
    """Wait for the queued CUDA kernels (``device == "cuda"``); nothing on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


def rotated(keys: Sequence, r: int) -> list:
    """``keys`` rotated left by ``r`` (mod its length): round ``r`` of interleaved timing starts
    with a different entry each round, so no entry always runs first (or after the same one).

    >>> rotated(["a", "b", "c"], 1)
    ['b', 'c', 'a']
    """
    keys = list(keys)
    k = r % len(keys) if keys else 0
    return keys[k:] + keys[:k]


def loadavg() -> float | None:
    """The 1-minute load average (``None`` where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def contended(load: float | None) -> bool | None:
    """True when the 1-minute load average exceeds the CPU count: other processes then share
    the cores and wall-clock ratios are unreliable (rerun on an idle machine)."""
    return None if load is None else load > (os.cpu_count() or 1)
