"""Materialise datasets (the DVC ``data`` stage).

    python -m vlkit.data                         # every set, default knobs, seed 0
    python -m vlkit.data shapes_nlvr --seed 1
    python -m vlkit.data --knobs params.yaml --section data.knobs   # {name: {knob: value}}
    python -m vlkit.data --profile ci            # the sets and knobs of params.yaml's data section

Verifies the vaderSentiment sdist checksum on the way (movie_reviews) and prints one line
per set: name, key, folder and rows per split.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from .registry import DATASETS, load_all, materialise
from .splits import SPLITS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlkit.data", description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"datasets (default: all of {', '.join(DATASETS)})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="default: $VLKIT_DATA_DIR or <repo>/data")
    ap.add_argument("--cache-dir", default=None, help="default: $VLKIT_CACHE_DIR or <repo>/cache")
    ap.add_argument("--knobs", default=None, help="YAML/JSON file with a {name: {knob: value}} mapping")
    ap.add_argument("--section", default=None, help="dotted key of that mapping inside --knobs (e.g. data.knobs)")
    ap.add_argument("--profile", default=None,
                    help="take datasets, knobs and seed from params.yaml's data section for this profile")
    args = ap.parse_args(argv)
    if args.profile:
        from vlkit import config

        from .stage import data_config

        cfg = data_config(args.profile)
        args.names = args.names or list(cfg.datasets)
        args.seed = config.seed()
        profile_knobs = {n: cfg.knobs_for(n) for n in args.names}

    knobs: dict = profile_knobs if args.profile else {}
    if args.knobs:
        with open(args.knobs) as f:
            knobs = yaml.safe_load(f) or {}
        for part in (args.section.split(".") if args.section else []):
            knobs = knobs[part]
    from .stage import stage_time

    with stage_time("data", args.profile):
        for name in args.names or DATASETS:
            kw = dict(knobs.get(name) or {})
            folder = materialise(name, seed=args.seed, data_dir=args.data_dir, cache_dir=args.cache_dir, **kw)
            dd = load_all(name, seed=args.seed, data_dir=args.data_dir, cache_dir=args.cache_dir, **kw)
            rows = " ".join(f"{s}={len(dd[s])}" for s in SPLITS)
            print(f"{name:17s} {folder.name}  {rows}  {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
