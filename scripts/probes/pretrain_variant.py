"""Pre-training variant probe (issue #3): pre-train one preset with other steps / hard-negative
settings into its own folder, then fine-tune it as the helps stage's pre-trained arm does
(the ``baselines`` settings, full fine-tuning, one seed) and print val / test per task.

Nothing is written under ``runs/pretrain``; a finished ``OUT/final`` is not trained again.

Session 6's calls and what they printed (vilt-mini, 2 threads, test accuracy / R@1 +- ~2.2;
retrieval +- ~6 on the 20-image gallery)::

    python scripts/probes/pretrain_variant.py --preset vilt-mini --steps 500 --out /tmp/v500
    # 772 s; val ITM 0.69, hard 0.34; NLVR 57.6 (val 53.3), easy-VQA 52.0, retrieval 42.5
    # the same 500 steps with the last 30% drawing half their negatives hard (the dvc repro's
    # first pre-training run, --hard-frac 0.5 --hard-start 0.7): val ITM 0.68, hard 0.45;
    # NLVR 49.2 (val 48.7), easy-VQA 51.2, retrieval 35.0 -- the phase costs NLVR ~8 points
    # 700 steps without it (sessions 3-5): NLVR 59.0 (val 62.0), easy-VQA 79.8, retrieval 49.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch


def main(argv=None) -> None:
    from vlkit import config
    from vlkit.pretrain import build_corpus, build_val_corpus, pretrain_preset
    from vlkit.tasks.baselines import run_baselines

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="vilt-mini")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--hard-frac", type=float, default=0.0)
    ap.add_argument("--hard-start", type=float, default=0.0)
    ap.add_argument("--tasks", nargs="+", default=["shapes_nlvr", "easyvqa", "shapes_retrieval"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="run folder (OUT/final: the exported backbone)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = dataclasses.replace(config.resolve("pretrain", "default"), presets=[a.preset], steps={a.preset: a.steps},
                              hard_frac=a.hard_frac, hard_start=a.hard_start)
    t0 = time.perf_counter()
    rec = pretrain_preset(a.preset, cfg, build_corpus(cfg, "default", "train", 0), build_val_corpus(cfg, "default", 0),
                          run_dir=a.out, seed=0).record
    print(json.dumps({"pretrain_s": round(time.perf_counter() - t0), "val_after": rec.get("val_after")}), flush=True)
    bcfg = dataclasses.replace(config.resolve("baselines", "default"), backbones=[a.preset], tasks=list(a.tasks),
                               text_backbones=[], text_tasks=[], methods=["full"],
                               weights={a.preset: f"{a.out}/final"})
    table, _ = run_baselines(bcfg, "default", seed=0)
    print(table[["task", "backbone", "method", "val", "test", "test_se"]].to_string())


if __name__ == "__main__":
    main()
