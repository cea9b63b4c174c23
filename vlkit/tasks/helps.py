"""Does the in-repo pre-training help fine-tuning? (issue #3; stage ``helps``)

    python -m vlkit.tasks.helps --profile default        # -> results/pretrain/helps.{md,csv}

Full fine-tuning of each pre-trained mini backbone (:mod:`vlkit.pretrain`'s exports) and of the
same architecture without that pre-training (MiniLM text, EfficientNet-Lite0 cells, random
vision / fusion layers: the pre-training's own starting point), with equal budgets -- the
``baselines`` section's per-task settings and the one task runner
(:func:`vlkit.tasks.baselines.run_baselines`). The pre-trained arm is, run for run, the
baselines table's full fine-tuning row of that preset: ``helps_runs.csv`` keeps both arms'
rows with their fingerprints, and the ``baselines`` stage copies the matching ones instead of
training them a second time (:func:`vlkit.tasks.baselines.run_baselines`, ``reuse``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from typing import Sequence

import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["HELPS_KEYS", "helps_table", "helps", "runs_path", "main"]


HELPS_KEYS = ["task", "backbone", "metric", "n_train", "steps"]


def helps_table(pre: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, backbone): val and test scores (percent, +- binomial SE, n) with and
    without the in-repo pre-training, and the test difference with its standard error
    (the two runs' errors combined as independent -- conservative, since both are scored on
    the same test items). ``pre`` / ``base``: :func:`vlkit.tasks.baselines.run_baselines`
    tables of full fine-tuning with and without the pre-trained weights."""

    def side(t, tag):
        t = t[t["method"] == "full"]
        cols = {"val": f"val {tag}", "val_se": f"val_se {tag}", "test": f"test {tag}", "test_se": f"test_se {tag}"}
        return t[HELPS_KEYS + ["n_val", "n_test", *cols]].rename(columns=cols)

    out = side(pre, "pre").merge(side(base, "none"), on=HELPS_KEYS + ["n_val", "n_test"], how="outer")
    out["test diff"] = (out["test pre"] - out["test none"]).round(2)
    out["diff_se"] = ((out["test_se pre"] ** 2 + out["test_se none"] ** 2) ** 0.5).round(2)
    out["val diff"] = (out["val pre"] - out["val none"]).round(2)
    out["helps"] = [("yes" if d > 2 * se else "yes (< 2 SE)") if d > 0 else "no"
                    for d, se in zip(out["test diff"], out["diff_se"])]
    return out.reset_index(drop=True)


def runs_path(profile: str):
    """``helps_runs.csv``: every fine-tuning run of the comparison (both arms, baselines-table
    columns plus ``fingerprint``), read by the baselines stage."""
    from vlkit.results import results_dir

    return results_dir(profile) / "pretrain" / "helps_runs.csv"


def helps(profile: str | None = None, presets: Sequence[str] | None = None) -> pd.DataFrame:
    """Pre-training helps? Full fine-tuning of each pre-trained backbone and of the same
    architecture without the pre-training (MiniLM text, random vision / fusion -- the
    pre-training's own starting point) on ``helps_tasks``, with equal budgets: the
    ``baselines`` section's per-task settings (train subset, steps, lr, eval subsets) and the
    task runner (:func:`vlkit.tasks.runner.finetune`). Writes ``helps.csv`` / ``helps.md`` and
    ``helps_runs.csv`` (:func:`runs_path`; rows of other presets already there are kept) and the
    time to ``timings/pretrain-helps.<profile>.json``."""
    from vlkit import config
    from vlkit.pretrain import PRETRAIN_PRESETS, PretrainConfig, weights_for
    from vlkit.results import atomic_write_text, results_dir, write_json, write_table

    from .baselines import run_baselines

    profile = config.check_profile(profile or config.load_params().get("profile", "default"))
    cfg: PretrainConfig = config.resolve("pretrain", profile)
    bcfg = config.resolve("baselines", profile)
    names = list(presets) if presets else list(cfg.helps_presets)
    weights = {p: str(weights_for(p, profile)) for p in names}
    common = dict(backbones=names, tasks=list(cfg.helps_tasks), text_backbones=[], text_tasks=[], methods=["full"],
                  overrides={}, threads=None)
    t0 = time.perf_counter()
    say = lambda m: log.info("helps: %s", m)  # noqa: E731
    pre, t_pre = run_baselines(dataclasses.replace(bcfg, weights=weights, **common), profile, seed=config.seed(),
                               log=say)
    base, t_base = run_baselines(dataclasses.replace(bcfg, weights={}, **common), profile, seed=config.seed(),
                                 log=say)
    out = results_dir(profile) / "pretrain"

    def with_other_presets(new: pd.DataFrame, path) -> pd.DataFrame:  # a --preset run keeps the others' rows
        if not path.is_file():
            return new
        kept = pd.read_csv(path)
        kept = kept[~kept["backbone"].isin(names) | ~kept["task"].isin(cfg.helps_tasks)]
        return pd.concat([kept, new], ignore_index=True)

    runs = with_other_presets(pd.concat([pre, base], ignore_index=True), runs_path(profile))
    table = with_other_presets(helps_table(pre, base), out / "helps.csv")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(runs_path(profile), runs.to_csv(index=False))
    order = {t: i for i, t in enumerate(cfg.helps_tasks)}
    porder = {p: i for i, p in enumerate(PRETRAIN_PRESETS)}
    table = table.sort_values(["task", "backbone"], key=lambda c: c.map(order if c.name == "task" else porder),
                              kind="stable").reset_index(drop=True)
    for col in ("n_train", "steps", "n_val", "n_test"):
        table[col] = table[col].astype("Int64")
    sets = {t: bcfg.settings(t) for t in cfg.helps_tasks}
    note = (f"Profile `{profile}`. Full fine-tuning with equal budgets (params.yaml `baselines` settings: " +
            "; ".join(f"{t}: train {s['train'] or 'all'}, {s['steps'] or str(s['epochs']) + ' epoch(s)'} at lr "
                      f"{s['lr']} (head x{s['head_lr_mult']}), val/test {'none' if s['val'] == 0 else s['val'] or 'all'}/{s['test'] or 'all'}"
                      for t, s in sets.items()) +
            ") from the pre-trained backbone (`pre`: runs/pretrain/<preset>/final) and from the same "
            "architecture without in-repo pre-training (`none`: MiniLM text, EfficientNet cells, random "
            "vision/fusion layers -- the pre-training's starting point). Scores in percent ± one binomial SE "
            "(n = `n_val` / `n_test` queries; retrieval: R@1 averaged over both directions). `diff_se` combines "
            "the two runs' SEs as independent (conservative: both are scored on the same items). `helps`: test "
            "difference > 0 (and > 2 SE).")
    write_table(table, "helps", out, note=note)
    write_json({"stage": "pretrain-helps", "profile": profile, "presets": names,
                "wall_s": round(time.perf_counter() - t0, 1), "pretrained": t_pre, "not_pretrained": t_base},
               f"timings/pretrain-helps.{profile}" + ("" if presets is None else "." + "-".join(names)),
               results_dir(profile))
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlkit.tasks.helps", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=None, help="ci | default | paper (default: params.yaml's)")
    ap.add_argument("--preset", action="append", default=None, help="only this pre-trained preset (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    helps(args.profile, args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
