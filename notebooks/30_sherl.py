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
# # 30 · SHERL: accuracy at a fraction of the training memory?
#
# Diao et al., *SHERL: Synthesizing High Accuracy and Efficient Memory for Resource-Limited
# Transfer Learning* (ECCV 2024). Parameter-efficient methods (Adapter, LoRA, BitFit, prompt
# tuning) train few parameters but still **back-propagate through the whole backbone**, so
# their training memory is close to full fine-tuning's: autograd keeps every layer's
# activations. Memory-efficient methods (LST, UniPT) run the backbone without a graph and
# train a small side network -- cheap, but they give up the backbone's last layers as a
# processor of their output. SHERL's answer (notebook `12_learn_sherl` walks through it):
#
# 1. **early route** -- the first N-1 pre-trained layers run frozen, without an autograd graph;
# 2. a **Multi-Tiered Sensing Adapter** (MTSA) merges their outputs with *redundancy-normalised*
#    linear attention (Eq. 2-3: near-duplicate layers share their weight instead of drowning
#    out the distinct ones);
# 3. **late regulation** -- the merged features go through the **last pre-trained layer**
#    (frozen, but gradients pass through it), then the head.
#
# What the paper claims, and what each section below checks at mini scale:
#
# * **Tab. 1** -- SHERL trains a fraction of a percent of the parameters, needs far less
#   training memory than full fine-tuning and the PETL methods, and its accuracy is close to
#   full fine-tuning and above LST / UniPT. Here: MiniLM on movie-review sentiment, and the
#   in-repo pre-trained `vilt-mini` on easy-VQA (and on the generated NLVR-style task under
#   the `ci` profile; the default grid leaves it out while it sits at chance, params.yaml). Full
#   fine-tuning and SHERL are repeated over seeds (the **headline** rows).
# * **Fig. 4** -- the MTSA's aggregation beats MaxPool, AvePool, MHSA and linear attention
#   without (LinearA) or with a learned (LinearA(r)) redundancy term.
# * **Fig. 7** -- the reduction factor r (MTSA width D/r) trades a little memory for accuracy.
# * **Late regulation** -- feeding the merged features through the last pre-trained layer
#   beats using them directly (0 late layers); more late layers (multi-layer insertion) cost
#   memory.
# * **Beyond Transformers** (Sec. 3.3, Fig. 3b) -- the same recipe on a CNN: the stages of the
#   ImageNet EfficientNet-Lite0 are the shallow features, its last stage the regulating layer.
#   Here: a generated image task (how many objects), beside full fine-tuning and a linear probe.
#
# Memory comes in two forms (`vlkit.methods.sherl_study`): **accounted** (deterministic:
# weights + gradients and AdamW moments of the trained parameters + the bytes autograd saves
# in one training forward, `est_mib`; the activations alone, `saved_mib`) and **measured**
# (peak RSS of two training steps in a fresh subprocess, `peak_mib`, CPU, the way
# `bench/bench_memory.py` measures). Both use the same fixed batch per task (stated in each
# table's note). The logic lives in `vlkit.methods.sherl_study` (tested in
# `tests/methods/test_sherl_study.py`).

# %% tags=["parameters"]
profile = "ci"  # ci | default | paper (papermill injects the stage's profile here)
results_root = None  # where tables go; None: results/ (runs/results-ci/ under the ci profile)
rerun = True  # False: draw the committed tables of results/sherl/ without recomputing them

# %%
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
import torch
from transformers.utils import logging as hf_logging

from vlkit import config
from vlkit.methods.sherl_study import (split_measured, study_aggregators, study_cnn, study_headline, study_late,
                                       study_reduction, study_tab1, with_measured)
from vlkit.results import results_dir, save_figure, show_table, write_json, write_table

hf_logging.disable_progress_bar()
out = Path(results_root or results_dir(profile)) / "sherl"
out.mkdir(parents=True, exist_ok=True)
cfg = config.resolve("sherl", profile)
seed = config.seed()
if cfg.threads:
    torch.set_num_threads(int(cfg.threads))
print(f"profile {profile}: results -> {out}; threads {torch.get_num_threads()}")
print("cells:", cfg.cells(), "| ablation cell:", cfg.ablation_cell(), "| memory:", cfg.memory)


def mem_note(cells):
    parts = []
    for b, t in cells:
        s = cfg.settings(t)
        parts.append(f"`{b}` × `{t}`: train {s['train']} rows, "
                     f"{str(s['steps']) + ' steps' if s['steps'] else str(s['epochs']) + ' epoch(s)'}, batch "
                     f"{s['batch_size']}, test {s['test']} rows")
    return "; ".join(parts)


NOTE_MEM = ("`params_pct`: the method's trainable parameters over the pre-trained backbone's (head excluded, as in "
            "the papers); `trainable`: with the task head. Memory in MiB (2^20 B), one fp32 training step on a fixed "
            "batch of `mem_batch` training examples, text padded to `mem_len` tokens (VL: + 16 image cells; NLVR: its "
            "two passes): `est_mib` = weights + gradients and two AdamW moments of the trained parameters + "
            "`saved_mib` (what autograd saves in one training forward, weights excluded). The measured peak (fresh "
            "subprocess, peak RSS minus RSS after imports, CPU) is in `memory.md`.")
LRS = f"lr {cfg.settings(cfg.cells()[0][1])['lr']} for every method except " + ", ".join(
    f"{m} {lr}" for m, lr in cfg.method_lr.items()) + "; full fine-tuning's head at its `head_lr_mult` x."
timings, measured, cache, computed = {}, [], {}, set()


def run_or_read(name, compute):
    """Compute a table (and keep its measured columns for memory.csv) or read the committed one."""
    t0 = time.perf_counter()
    if rerun or not (out / f"{name}.csv").is_file():
        table = compute()
        scores, meas = split_measured(table)
        measured.append(meas)
        computed.add(name)
    else:
        scores = pd.read_csv(out / f"{name}.csv")
    timings[name] = round(time.perf_counter() - t0, 1)
    return scores


def measured_so_far():
    """This run's measured peaks; with ``rerun=False`` the committed memory.csv's rows as well
    (a table computed now, e.g. a new one, replaces its committed rows)."""
    parts = [m for m in measured if len(m)]
    path = out / "memory.csv"
    if not rerun and path.is_file():
        parts = [pd.read_csv(path)] + parts
    if parts:
        return pd.concat(parts, ignore_index=True).drop_duplicates(subset=["task", "backbone", "method", "options"],
                                                                   keep="last")
    return None


# %% [markdown]
# ## Tab. 1 on text: MiniLM on movie reviews
# Every method fine-tunes the real MiniLM-L6 (22.7 M parameters) on the same training subset
# for the same number of steps. Read the table in three column groups: **what is trained**
# (`params_pct`), **what it costs** (`est_mib`, `saved_mib`, and the measured `peak_mib`) and
# **what it scores** (`test` ± one binomial SE on `n_test` reviews).

# %%
text_cells = [c for c in cfg.cells() if c[0] in cfg.text_backbones]
vl_cells = [c for c in cfg.cells() if c[0] in cfg.backbones]
tab_text = run_or_read("tab1_text", lambda: study_tab1(cfg, profile, seed=seed, cells=text_cells, cache=cache))
write_table(tab_text, "tab1_text", out, note=(
    f"Profile `{profile}`, seed {seed}. {mem_note(text_cells)}. Test accuracy in percent ± one binomial SE. "
    f"{NOTE_MEM} {LRS}"))
tab_text_m = with_measured(tab_text, measured_so_far())
COLS = ["task", "method", "test", "test_se", "params_pct", "trainable", "est_mib", "saved_mib", "peak_mib"]
show_table(tab_text_m, COLS)

# %% [markdown]
# The two claims that must hold by construction -- SHERL trains a small fraction of the
# parameters, and its accounted training memory is below full fine-tuning's -- are checked
# here, together with the measured peaks where both were measured. METL methods (LST, UniPT,
# SHERL) keep far fewer activations than anything that back-propagates through the backbone.


# %%
def check_tab1(t):
    for (task, b), g in t.groupby(["task", "backbone"]):
        g = g.set_index("method")
        if {"sherl", "full"} <= set(g.index):
            s, f = g.loc["sherl"], g.loc["full"]
            assert s.method_params < f.method_params / 50, (task, b, s.method_params, f.method_params)
            assert s.est_mib < f.est_mib, (task, b, s.est_mib, f.est_mib)
            for m in ("lst", "unipt", "sherl"):
                if m in g.index:
                    assert g.loc[m].saved_mib < f.saved_mib, (task, b, m)
            if "peak_mib" in g and pd.notna(s.get("peak_mib")) and pd.notna(f.get("peak_mib")):
                assert s.peak_mib < f.peak_mib, (task, b, s.peak_mib, f.peak_mib)
                print(f"{task}/{b}: measured SHERL peak {s.peak_mib:.0f} MiB = {s.peak_mib / f.peak_mib:.2f} x full "
                      f"({f.peak_mib:.0f} MiB); accounted {s.est_mib / f.est_mib:.2f} x")
    print("SHERL trains < 2% of full fine-tuning's parameters and needs less (accounted, measured) memory")


check_tab1(tab_text_m)
best = tab_text.sort_values("test", ascending=False)
print("ranking by test accuracy:", ", ".join(f"{m} {v:.1f}" for m, v in zip(best.method, best.test)))


# %%
def memory_scatter(t, title, name):
    cells = t.groupby(["task", "backbone"], sort=False).size().index.tolist()
    fig, axes = plt.subplots(1, len(cells), figsize=(5.2 * len(cells), 3.8), squeeze=False)
    for ax, (task, b) in zip(axes.flat, cells):
        g = t[(t.task == task) & (t.backbone == b)]
        sns.scatterplot(data=g, x="est_mib", y="test", hue="method", s=80, ax=ax, legend=ax is axes.flat[0])
        ax.errorbar(g.est_mib, g.test, yerr=g.test_se, fmt="none", ecolor="grey", lw=0.7)
        if "peak_mib" in g and g.peak_mib.notna().any():
            m = g[g.peak_mib.notna()]
            ax.scatter(m.peak_mib, m.test, marker="x", color="black", s=30, label="measured peak")
            for _, r in m.iterrows():
                ax.plot([r.est_mib, r.peak_mib], [r.test, r.test], color="grey", lw=0.5, ls=":")
        for _, r in g.iterrows():
            ax.annotate(r["method"], (r["est_mib"], r["test"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("training memory (MiB, log): accounted ●, measured ×")
        ax.set_ylabel("test score (%)")
        ax.set_title(f"{b} · {task}", fontsize=9)
    if axes.flat[0].get_legend():
        axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out, name)


memory_scatter(tab_text_m, "Tab. 1 (text): accuracy against training memory", "tab1_text_memory")

# %% [markdown]
# ## Tab. 1 on vision-language: `vilt-mini`
# The same methods (the subset of `vl_methods`, stated in the note) on the in-repo pre-trained
# single-stream `vilt-mini` (MiniLM's layers over text tokens and 16 EfficientNet-Lite0 image
# cells), on the profile's `sherl.tasks`: easy-VQA (13 answers; nearly saturated, the
# real-data sanity check) and, where listed, the generated NLVR-style task (two images + a
# statement; two passes per example; out of the default grid while every method sits at
# chance on it at this budget).

# %%
weights = ", ".join(f"{b}: {cfg.weights.get(b) or 'none'}" for b in cfg.backbones)
tab_vl = run_or_read("tab1_vl", lambda: study_tab1(cfg, profile, seed=seed, cells=vl_cells, cache=cache))
write_table(tab_vl, "tab1_vl", out, note=(
    f"Profile `{profile}`, seed {seed}. Methods: {', '.join(cfg.vl_methods)} (a subset of the text table's, for the "
    f"budget). {mem_note(vl_cells)}. `pretrained`: in-repo VL pre-training loaded "
    f"({weights}). Test accuracy in percent ± one "
    f"binomial SE. {NOTE_MEM} {LRS}"))
tab_vl_m = with_measured(tab_vl, measured_so_far())
show_table(tab_vl_m, COLS)
check_tab1(tab_vl_m)
memory_scatter(tab_vl_m, "Tab. 1 (vision-language): accuracy against training memory", "tab1_vl_memory")

# %% [markdown]
# ## Headline: full fine-tuning against SHERL over seeds
# One run per method says little at these test-set sizes (SE ≈ 2 points at 500 examples).
# Each headline cell repeats full fine-tuning and SHERL under every seed (head, data order and
# the MTSA's initialisation change); a difference within the two spreads combined (and at
# least one test SE) is a **tie**.

# %%
t0 = time.perf_counter()
if rerun or not (out / "headline.csv").is_file():
    headline, head_runs = study_headline(cfg, profile, cache=cache)
    write_table(headline, "headline", out, note=(
        f"Profile `{profile}`. Seeds {cfg.seeds}; mean and sample standard deviation (ddof 1) of the test score "
        f"(%), mean binomial SE; `verdict`: `tie` when |difference| <= max(sqrt(sd_a² + sd_b²), SE), else the "
        f"better method. Training as in Tab. 1."))
    write_table(head_runs, "headline_runs", out)
    computed.add("headline")
else:
    headline, head_runs = pd.read_csv(out / "headline.csv"), pd.read_csv(out / "headline_runs.csv")
timings["headline"] = round(time.perf_counter() - t0, 1)
show_table(headline)
assert (headline.runs == len(cfg.seeds)).all() and set(headline.verdict) <= {"tie", *cfg.headline_methods}
ref, contender = cfg.headline_methods
for (t, b), g in headline.groupby(["task", "backbone"]):
    print(f"{b} · {t}: verdict {g.verdict.iloc[0]!r} ({contender} - {ref} = "
          f"{g.iloc[0][f'{contender} - {ref}']:+.2f} points)")

# %%
fig, ax = plt.subplots(figsize=(4.5, 3.2))
hr = head_runs.assign(cell=[f"{b}\n{t}" for b, t in zip(head_runs.backbone, head_runs.task)])
sns.stripplot(data=hr, x="cell", y="test", hue="method", dodge=True, size=7, ax=ax)
ax.set_xlabel("")
ax.set_ylabel("test score (%)")
ax.set_title("full fine-tuning vs SHERL, one dot per seed", fontsize=9)
save_figure(fig, out, "headline_seeds")

# %% [markdown]
# ## Fig. 4: how should the shallow features be merged?
# SHERL's MTSA with its aggregation swapped, everything else fixed (same shallow features,
# same projections, same last layer). `mtsa`: redundancy-normalised linear attention (Eq.
# 2-3); `lineara`: the same without dividing by the redundancy; `lineara_r`: a learned
# redundancy per layer; `maxpool` / `avepool`: element-wise over the layers; `mhsa`: 4-head
# attention with the deepest shallow feature as query. One seed per bar: differences
# smaller than about two SEs are noise.

# %%
t0 = time.perf_counter()
if rerun or not (out / "fig4_aggregators.csv").is_file():
    fig4 = study_aggregators(cfg, profile, seed=seed, cache=cache)
    fig4, _ = split_measured(fig4)
    b, t = cfg.ablation_cell()
    write_table(fig4, "fig4_aggregators", out, note=(
        f"Profile `{profile}`, seed {seed}: SHERL (r = 8, last unit) on `{b}` × `{t}` with each aggregator; test "
        f"accuracy (%) ± one binomial SE; memory accounted as in Tab. 1."))
    computed.add("fig4")
else:
    fig4 = pd.read_csv(out / "fig4_aggregators.csv")
timings["fig4"] = round(time.perf_counter() - t0, 1)
show_table(fig4, ["aggregator", "test", "test_se", "method_params", "saved_mib"])
assert list(fig4.aggregator) == list(cfg.aggregators)
top = fig4.sort_values("test", ascending=False).iloc[0]
print(f"best aggregator here: {top.aggregator} ({top.test:.1f}); MTSA: {fig4.set_index('aggregator').test.get('mtsa')}")

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.2))
sns.barplot(data=fig4, x="aggregator", y="test", hue="aggregator", ax=ax, legend=False)
ax.errorbar(range(len(fig4)), fig4.test, yerr=fig4.test_se, fmt="none", ecolor="black", lw=0.8)
lo = max(0.0, float((fig4.test - 2 * fig4.test_se).min()) - 2)
ax.set_ylim(lo, min(100.0, float((fig4.test + fig4.test_se).max()) + 2))
ax.set_ylabel("test score (%)")
ax.set_title("Fig. 4: SHERL's aggregator ablation (± 1 SE)", fontsize=9)
save_figure(fig, out, "fig4_aggregators")

# %% [markdown]
# ## Fig. 7: the reduction factor r
# The MTSA works at width D / r: smaller r means wider projections, more parameters and more
# activations. The paper reports accuracy rising gently as r shrinks while the memory barely
# moves (the frozen weights dominate). Full fine-tuning is drawn for reference. The accounted
# activations must grow as r shrinks; whether accuracy does is what the run shows.

# %%
fig7 = run_or_read("fig7_reduction", lambda: study_reduction(cfg, profile, seed=seed, cache=cache))
b, t = cfg.ablation_cell()
write_table(fig7, "fig7_reduction", out, note=(
    f"Profile `{profile}`, seed {seed}: SHERL on `{b}` × `{t}` at each reduction factor r (MTSA width D / r), and "
    f"full fine-tuning (r empty). {NOTE_MEM}"))
fig7_m = with_measured(fig7, measured_so_far())
show_table(fig7_m, ["r", "method", "test", "test_se", "method_params", "est_mib", "saved_mib", "peak_mib"])
sw = fig7[fig7.method == "sherl"].sort_values("r", ascending=False)
assert sw.saved_mib.is_monotonic_increasing and sw.saved_mib.is_unique, "activations must grow as r shrinks"
assert sw.method_params.is_monotonic_increasing and sw.method_params.is_unique

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
sm = fig7_m[fig7_m.method == "sherl"].sort_values("r", ascending=False)
full_row = fig7_m[fig7_m.method == "full"]
for ax, col, label in ((axes[0], "est_mib", "accounted"), (axes[1], "peak_mib", "measured peak")):
    if col not in sm or sm[col].isna().all():
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        continue
    sns.lineplot(data=sm, x=col, y="test", marker="o", ax=ax, label="SHERL")
    for _, r in sm.iterrows():
        ax.annotate(f"r={int(r['r'])}", (r[col], r["test"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if len(full_row):  # full FT sits far to the right: drawn as its accuracy, memory in the label
        fm = full_row[col].iloc[0]
        ax.axhline(full_row.test.iloc[0], color="crimson", ls="--", lw=1,
                   label="full FT" + (f" ({fm:.0f} MiB)" if pd.notna(fm) else ""))
    ax.set_xlabel(f"training memory, {label} (MiB)")
    ax.set_ylabel("test score (%)")
    ax.legend(fontsize=7)
fig.suptitle(f"Fig. 7: accuracy against memory over r ({b} · {t})", fontsize=10)
save_figure(fig, out, "fig7_reduction")

# %% [markdown]
# ## Late regulation: through the last pre-trained layer, or not?
# `late_units = 0`: the MTSA's output *is* the final feature (pooled and classified directly;
# the last layer is not run). `1`: SHERL -- the merged features go through the frozen last
# layer. `2`: multi-layer insertion -- one MTSA in front of each of the last two layers, each
# merging everything below it. The layers' activations are the price: each late layer must
# keep its activations for the backward pass.

# %%
late = run_or_read("late_regulation", lambda: study_late(cfg, profile, seed=seed, cache=cache))
write_table(late, "late_regulation", out, note=(
    f"Profile `{profile}`, seed {seed}: SHERL (r = 8) on `{b}` × `{t}` with 0 (MTSA output straight to the pooler), "
    f"1 (the paper's design) or 2 (multi-layer insertion) late pre-trained layers. {NOTE_MEM}"))
late_m = with_measured(late, measured_so_far())
show_table(late_m, ["late_units", "test", "test_se", "method_params", "est_mib", "saved_mib", "peak_mib"])
lt = late.sort_values("late_units")
assert lt.saved_mib.is_monotonic_increasing and lt.saved_mib.is_unique, "each late layer adds its activations"

# %%
fig, ax = plt.subplots(figsize=(4.5, 3.2))
ax.errorbar(lt.late_units, lt.test, yerr=lt.test_se, marker="o", capsize=3)
for _, r in lt.iterrows():
    ax.annotate(f"{r['saved_mib']:.1f} MiB act.", (r["late_units"], r["test"]), fontsize=7, xytext=(4, -10),
                textcoords="offset points")
ax.set_xticks(list(lt.late_units))
ax.set_xlabel("late pre-trained layers (0: none)")
ax.set_ylabel("test score (%)")
ax.set_title("late regulation (± 1 SE)", fontsize=9)
save_figure(fig, out, "late_regulation")

# %% [markdown]
# ## Beyond Transformers: SHERL on a CNN (Sec. 3.3, Fig. 3b)
# SHERL only asks of a backbone that it is a stack of layers whose outputs can be merged. On a
# CNN the "layers" are the **stages** of EfficientNet-Lite0 (ImageNet weights; Tan & Le's
# Table 1): the stem and `Stage0`..`Stage5` form the early route and run without an autograd
# graph; `Stage6`, the last MBConv stage, is the regulating layer. The stages differ in width
# (16 to 192 channels) and resolution (32x32 to 2x2 at 64 px), so before the MTSA each stage's
# output is **average-pooled to the resolution of `Stage6`'s input** and its positions become K
# tokens; each tier of the MTSA down-projects from its stage's own channel count to the shared
# width (192 / r). The merged tokens are reshaped back into a (B, 192, H, W) map, which replaces
# `Stage6`'s input (the MTSA's output gate starts at 0); `Stage6` and the 1x1 head conv (1280
# channels; part of the backbone's `finalize`, not a stage) run frozen *with* a graph, so the
# gradients reach the MTSA through them; the global pool and a linear head follow.
#
# Beside SHERL: **full fine-tuning** (every weight, BatchNorm statistics included) and a
# **linear probe** (the frozen backbone's pooled features, computed once). All three use the
# same one-`Linear` head, like EfficientNet's own classifier. The task, `shapes_count`, is
# generated: how many objects (1-4, balanced) are in a 64 px scene of the shapes used by the
# other generated sets -- not an ImageNet category, so the features must adapt.
#
# What must hold by construction, and is checked below: SHERL trains under 1% of the
# backbone's parameters, and its accounted training memory (and the activations autograd
# keeps) lies between the linear probe's and full fine-tuning's, far below the latter. How the
# three rank in accuracy is what the run shows (under `ci` they train on a few dozen images).

# %%
cnn_s = cfg.cnn_settings()
cnn_tab = run_or_read("cnn", lambda: study_cnn(cfg, profile, seed=seed, cache=cache))
c0 = cnn_tab.iloc[0]
budget = f"{cnn_s['steps']} steps" if cnn_s["steps"] else f"{cnn_s['epochs']} epoch(s)"
write_table(cnn_tab, "cnn", out, note=(
    f"Profile `{profile}`, seed {seed}. `{c0.backbone}` (ImageNet weights) on `{c0.task}` (generated, "
    f"{cnn_s['data']}): all {int(c0.n_train)} training images, {budget}, batch {cnn_s['batch_size']}; test on "
    f"{int(c0.n_test)} images; accuracy in percent ± one binomial SE. Full fine-tuning at lr {cnn_s['full_lr']} "
    f"(its head at {cnn_s['head_lr_mult']} x), SHERL ({cnn_tab.set_index('method').options.get('sherl', '-')}) at "
    f"lr {cnn_s['lr']}, linear probe {cnn_s['probe_epochs']} epochs at lr {cnn_s['probe_lr']} on features computed "
    f"once; one Linear head for every method. `params_pct`: the method's trained backbone parameters over the "
    f"backbone's (head excluded); `trainable`: with the head. Memory in MiB, one fp32 training step on the first "
    f"`mem_batch` training images of `mem_px` px: `est_mib` = weights + gradients and two AdamW moments of the "
    f"trained parameters + `saved_mib` (what autograd saves in one training forward, weights excluded). The "
    f"measured peak (fresh subprocess, peak RSS minus RSS after imports, CPU) is in `memory.md`."))
cnn_m = with_measured(cnn_tab, measured_so_far())
show_table(cnn_m, ["method", "test", "test_se", "params_pct", "method_params", "trainable", "est_mib", "saved_mib",
                   "peak_mib", "steps"])

# %%
c = cnn_m.set_index("method")
if {"full", "sherl"} <= set(c.index):
    s_, f_ = c.loc["sherl"], c.loc["full"]
    assert s_.params_pct < 1.0 and s_.method_params < f_.method_params / 100, (s_.method_params, f_.method_params)
    assert s_.saved_mib < f_.saved_mib / 5 and s_.est_mib < f_.est_mib, (s_.saved_mib, f_.saved_mib)
    if "linear_probe" in c.index:
        p_ = c.loc["linear_probe"]
        assert p_.method_params == 0 and p_.saved_mib < s_.saved_mib and p_.est_mib < s_.est_mib
    print(f"SHERL trains {s_.params_pct:.2f}% of the backbone ({s_.method_params:,} of {f_.method_params:,} "
          f"parameters) and keeps {s_.saved_mib / f_.saved_mib:.3f} x full fine-tuning's activations "
          f"({s_.saved_mib:.1f} vs {f_.saved_mib:.1f} MiB); accounted step memory {s_.est_mib / f_.est_mib:.2f} x")
    if pd.notna(s_.get("peak_mib")) and pd.notna(f_.get("peak_mib")):
        print(f"measured peaks: SHERL {s_.peak_mib:.0f} MiB, full {f_.peak_mib:.0f} MiB")
print("accuracy:", ", ".join(f"{m} {v:.1f} ± {se:.1f}" for m, v, se in zip(cnn_tab.method, cnn_tab.test,
                                                                            cnn_tab.test_se)))

# %%
memory_scatter(cnn_m, "SHERL on a CNN (Fig. 3b): accuracy against training memory", "cnn_memory")

# %% [markdown]
# ## Measured against accounted memory
# The accounted figure is a lower bound of a training step (no allocator slack, no transient
# buffers); the measured peak adds those and the noise of a process's RSS. Their ratio shows
# how far the accounting can be trusted at this scale.

# %%
mem = measured_so_far()
if mem is not None and len(mem):
    write_table(mem, "memory", out, note=(
        f"Profile `{profile}`. Measured training peak (`peak_mib`, MiB): a fresh subprocess per configuration "
        f"(vlkit.efficiency.peak_memory) builds the model, resets the peak RSS counter, runs 2 fused-AdamW training "
        f"steps on the memory batch (`mem_batch` examples, `mem_len` tokens; CNN rows: `mem_batch` images, no text), "
        f"{cfg.threads} thread(s); peak RSS "
        f"minus RSS after the imports. Varies run to run (shared CPU; `load_avg`: 1-min load when measured); "
        f"`step_s`: the last step's time, indicative only. `est_mib` / `saved_mib`: the accounted figures."))
    show_table(mem.assign(ratio=(mem.peak_mib / mem.est_mib).round(2)))
else:
    print("no measured memory (memory: off)")

# %%
timing_file = Path(results_root or results_dir(profile)) / "timings" / f"sherl.{profile}.json"
if not rerun and timing_file.is_file():  # tables read, not recomputed, keep their committed timings
    timings = {**json.loads(timing_file.read_text())["seconds"], **{k: timings[k] for k in computed}}
write_json({"stage": "sherl", "profile": profile, "seconds": timings}, f"timings/sherl.{profile}",
           Path(results_root or results_dir(profile)))
print(timings)

# %% [markdown]
# ## What this run does not cover
# * test-time (inference) memory: every method here runs the same frozen backbone at
#   inference except full fine-tuning's updated weights, so it is not tabulated;
# * SHERL on a CNN is one backbone (EfficientNet-Lite0) on one generated image task, one seed;
#   only the default late route (one regulating stage; no multi-stage insertion or ablations);
# * the paper-size backbones' memory ratios are the benchmark's (`results/bench/memory.*`).
