"""One place that seeds every random number generator vlkit touches.

* :func:`seed_everything` seeds Python's ``random``, NumPy's global generator and torch
  (CPU and every CUDA device) and returns the data-order generator for epoch 0.
* :func:`data_generator` gives the ``torch.Generator`` that orders epoch ``e`` of a run
  seeded with ``seed``. It depends on ``(seed, epoch)`` only -- never on how many random
  numbers were drawn before -- so a run resumed in the middle of an epoch reproduces that
  epoch's order exactly and can skip the batches it has already seen.
* :func:`rng_state` / :func:`set_rng_state` capture and restore the global generators as
  JSON-able data (no pickle: checkpoints store them in ``meta.json``).

On the CPU, the same seed, the same code and the same thread count give bit-identical
results; :func:`seed_everything` ``(deterministic=True)`` additionally asks torch for
deterministic kernels, which matters on CUDA (cuDNN, cuBLAS) and costs speed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
from typing import Any, Iterator

import numpy as np
import torch

SEED_MAX = 2**32 - 1  # NumPy's legacy global generator takes seeds in [0, 2**32)


def check_seed(seed: Any) -> int:
    """Return ``seed`` if it is an int in ``[0, 2**32)``, else raise ``ValueError`` naming it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= SEED_MAX:
        raise ValueError(f"seed must be an int in [0, {SEED_MAX}], got {seed!r}")
    return int(seed)


def derive_seed(seed: int, *salt: Any) -> int:
    """A 63-bit seed derived from ``seed`` and ``salt`` (e.g. an epoch) by SHA-256.

    Hashing rather than ``seed + epoch`` keeps the streams of (seed=1, epoch=0) and
    (seed=0, epoch=1) unrelated.
    """
    text = ":".join(map(str, (check_seed(seed), *salt)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def data_generator(seed: int, epoch: int = 0) -> torch.Generator:
    """The CPU ``torch.Generator`` that orders epoch ``epoch`` of a run seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, "data", int(epoch)))
    return g


def seed_everything(seed: int, *, deterministic: bool = False) -> torch.Generator:
    """Seed Python ``random``, NumPy's global generator, torch CPU and all CUDA devices.

    Returns :func:`data_generator` ``(seed, 0)``, the generator for the first epoch's order.
    ``deterministic=True`` also calls ``torch.use_deterministic_algorithms(True,
    warn_only=True)``, turns cuDNN benchmarking off and sets ``CUBLAS_WORKSPACE_CONFIG``
    (the recipe of the PyTorch reproducibility notes); the CPU needs none of it.
    ``PYTHONHASHSEED`` cannot be changed inside a running interpreter, so vlkit never
    lets set or dict ordering of strings decide a result.
    """
    seed = check_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily if CUDA is not initialised)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return data_generator(seed, 0)


# --------------------------------------------------------------------------- state <-> JSON
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """The global RNG states as JSON-able data.

    ``python``: ``random.getstate()`` as nested lists; ``numpy``: the legacy MT19937 state
    (key as a list of ints); ``torch``: base64 of ``torch.get_rng_state()``; ``cuda``: one
    base64 string per device, only if CUDA is initialised (an empty list otherwise).
    """
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, [int(k) for k in key], int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "cuda": cuda,
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned. Missing CUDA states are left alone; a state
    for more CUDA devices than this machine has restores the first ones only."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(i) for i in internal), gauss))
        name, key, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(_unb64(state["torch"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"not an RNG state written by vlkit.seeding.rng_state(): {e}") from e
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_unb64(s), i)


__all__ = ["seed_everything", "data_generator", "derive_seed", "check_seed", "rng_state", "set_rng_state"]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under ``torch.manual_seed(seed)`` without touching the caller's RNG."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
