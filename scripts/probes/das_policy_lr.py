"""DAS policy-lr probe (issue #4): the search of ``vilt-mini`` on easy-VQA (global scope, k = 2,
the default profile's das settings) at policy lr 1 / 10 / 30 and seeds 0 / 1; prints the chosen
set, the final run's val score and the policy's last probabilities per candidate. The README's
session-4 probe is this script's output; the choice it supports (keep the official lr 1) reads
val only -- ``test`` is printed for the record, not used.

    python scripts/probes/das_policy_lr.py
"""

from __future__ import annotations

import json

import torch

from vlkit import config
from vlkit.methods.das import study as st
from vlkit.tasks.baselines import cached_backbone, task_spec


def main() -> None:
    torch.set_num_threads(2)
    cfg = config.resolve("das", "default")
    cache: dict = {}
    base, _ = cached_backbone("vilt-mini", cfg, cache)
    spec, s, data = task_spec("easyvqa", cfg), cfg.settings("easyvqa"), st.task_data("easyvqa", cfg, "default", cache)
    for lr in (1.0, 10.0, 30.0):
        for seed in (0, 1):
            opts = {**cfg.search_options(), "policy_lr": lr}
            found = st.run_search(spec, base, data, k=2, scope="global", settings=s, options=opts, seed=seed)
            res = st.final_run(spec, base, data, skip=found.best, scope="global", settings=s, seed=seed)
            print(json.dumps({"policy_lr": lr, "seed": seed, "best": list(found.best),
                              "val": round(res["val"]["score"], 2), "test": round(res["test"]["score"], 2),
                              "p_last": {c: round(float(v), 3)
                                         for c, v in zip(found.candidates, found.policy_history[-1])}}), flush=True)


if __name__ == "__main__":
    main()
