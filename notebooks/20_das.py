# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 20 · DAS: which layers does a task not need?
#
# Wu et al., *Parameter and Computation Efficient Transfer Learning for Vision-Language
# Pre-trained Models* (NeurIPS 2023). A policy with one logit per candidate layer samples
# k-sets of layers to skip; every few training steps it scores S sets on **one fresh
# validation batch** (reward `exp(-loss)`; retrieval: the ITM(+ITC) loss on held-out val
# image-caption pairs, while the final runs are scored by R@K on a gallery) and moves towards
# the sets that hurt least. The k most skippable layers are then replaced by small skip
# adapters, the kept ones get parallel adapters, and the final model is trained again from the
# pre-trained weights. Fewer parameters are trained **and** the model is cheaper to run.
#
# This notebook reproduces the paper's three tables on the mini backbones (pre-trained in
# this repo) and the generated tasks:
#
# * **Tab. A** -- per backbone × task × scope × k: the skipped layers, the score, the
#   *additional GMACs* against the un-adapted backbone, the trainable parameters;
# * **Tab. B** -- DAS against random skip sets of the same k (several seeds; differences
#   smaller than the noise are called ties);
# * **Tab. C** -- a language model (MiniLM) on movie reviews: DAS k = 1..3 against full
#   fine-tuning, BitFit, LoRA and Adapter;
# * the policy's skip probabilities over the search, and the GMACs columns of the
#   paper-size `vilt-b32` and `meter-clip16-roberta`.
#
# The logic lives in `vlkit.methods.das` (tested in `tests/methods/test_das_*.py`); this
# notebook runs it with the settings of params.yaml's `das` section and draws the results.

# %% tags=["parameters"]
profile = "ci"  # ci | default | paper (papermill injects the stage's profile here)
results_root = None  # where tables go; None: results/ (runs/results-ci/ under the ci profile)
rerun = True  # False: draw the committed tables of results/das/ without recomputing them

# %%
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from transformers.utils import logging as hf_logging

from vlkit import config
from vlkit.methods.das import candidates
from vlkit.methods.das.study import paper_gmacs, policy_frame, study_table_a, study_table_b, study_table_c
from vlkit.results import results_dir, save_figure, show_table, write_json, write_table

hf_logging.disable_progress_bar()
out = Path(results_root or results_dir(profile)) / "das"
out.mkdir(parents=True, exist_ok=True)
cfg = config.resolve("das", profile)
seed = config.seed()
print(f"profile {profile}: results -> {out}")
print("search:", cfg.search_options(), "| training:", {t: cfg.settings(t) for t in cfg.tasks[:1]})


timings = {}
cache: dict = {}

# %% [markdown]
# ## Tab. A: what DAS skips, what it scores, what it costs
# For each cell the search runs a warm-up epoch on random skip sets, then its policy rounds;
# the final run restarts from the pre-trained backbone with the found set skipped. `k = 0`
# is the adapters-only model; `full` is full fine-tuning with the same number of steps.
# `add_gmacs` is the change in GMACs per example against the un-adapted backbone (adapters
# add a little; each skipped layer removes its whole cost).

# %%
t0 = time.perf_counter()
if rerun or not (out / "table_a.csv").is_file():
    table_a, _, searches = study_table_a(cfg, profile, seed=seed, cache=cache)
    write_table(table_a, "table_a", out, note=(
        f"Profile `{profile}`. Test scores in percent ± one binomial SE (n = `n_test`; retrieval: mean R@1 of "
        "i2t and t2i on the test gallery, n = its images); `val` is the split the search's policy rounds read "
        "(retrieval: rewards from the ITM(+ITC) loss on val image-caption pairs; `val` reports the val gallery's "
        "R@1). `add_gmacs`: GMACs per test example (NLVR: both passes; retrieval: one image-caption pair) of the "
        "final model minus the un-adapted backbone's (`gmacs`); `trainable`: parameters updated (with the task "
        "head). "
        "Cached EfficientNet cells are the image input, so the CNN's GMACs are in no column."))
else:
    table_a, searches = pd.read_csv(out / "table_a.csv"), {}
timings["table_a"] = round(time.perf_counter() - t0, 1)
show_table(table_a, ["task", "backbone", "method", "scope", "k", "skipped", "test", "test_se", "val", "add_gmacs",
               "trainable"])

# %%
for (b, t, scope), g in table_a[table_a.method == "das"].groupby(["backbone", "task", "scope"]):
    g = g.sort_values("k")
    assert g.add_gmacs.is_monotonic_decreasing, f"{b}/{t}/{scope}: GMACs must fall as k grows"
    if ("backbone", b) in cache:  # computed in this run: check the sets against the candidates
        cands = candidates(cache[("backbone", b)][0], scope)
        assert all(n in cands for names in g.skipped.dropna() for n in str(names).split()), (b, t, scope)
full = table_a[table_a.method == "full"]
assert (table_a[table_a.method == "das"].trainable.max() < full.trainable.min()), "DAS must train less than full"
print("every skipped set is made of candidates; GMACs fall with k; DAS trains less than full fine-tuning")

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.6))
pts = table_a.assign(label=[f"{m} k={k}" if m == "das" else m for m, k in zip(table_a.method, table_a.k)])
sns.scatterplot(data=pts, x="add_gmacs", y="test", hue="backbone", style="task", s=70, ax=ax)
for _, r in pts.iterrows():
    ax.annotate(f"{r['label']}" + (f" {r['scope']}" if r["method"] == "das" and r["k"] else ""),
                (r["add_gmacs"], r["test"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
ax.axvline(0, color="grey", lw=0.6)
ax.set_xlabel("additional GMACs per example (vs un-adapted)")
ax.set_ylabel("test score (%)")
ax.set_title("DAS: score against inference cost")
ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
save_figure(fig, out, "score_vs_gmacs")

# %% [markdown]
# ## Tab. B: is the policy better than chance?
# The paper's claim: the searched set beats random sets of the same size. Each headline cell
# runs DAS under several seeds and trains several random sets; a difference smaller than the
# two spreads combined (and at least one test SE) is a **tie**.

# %%
t0 = time.perf_counter()
if rerun or not (out / "table_b.csv").is_file():
    table_b, runs_b = study_table_b(cfg, profile, searches, seed=seed, cache=cache)
    write_table(table_b, "table_b", out, note=(
        f"Profile `{profile}`. DAS: search + final run under each seed ({cfg.seeds}); random: "
        f"{cfg.random_sets} skip sets drawn uniformly (seeded), final run under seed {seed}. Mean and sample "
        "standard deviation of the test score (%); `verdict`: `tie` when |difference| <= max(sqrt(sd_DAS² + "
        "sd_random²), test SE)."))
    write_table(runs_b, "table_b_runs", out)
else:
    table_b, runs_b = pd.read_csv(out / "table_b.csv"), pd.read_csv(out / "table_b_runs.csv")
timings["table_b"] = round(time.perf_counter() - t0, 1)
show_table(table_b)

# %%
fig, ax = plt.subplots(figsize=(5.5, 3))
runs_b = runs_b.assign(cell=[f"{b}\n{t} k={k}" for b, t, k in zip(runs_b.backbone, runs_b.task, runs_b.k)])
sns.stripplot(data=runs_b, x="cell", y="test", hue="kind", dodge=True, size=7, ax=ax)
ax.set_ylabel("test score (%)")
ax.set_xlabel("")
ax.set_title("DAS seeds vs random skip sets")
save_figure(fig, out, "das_vs_random")
assert set(table_b.verdict) <= {"DAS", "random", "tie"}

# %% [markdown]
# ## The policy over the search
# The skip probability of each candidate after every round (round 0: before the first).
# Units the task does not need drift up; a flat bundle means the rewards did not tell the
# sets apart.

# %%
if searches:  # this run's searches (Tab. A and the extra Tab. B seeds)
    policy = policy_frame(searches)
    write_table(policy, "policy", out)
else:
    policy = pd.read_csv(out / "policy.csv")
cells = policy.groupby(["backbone", "task", "scope", "k", "seed"]).size().index.tolist()
first_seed = [c for c in cells if c[4] == min(x[4] for x in cells)]
ncol = min(4, len(first_seed))
nrow = -(-len(first_seed) // ncol)
fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.6 * nrow), squeeze=False)
for ax, (b, t, scope, k, sd) in zip(axes.flat, first_seed):
    g = policy[(policy.backbone == b) & (policy.task == t) & (policy.scope == scope) & (policy.k == k)
               & (policy.seed == sd)]
    sns.lineplot(data=g, x="round", y="p", hue="unit", ax=ax, legend=len(g.unit.unique()) <= 12)
    ax.set_title(f"{b} {t}\n{scope} k={k}", fontsize=8)
    ax.set_ylim(0, 1)
    if ax.get_legend():
        ax.legend(fontsize=5, ncol=2)
for ax in list(axes.flat)[len(first_seed):]:
    ax.axis("off")
save_figure(fig, out, "policy_trajectories")
assert policy.p.between(0, 1).all()

# %% [markdown]
# ## Tab. C: a language model
# MiniLM (real weights) on movie-review sentiment: DAS with k = 1..3 skipped layers against
# the PETL baselines. `add_gmacs` per review at the task's text length.

# %%
t0 = time.perf_counter()
if rerun or not (out / "table_c.csv").is_file():
    table_c, policy_c = study_table_c(cfg, profile, seed=seed, cache=cache)
    write_table(table_c, "table_c", out, note=(
        f"Profile `{profile}`. {cfg.text_backbones[0]} on {cfg.text_tasks[0]}: accuracy and macro-F1 (%) on the "
        "test subset ± one binomial SE; `trainable`: updated parameters with the head; `gmacs` per example "
        "(the first test review's length), `add_gmacs` against the plain backbone. Full fine-tuning at "
        f"lr {cfg.full_lr}, every other method at lr {cfg.settings(cfg.text_tasks[0])['lr']}, same steps."))
    write_table(policy_c, "policy_text", out)
else:
    table_c = pd.read_csv(out / "table_c.csv")
timings["table_c"] = round(time.perf_counter() - t0, 1)
show_table(table_c, ["method", "k", "skipped", "test", "test_se", "macro_f1", "trainable", "gmacs", "add_gmacs"])
das_c = table_c[table_c.method == "das"].sort_values("k")
assert das_c.add_gmacs.is_monotonic_decreasing and (das_c.add_gmacs < 0).all()

# %% [markdown]
# ## The paper-size GMACs columns
# The same accounting on `vilt-b32` (241 tokens) and `meter-clip16-roberta` (384 px + 40
# text tokens), skipping the last k candidates (random weights: MACs do not depend on them).
# Each ViLT layer costs 1.795 GMACs; DAS's Table A implies 1.76.

# %%
t0 = time.perf_counter()
pg = paper_gmacs(cfg)
write_table(pg, "paper_gmacs", out, note="Additional GMACs vs the un-adapted model at batch 1, the presets' own "
            "input sizes; `trainable (M)`: DAS's trainable parameters (adapters, poolers, token-type embeddings; "
            "no task head).")
timings["paper_gmacs"] = round(time.perf_counter() - t0, 1)
show_table(pg)
for (p, scope), g in pg.groupby(["preset", "scope"]):
    assert g.sort_values("k").add_gmacs.is_monotonic_decreasing, (p, scope)

# %%
write_json({"stage": "das", "profile": profile, "seconds": timings}, f"timings/das.{profile}",
           Path(results_root or results_dir(profile)))
print(timings)
