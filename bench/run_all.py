"""Run every benchmark in ``bench/`` on every device this machine has (``make bench``).

Benchmarks are not tests: they measure ratios side by side in one run (pruned vs dense,
skipped vs full, SHERL vs full fine-tuning) and write
``results/bench/<bench>.<device>.json`` + ``.md`` through :mod:`vlkit.bench_io`, where
``<device>`` is e.g. ``cpu-2t`` or ``h100``; a run on one device never touches another
device's files, and the report prints "not measured" for a device whose file is absent.

    python -m bench.run_all                 # CPU, and CUDA when available
    python -m bench.run_all --only skip     # one benchmark
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import time
from pathlib import Path

import torch

from vlkit.models.protocol import UnknownNameError

BENCH_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Benchmark names: the ``bench_<name>.py`` modules beside this file."""
    return sorted(m.name.removeprefix("bench_") for m in pkgutil.iter_modules([str(BENCH_DIR)])
                  if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=None, help=f"benchmarks to run (default all: {', '.join(available())})")
    ap.add_argument("--devices", nargs="+", default=None, choices=["cpu", "cuda"],
                    help="default: cpu, plus cuda when available")
    args = ap.parse_args(argv)
    names = args.only or available()
    for name in names:
        if name not in available():
            raise UnknownNameError("benchmark", name, available())
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for name in names:
        module = importlib.import_module(f"bench.bench_{name}")
        for device in devices:
            t0 = time.perf_counter()
            print(f"\n=== bench {name} on {device} ===", flush=True)
            module.main(["--device", device])
            print(f"=== bench {name} on {device}: {time.perf_counter() - t0:.0f} s ===", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
