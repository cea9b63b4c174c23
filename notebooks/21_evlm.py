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
# # 21 · EfficientVLM: distil a half-depth student, then let one budget decide where to prune
#
# Wang et al., *EfficientVLM: Fast and Accurate Vision-Language Models via Knowledge
# Distillation and Modal-adaptive Pruning* (ACL Findings 2023). Two steps:
#
# 1. **distil** -- a student with half the layers of every encoder (vision, text, fusion),
#    initialised from every other teacher layer, learns from the teacher's attention maps,
#    hidden states and logits as well as from the labels;
# 2. **prune** -- every attention head and FFN unit of the student gets a hard-concrete gate
#    (notebook 11 walks through one); a Lagrangian term holds the expected model size to a
#    target sparsity. With **one global budget** over the three encoders (*modal-adaptive*)
#    the optimiser decides which encoder gives up how much; the baseline holds **each encoder
#    to the same target** (*uniform*). At the end the closed heads and units are physically
#    removed, so the smaller model really is smaller and faster.
#
# This notebook runs the recipe on the mini models -- teacher `xvlm-mini` (6 vision / 6 text /
# 6 fusion layers, pre-trained in this repo) and student `xvlm-mini-half` (3/3/3, teacher
# layers 1, 3, 5) -- on the generated NLVR task and easy-VQA, and rebuilds the paper's
# tables at that scale:
#
# * **Tab. 3** teacher, un-distilled student, EfficientVLM with the modal-adaptive and with the
#   uniform budget at the same sparsity (side by side, whatever the outcome);
# * **where the global budget put the pruning** (the paper's key finding);
# * **Tab. 1** manual per-encoder sparsities; **Tab. 4** KD only / pruning only / fine-tune only,
#   and pre-training distillation with its objectives added one by one;
# * **Fig. 2** head-pruning sensitivity per encoder; **Fig. 3** a sparsity sweep;
# * **Tab. 2** parameters, GMACs and latency per module, at mini and at paper size.
#
# The logic lives in `vlkit.methods.evlm` (`study.py`, tested in
# `tests/methods/test_evlm_study.py`); this notebook runs it with params.yaml's `evlm`
# section and draws the results.

# %% tags=["parameters"]
profile = "ci"  # ci | default | paper (papermill injects the stage's profile here)
results_root = None  # where tables go; None: results/ (runs/results-ci/ under the ci profile)
rerun = True  # False: draw the committed tables of results/evlm/ without recomputing them

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
from vlkit.methods.evlm import layer_pairs
from vlkit.methods.evlm.study import (ENCODERS, Study, module_macs, module_params, sensitivity, summarise,
                                      sweep, table_1, table_2, table_3, table_4, trajectories)
from vlkit.methods.evlm.pretrain_kd import table_4_pretrain
from vlkit.models.xvlm import student_layer_map
from vlkit.results import results_dir, save_figure, show_table, write_json, write_table

hf_logging.disable_progress_bar()
out = Path(results_root or results_dir(profile)) / "evlm"
out.mkdir(parents=True, exist_ok=True)
cfg = config.resolve("evlm", profile)
seed = config.seed()
study = Study(cfg, profile, seed=seed)
print(f"profile {profile}: results -> {out}")
print("distillation:", cfg.distill_config())
print("pruning:", cfg.prune_options())


def table(name, compute, note=None):
    """Compute and write a table (rerun) or read the committed one."""
    t0 = time.perf_counter()
    if rerun or not (out / f"{name}.csv").is_file():
        df = compute()
        write_table(df, name, out, note=note)
    else:
        df = pd.read_csv(out / f"{name}.csv")
    timings[name] = round(time.perf_counter() - t0, 1)
    return df


timings = {}
COLS = ["task", "method", "seed", "test", "test_se", "target", "sparsity", "sparsity_vision", "sparsity_text",
        "sparsity_fusion", "params_M", "gmacs", "gmacs_vision", "gmacs_text", "gmacs_fusion"]

# %% [markdown]
# ## The student: every other layer of the teacher
# Student layer *i* of each encoder starts as a copy of teacher layer *2i + 1* (counting from
# 0), and the distillation losses compare exactly those pairs -- so the last student layer
# meets the last teacher layer.

# %%
teacher_bb, student_bb, pretrained = study.backbones()
pairs = layer_pairs(student_bb, teacher_bb)
print(f"teacher {cfg.teacher}: {len(teacher_bb.unit_names)} units; student {cfg.student}: "
      f"{len(student_bb.unit_names)} units; pre-trained VL weights: {pretrained}")
print("distilled pairs:", ", ".join(f"{s}<-{t}" for s, t in pairs))
sizes = pd.DataFrame([{"model": n, **{k: round(v / 1e6, 3) for k, v in module_params(m).items()}}
                      for n, m in ((cfg.teacher, teacher_bb), (cfg.student, student_bb))])
show_table(sizes)

# %%
for enc in ENCODERS:
    s_units, t_units = student_bb.units_of(enc), teacher_bb.units_of(enc)
    expected = [t_units[j] for j in student_layer_map(len(s_units), len(t_units))]
    assert [t for s, t in pairs if s in s_units] == expected, enc
    for s, t in zip(s_units, expected):  # the student starts as the teacher's odd layers
        sd, td = student_bb.unit(s).state_dict(), teacher_bb.unit(t).state_dict()
        assert all((sd[k] == td[k]).all() for k in sd), (s, t)
print("student layer i = teacher layer 2i+1 in every encoder, weights included")

# %% [markdown]
# ## Tab. 3: teacher, student, EfficientVLM -- modal-adaptive and uniform at equal sparsity
# The teacher is fine-tuned on each task. Every student row trains the same number of steps on
# the same data order: the *un-distilled student* with the task loss only; EfficientVLM with
# task-time distillation from the fine-tuned teacher and hard-concrete pruning to the target
# sparsity -- once with one global budget (modal-adaptive) and once with one budget per encoder
# (uniform). `sparsity` is what the frozen masks removed, as a share of the prunable
# parameters (every q/k/v/o and FFN weight); `params_M` and `gmacs` are those of the final,
# physically pruned model (GMACs per test example; NLVR runs two passes).
#
# Seeds: on the `headline` tasks of params.yaml (default: shapes_nlvr, the generated task that
# separates methods) the student and both EfficientVLM rows run every seed of `seeds` (default
# three) and the table gives their mean and spread; the teachers and the other task's rows run
# one seed -- that is what the 30-minute budget allows.

# %%
runs3 = table("table3_runs", lambda: table_3(study), note=(
    f"Profile `{profile}`. One row per run. Test accuracy (%) ± one binomial SE (n = `n_test`); `sparsity`: "
    "removed / prunable parameters of the frozen masks (overall and per encoder); `exp_sparsity`: the "
    "budget's expected sparsity at the last pruning step; `params_M`, `gmacs` (per test example, cached "
    "image cells as input) of the final model, per module too. Headline tasks "
    f"({', '.join(cfg.headline) or 'none'}) run seeds {cfg.seeds} for the student and EfficientVLM rows."))
table3 = summarise(runs3)
write_table(table3, "table3", out, note=(
    f"Profile `{profile}`. Mean test accuracy (%) over `seeds` runs, `test_sd` their sample SD (0 for one "
    "run), `test_se` the mean binomial SE. Modal-adaptive (one global budget) and uniform (one budget per "
    f"encoder) at the same target sparsity {cfg.target}."))
show_table(table3, ["task", "method", "seeds", "test", "test_sd", "test_se", "sparsity", "sparsity_vision",
              "sparsity_text", "sparsity_fusion", "params_M", "gmacs"])

# %% [markdown]
# What must hold for every pruned model: the parameters that disappeared are exactly the
# ones the masks imply; the achieved sparsity sits within the profile's tolerance of its
# target; the pruned model is cheaper than the dense student.

# %%
def check_pruned(rows, what, tolerance=None):
    """Removed parameters = the masks' count; achieved sparsity within ``tolerance`` (default:
    the profile's) of the target; the pruned model cheaper than the dense student."""
    tolerance = cfg.tolerance if tolerance is None else tolerance
    student = rows[rows.variant == "student"].groupby("task").first()
    pruned = rows[rows.scope.notna()]
    for _, r in pruned.iterrows():
        if "removed_masks" in r and pd.notna(r["removed_masks"]):
            assert r["removed_masks"] == r["removed_measured"], (what, r["method"], r["task"])
        assert abs(r["sparsity"] - r["target_all"]) <= tolerance, (
            f"{what}: {r['method']} on {r['task']} (seed {r['seed']}) reached sparsity {r['sparsity']:.3f}, "
            f"target {r['target_all']}, tolerance {tolerance}")
        if r["task"] in student.index and r["sparsity"] > 0:
            assert r["gmacs"] < student.loc[r["task"], "gmacs"] and r["params_M"] < student.loc[r["task"], "params_M"]
    return len(pruned)


n = check_pruned(runs3, "Tab. 3")
print(f"{n} pruned models: removed parameters = the masks' count, sparsity within {cfg.tolerance} of the "
      "target, fewer GMACs and parameters than the dense student")
teach = runs3[runs3.variant == "teacher"]
stud = runs3[runs3.variant == "student"].groupby("task").first()
assert (teach.set_index("task").params_M > stud.params_M.reindex(teach.task)).all(), "the student is smaller"

# %% [markdown]
# ## Where did the global budget put the pruning?
# The modal-adaptive budget only fixes the *total*; how much each encoder gives up is learned.
# The paper's finding (at full scale): the allocation differs by task, and vision / text /
# fusion are not equally expendable. Here is what the mini models learned -- against the
# uniform budget, which holds every encoder to the target by construction.

# %%
pr = runs3[runs3.scope.notna()].copy()
long = pr.melt(id_vars=["task", "scope", "seed"], value_vars=[f"sparsity_{m}" for m in ENCODERS],
               var_name="encoder", value_name="encoder sparsity")
long["encoder"] = long.encoder.str.removeprefix("sparsity_")
long["budget"] = long.scope.map({"global": "modal-adaptive", "per_group": "uniform"})
g = sns.catplot(data=long, x="encoder", y="encoder sparsity", hue="budget", col="task", kind="bar",
                errorbar="sd", height=3, aspect=1.1)
for ax in g.axes.flat:
    ax.axhline(cfg.target, color="grey", lw=0.8, ls="--")
g.figure.suptitle(f"Learned per-encoder sparsity at overall target {cfg.target}", y=1.04)
save_figure(g.figure, out, "encoder_sparsity")
alloc = (pr[pr.scope == "global"].groupby("task")[[f"sparsity_{m}" for m in ENCODERS]].mean().round(3))
alloc.columns = list(ENCODERS)
write_table(alloc.reset_index(), "encoder_sparsity", out, note=(
    f"Profile `{profile}`. Share of each encoder's prunable parameters removed by the modal-adaptive (global) "
    f"budget at overall target {cfg.target}, mean over seeds."))
for task, r in alloc.iterrows():
    order = r.sort_values(ascending=False)
    print(f"{task}: the global budget pruned " + ", ".join(f"{k} {v:.0%}" for k, v in order.items())
          + f" (spread {order.max() - order.min():.0%})")

# %% [markdown]
# ## The controller at work
# The expected sparsity (solid) follows the warmed-up target (dashed) during the pruning
# phase; the masks are frozen at the last step. Thin lines: each encoder's expected sparsity.

# %%
traj = table("trajectories", lambda: trajectories(study))
tr = traj[(traj.seed == seed) & (traj.method == "evlm") & (traj.target.astype(str) == f"{cfg.target:g}")]
cells = tr.groupby(["task", "scope"]).size().index.tolist()
fig, axes = plt.subplots(1, max(1, len(cells)), figsize=(3.3 * max(1, len(cells)), 2.8), squeeze=False)
for ax, (task, scope) in zip(axes.flat, cells):
    c = tr[(tr.task == task) & (tr.scope == scope)]
    ax.plot(c.step, c.sparsity, color="k", label="expected (all)")
    ax.plot(c.step, c.t, color="k", ls="--", label="target")
    for m, col in zip(ENCODERS, sns.color_palette(n_colors=3)):
        ax.plot(c.step, c[f"s_{m}"], color=col, lw=0.8, label=m)
    ax.set_title(f"{task}\n{'modal-adaptive' if scope == 'global' else 'uniform'}", fontsize=8)
    ax.set_xlabel("pruning step")
    ax.set_ylim(-0.02, 1)
axes.flat[0].set_ylabel("sparsity")
axes.flat[0].legend(fontsize=6)
save_figure(fig, out, "controller")
assert len(cells) and traj.sparsity.between(0, 1).all() and traj.t.between(0, 1).all()

# %% [markdown]
# ## Tab. 1: manual per-encoder sparsities
# The paper's manual settings hold each encoder to its own target (vision / text / fusion:
# .3/.3/.3, .1/.4/.4, .1/.1/.6 -- about the same overall sparsity), beside the modal-adaptive
# budget at that overall sparsity (`target_all`: the manual targets' size-weighted mean).

# %%
table1 = table("table1", lambda: table_1(study), note=(
    f"Profile `{profile}`, task `{cfg.manual_task}`, seed {seed}. Manual rows: one budget per encoder with "
    "the [vision, text, fusion] targets of `target`; `target_all`: the overall sparsity they amount to "
    "(size-weighted); modal-adaptive: one global budget at the mean of those, rounded to 0.05."))
if len(table1):
    show_table(table1, COLS[:5] + ["target_all"] + COLS[5:])
    check_pruned(pd.concat([table1, runs3[runs3.variant == "student"]]), "Tab. 1")
    man = table1[table1.scope == "per_group"]
    for _, r in man.iterrows():  # each encoder near its own target
        for m, t in zip(ENCODERS, str(r["target"]).split("/")):
            assert abs(r[f"sparsity_{m}"] - float(t)) <= 2 * cfg.tolerance, (r["target"], m, r[f"sparsity_{m}"])

# %% [markdown]
# ## Tab. 4 (fine-tuning): what each half of the recipe buys
# Full EfficientVLM (distillation + pruning), distillation only (the dense student), pruning
# only (no teacher), fine-tuning only -- same steps, same data order, same seed.

# %%
table4 = table("table4", lambda: table_4(study), note=(
    f"Profile `{profile}`, seed {seed}. Pruned rows: global budget at target {cfg.target}. KD: task-time "
    "distillation from the fine-tuned teacher (attention, hidden, logits + task loss)."))
show_table(table4, COLS)
assert set(table4.variant) <= {"evlm", "kd", "prune", "student"}

# %% [markdown]
# ### Tab. 4 (pre-training): distillation objectives added one by one
# The paper also distils the student *task-agnostically*, during vision-language pre-training,
# adding the objectives one by one -- attention maps, + hidden states, + logits -- and then
# fine-tunes each student on the task. Here: `pretrain_kd.steps` steps on the pre-training
# corpus (the `pretrain` section's) from the frozen pre-trained teacher, with the student's
# own ITM + MLM + ITC loss beside the KD terms (`evlm.distill` weights; self-attention maps
# only, as the official pre-training script), then exactly the "fine-tune only" recipe (no
# task-time KD, no pruning, same steps, same seed). The teacher checkpoint holds the backbone
# only, so its ITM head is refitted for `pretrain_kd.head_steps` steps on the frozen teacher
# before the logits are distilled (MLM logits are not: `vlkit/methods/evlm/pretrain_kd.py`).
# At this budget (a few dozen steps, where the real recipe runs epochs) the rows say whether
# a short general distillation moves the fine-tuned score at all, not what full-scale
# pre-training KD buys.

# %%
pkd = cfg.pretrain_kd_options()
table4p = table("table4_pretrain", lambda: table_4_pretrain(study), note=(
    f"Profile `{profile}`, task `{cfg.ablation_tasks[0]}`, seed {seed}. Each student: `pretrain_steps` steps of "
    f"pre-training distillation (batch {pkd['batch_size']}) from the frozen pre-trained teacher with the objectives "
    "named (plus the student's own ITM + MLM + ITC loss; logits: ITM head refitted on the teacher for "
    f"{pkd['head_steps']} steps), then fine-tuned as the un-distilled student (task loss only, no pruning). "
    "`seconds`: that row's wall time (pre-training KD + fine-tuning)."))
show_table(table4p, ["task", "objectives", "pretrain_steps", "finetune_steps", "test", "test_se", "seconds"])

# %%
names = {"attn": "attention", "hidden": "hidden", "logits": "logits"}
expected = ["no pre-training KD"] + ["+ " + " + ".join(names[x] for x in o) for o in pkd["objectives"]]
assert list(table4p.objectives) == expected, (list(table4p.objectives), expected)
sets = [set(o) for o in pkd["objectives"]]
assert all(a < b for a, b in zip(sets, sets[1:])), "each row adds objectives to the one before"
assert table4p.finetune_steps.nunique() == 1, "every student is fine-tuned the same number of steps"
assert list(table4p.pretrain_steps) == [0] + [pkd["steps"]] * len(pkd["objectives"])
assert table4p.task.nunique() == 1 and table4p.test.between(0, 100).all()
base4 = table4p.iloc[0]
ft_only = table4[table4.variant == "student"].iloc[0]
if rerun:  # same process, same cached run (committed tables may come from another machine)
    assert base4.test == ft_only.test, "the first row is Tab. 4's fine-tune-only student"
for _, r in table4p.iloc[1:].iterrows():
    print(f"{r['objectives']:32s} {r['test']:6.2f} ({r['test'] - base4.test:+.2f} vs no pre-training KD, "
          f"SE {r['test_se']:.2f})")

# %% [markdown]
# ## Fig. 3: the sparsity sweep
# The same recipe at several target sparsities, modal-adaptive against uniform; the dashed
# lines are the teacher and the un-distilled student.

# %%
sw = table("sweep", lambda: sweep(study), note=(
    f"Profile `{profile}`, task `{cfg.sweep_task}`, seed {seed}: EfficientVLM (KD + pruning) at each target "
    "sparsity under each budget."))
if len(sw):
    show_table(sw, COLS)
    # The sweep's high targets are where a few dozen controller steps settle least (the
    # multipliers built up while the target ramped have to unwind): each point is drawn at its
    # *achieved* sparsity, points further than the tolerance from their target are listed, and
    # the check allows twice the tolerance here.
    off = sw[(sw.sparsity - sw.target_all).abs() > cfg.tolerance]
    for _, r in off.iterrows():
        print(f"off target: {r['method']} at target {r['target_all']} reached {r['sparsity']:.3f} "
              f"(expected sparsity at the last pruning step {r['exp_sparsity']:.3f})")
    check_pruned(pd.concat([sw, runs3[runs3.variant == "student"]]), "Fig. 3", tolerance=2 * cfg.tolerance)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    sw = sw.assign(budget=sw.scope.map({"global": "modal-adaptive", "per_group": "uniform"}))
    sns.lineplot(data=sw, x="sparsity", y="test", hue="budget", style="budget", markers=True, ax=ax)
    ref = runs3[(runs3.task == cfg.sweep_task) & runs3.variant.isin(["teacher", "student"])]
    for (v, grp), ls in zip(ref.groupby("variant"), (":", "--")):
        ax.axhline(grp.test.mean(), color="grey", ls=ls, lw=0.8, label=v)
    ax.set_xlabel("achieved sparsity (share of prunable parameters removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{cfg.sweep_task}: score against sparsity")
    ax.legend(fontsize=7)
    save_figure(fig, out, "sweep")
    g_sw = sw[sw.scope == "global"].sort_values("target_all")
    fig, ax = plt.subplots(figsize=(5, 3))
    for m in ENCODERS:
        ax.plot(g_sw.target_all, g_sw[f"sparsity_{m}"], marker="o", label=m)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
    ax.set_xlabel("overall target")
    ax.set_ylabel("encoder sparsity")
    ax.set_title("modal-adaptive: each encoder's share of the pruning")
    ax.legend(fontsize=7)
    save_figure(fig, out, "sweep_allocation")
    assert g_sw.sparsity.is_monotonic_increasing, "a higher target must remove more"
if rerun:  # the controller's path of every pruning run so far (Tab. 1, 4 and the sweep too)
    traj = trajectories(study)
    write_table(traj, "trajectories", out)

# %% [markdown]
# ## Fig. 2: how much does each encoder's attention matter?
# Take the fine-tuned model, switch off a fraction of the heads of **one** encoder (the least
# important first, by the gradient of the loss with respect to a mask on each head -- Michel et
# al. 2019) and measure the test score without retraining. A flat curve is an encoder the task
# can spare heads of; a steep one is where a uniform budget hurts.

# %%
sens = table("sensitivity", lambda: sensitivity(study), note=(
    f"Profile `{profile}`, seed {seed}. The fine-tuned `{cfg.sensitivity_options()['model']}` with `fraction` of "
    "the heads of one encoder masked (fusion: self- and cross-attention heads alike), chosen by "
    f"`{cfg.sensitivity_options()['rule']}`; no retraining. `drop` = unpruned - pruned test accuracy (%)."))
show_table(sens, ["task", "encoder", "fraction", "heads_dropped", "heads", "test", "unpruned", "drop"])
g = sns.relplot(data=pd.concat([sens, sens.drop_duplicates(["task", "encoder"]).assign(fraction=0.0, drop=0.0)]),
                x="fraction", y="drop", hue="encoder", col="task", kind="line", marker="o", height=3, aspect=1.1)
g.set_axis_labels("share of its heads removed", "score drop (points)")
save_figure(g.figure, out, "sensitivity")
assert (sens.heads_dropped <= sens.heads).all()
full_drop = sens[sens.fraction == 1.0]
assert (full_drop.heads_dropped == full_drop.heads).all()

# %% [markdown]
# ## Tab. 2: parameters, GMACs and latency per module
# Mini rows: the teacher, the dense student and the pruned students of Tab. 3 (one
# (image, text) pass: 17 image and 40 text tokens). Paper rows: `xvlm-clip` (12 vision / 6 text
# / 6 fusion layers) and EfficientVLM's `xvlm-clip-small` (6/3/3) at the paper's input (196
# patches + [CLS], 35 text tokens; random weights -- MACs and latency do not depend on them),
# and the latter pruned uniformly. Latency comes from the benchmark files
# (`results/bench/<bench>.<device>.json`); "not measured" where a device has none.

# %%
table2 = table("table2", lambda: table_2(study), note=(
    f"Profile `{profile}`. GMACs of one (image, text) pass per module (embeddings with their tower, pooler "
    "with fusion); `params_M` per module (`total` adds the contrastive projections). Latency: "
    f"benches {cfg.latency_benches} (ms; 'not measured' where the device has no file or row)."))
show_table(table2)

# %%
for name, grp in table2.groupby("model", sort=False):
    parts = grp.set_index("module")
    assert abs(parts.loc[list(ENCODERS), "gmacs"].sum() - parts.loc["total", "gmacs"]) < 2e-3, name
x = student_bb.dummy_inputs(1)
mm = module_macs(student_bb, x)
assert sum(mm[m] for m in ENCODERS) == mm["total"]
big = table2[(table2.kind == "paper") & (table2.module == "total")].set_index("model")
if len(cfg.paper_presets) == 2:
    a, b = cfg.paper_presets
    assert big.loc[b, "gmacs"] < big.loc[a, "gmacs"] and big.loc[b, "params_M"] < big.loc[a, "params_M"]
    print(f"{b} / {a}: params {big.loc[b, 'params_M'] / big.loc[a, 'params_M']:.1%}, "
          f"GMACs {big.loc[b, 'gmacs'] / big.loc[a, 'gmacs']:.1%}")

# %%
write_json({"stage": "evlm", "profile": profile, "seconds": timings, "runs": study.timings},
           f"timings/evlm.{profile}", Path(results_root or results_dir(profile)))
print(timings)
