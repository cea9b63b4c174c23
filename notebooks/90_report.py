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
# # 90 · The results report
#
# Every table the study notebooks wrote (`20_das`, `21_evlm`, `30_sherl`), in the papers'
# layouts, with the papers' own numbers beside them where a source could be read, the
# benchmark summaries (one column per device; "not measured" where a device has no file) and
# the stage times against the pipeline's budgets. Nothing is trained here: the notebook reads
# the result tables and the committed benchmark files, and writes `<results>/report/`
# (tables as CSV + Markdown, figures as PNG, and `index.md` with every table).
#
# **How to read the paper columns.** The papers run full-size models on real datasets
# (VQAv2, NLVR2, ScienceQA, ...); these tables are mini backbones, pre-trained in this repo,
# on generated or small data with minutes of CPU training. Absolute scores are not
# comparable. What can be compared is the *shape* of an effect: how much score a skipped
# layer costs and how much compute it saves (DAS), how much of the teacher a pruned student
# keeps (EfficientVLM), how much training memory SHERL saves against full fine-tuning
# (SHERL). Every paper number lives in `vlkit/paper_numbers.yaml` with the place it was read;
# a "–" in a paper column means the paper's table could not be read offline.
#
# A table whose stage has not run shows one line, "not produced: run `dvc repro <stage>`".
# The logic lives in `vlkit.report` (tested in `tests/test_report.py`).

# %% tags=["parameters"]
profile = "ci"  # ci | default | paper (papermill injects the stage's profile here)
results_root = None  # where the study tables are; None: results/ (runs/results-ci/ under the ci profile)

# %%
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from vlkit import report as rp
from vlkit.paths import RESULTS_DIR
from vlkit.results import results_dir, save_figure, show_table, write_table

res = Path(results_root or results_dir(profile))
out = res / "report"
out.mkdir(parents=True, exist_ok=True)
bench = RESULTS_DIR / "bench"  # the committed benchmark files, whatever the profile
timing_dirs = list(dict.fromkeys([res / "timings", RESULTS_DIR / "timings"]))
paper = rp.load_paper_numbers()
written: list[tuple[str, str]] = []  # (title, table name under report/), in the order shown
tables: dict[str, pd.DataFrame] = {}
print(f"profile {profile}: tables from {res}, benchmarks from {bench} -> {out}")
print(f"{len(paper)} paper numbers, each with its source")

NOT_COMPARABLE = ("Paper numbers are full-scale results on real datasets, ours mini-scale on generated or small "
                  "data: shown for orientation (relative effects), not as a comparison. ")
NO_PAPER = "paper number not available offline ('–' in a paper column). "


def report_table(df: pd.DataFrame, name: str, title: str, note: str = "") -> pd.DataFrame:
    """Write ``df`` as ``report/<name>`` (CSV + Markdown with the note), list it in the index,
    print it; a not-produced frame gets a note saying so."""
    if rp.is_missing(df):
        note = "Not produced yet: its stage has not written the inputs under this profile."
    write_table(df, f"report/{name}", res, note=f"Profile `{profile}`. {note}")
    written.append((title, name))
    tables[name] = df
    print(f"--- {title}")
    show_table(df)
    return df


def panel(ax, df: pd.DataFrame, draw, xlabel: str, ylabel: str, title: str) -> None:
    """``draw(ax, df)``, or a note on ``ax`` that ``df``'s table is not produced yet; then the labels."""
    if rp.is_missing(df):
        ax.text(0.5, 0.5, "\n".join(df.table + ": " + df.status), ha="center", va="center", fontsize=8,
                transform=ax.transAxes)
    else:
        draw(ax, df)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)


# %% [markdown]
# ## DAS (Wu et al., NeurIPS 2023)
# **Tab. A**: the layers the search skipped, the score, the *additional GMACs* against the
# un-adapted backbone (negative: cheaper) and in % of its GMACs, and the score change against
# the adapters-only (k = 0) model of the same backbone and scope.

# %%
report_table(rp.das_table_a(res), "das_table_a", "DAS Tab. A", note=(
    "Test score (%) ± one binomial SE; `score_vs_k0`: score minus the k = 0 (adapters-only) model's of the same "
    "backbone, task and scope; `add_gmacs`: GMACs per example of the final model minus the un-adapted backbone's "
    "(`gmacs`), also in % (`gmacs_change_pct`). Source: das/table_a. The paper's Tab. A scores (ViLT/METER on "
    "VQAv2, NLVR2, Flickr30K): " + NO_PAPER))

# %% [markdown]
# **Skip k layers: what it costs and what it saves.** Ours (Tab. A, GMACs per example)
# beside the only DAS rows that could be read offline: the official repository's LLaMA-7B
# (LaVIN) on ScienceQA, where cost is measured inference time.

# %%
report_table(rp.das_skip_effect(res, paper, profile), "das_skip_effect", "DAS: skip k vs score and cost", note=(
    NOT_COMPARABLE + "`score_change`: points against k = 0 of the same model; `cost_change_pct`: change of GMACs "
    "per example (ours) or of inference time (paper) against k = 0. Paper rows: "
    f"{paper['das_lavin_k0_avg']['source']}."))

# %% [markdown]
# **The GMACs anchors** of the paper-size `vilt-b32` (241 tokens) and `meter-clip16-roberta`
# beside the figures the DAS paper implies or states.

# %%
report_table(rp.das_paper_gmacs(res, paper), "das_paper_gmacs", "DAS: paper-size GMACs anchors", note=(
    "Ours: das/paper_gmacs (random weights; MACs do not depend on them), skipping the last k candidates. Paper: "
    "ViLT figures as derived in DESIGN.md from the paper's Table A (adapter layouts differ: ours are the official "
    "code's two bottleneck-96 adapters per kept block and one bottleneck-192 per skipped block); METER: the "
    "abstract's -11.97 % for the searched set on VQAv2, whose k the abstract does not give."))

# %% [markdown]
# **Tab. B**: is the searched set better than random sets of the same size? **Tab. C**: a
# language model (MiniLM on movie reviews) against the PETL baselines.

# %%
report_table(rp.das_table_b(res), "das_table_b", "DAS Tab. B", note=(
    "Mean and sample SD of the test score (%) over DAS seeds and random skip sets; `diff` = DAS mean - random "
    "mean; `verdict`: tie when |diff| <= max(sqrt(sd_DAS² + sd_random²), test SE). Source: das/table_b. The "
    "paper's DAS-vs-random ablation: " + NO_PAPER))
report_table(rp.das_table_c(res), "das_table_c", "DAS Tab. C", note=(
    "MiniLM on movie reviews: test accuracy (%) ± SE, `vs_full` = score - full fine-tuning's, trainable "
    "parameters with the head, GMACs change per review. Source: das/table_c. Paper: " + NO_PAPER))

# %%
pts = rp.das_points(res)
t3 = rp.evlm_table3(res)


def draw_das(ax, pts):
    # marker = task (their metrics differ: accuracy, or mean R@1 for retrieval), label = method
    sns.scatterplot(data=pts, x="gmacs_change_pct", y="test", hue="backbone", style="task", s=60, ax=ax)
    for _, r in pts.iterrows():
        ax.annotate(str(r["label"]).replace("DAS ", ""), (r["gmacs_change_pct"], r["test"]), fontsize=6,
                    xytext=(4, -3), textcoords="offset points")
    ax.axvline(0, color="grey", lw=0.6)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")


def draw_evlm(ax, t3):
    sns.scatterplot(data=t3, x="gmacs", y="test", hue="method", style="task", s=70, ax=ax)
    ax.set_xscale("log")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")


fig, axes = plt.subplots(1, 2, figsize=(14, 4.4), gridspec_kw={"wspace": 0.55})
panel(axes[0], pts, draw_das, "GMACs change per example vs the plain backbone (%)",
      "test score (%; retrieval: mean R@1)", "DAS (Tabs. A, C)")
panel(axes[1], t3, draw_evlm, "GMACs per example (log scale)", "test score (%)", "EfficientVLM (Tab. 3)")
fig.suptitle(f"Score against inference cost (profile {profile})")
save_figure(fig, out, "score_vs_gmacs")

# %% [markdown]
# **The policy over the search**: each candidate's skip probability after every round (the
# first seed of every searched cell). A flat bundle near 0.5 means the rewards did not tell
# the sets apart.

# %%
policy = rp.read_result(res, "das/policy")
if policy is not None and len(policy):
    first = policy[policy.seed == policy.seed.min()]
    first = first.assign(cell=[f"{b} {t}\n{s} k={k}" for b, t, s, k in
                               zip(first.backbone, first.task, first.scope, first.k)])
    g = sns.relplot(data=first, x="round", y="p", hue="unit", col="cell", col_wrap=min(4, first.cell.nunique()),
                    kind="line", height=2.6, aspect=1.2, facet_kws={"ylim": (0, 1)})
    g.set_titles("{col_name}", size=8)
    g.set_axis_labels("policy round", "skip probability")
    g.figure.suptitle("DAS: skip probabilities over the search", y=1.03)
    save_figure(g.figure, out, "das_policy")
    assert policy.p.between(0, 1).all()
else:
    print(rp.not_produced("das/policy").status[0])

# %% [markdown]
# ## EfficientVLM (Wang et al., ACL Findings 2023)
# **Tab. 3**: teacher, half-depth student, and the student distilled and pruned under one
# global budget (modal-adaptive) or one per encoder (uniform), with each row's share of the
# teacher's score and parameters and its MACs ratio.

# %%
report_table(t3, "evlm_table3", "EfficientVLM Tab. 3", note=(
    "Mean test accuracy (%) over `seeds`; `score_vs_teacher_pct` = 100 test / teacher test, "
    "`params_vs_teacher_pct` = 100 params / teacher params, `macs_ratio_vs_teacher` = teacher GMACs / GMACs, "
    "each against the same task's teacher row. Source: evlm/table3. The paper's Tab. 3 scores: " + NO_PAPER))
report_table(rp.evlm_orientation(res, paper), "evlm_orientation", "EfficientVLM beside the paper", note=(
    NOT_COMPARABLE + "Paper: the abstract (93 M parameters = 44.3 % of the teacher, 98.4 % of its performance, "
    "2.2x faster inference). Our cost ratio is GMACs (the mini models' latency is not benchmarked); the "
    "paper's is measured speed. A task at chance (NLVR) keeps 'all' of a chance-level score."))

# %% [markdown]
# **Fig. 3, the sparsity sweep**, and the share of each encoder the global budget pruned.

# %%
sw = report_table(rp.evlm_sweep(res), "evlm_sweep", "EfficientVLM Fig. 3 (sweep)", note=(
    "EfficientVLM (KD + pruning) at each target sparsity; `sparsity`: achieved share of the prunable "
    "parameters removed (overall, per encoder). Source: evlm/sweep. Paper Fig. 3: " + NO_PAPER))
enc = report_table(rp.evlm_encoder_sparsity(res), "evlm_encoder_sparsity", "EfficientVLM per-encoder sparsity",
                   note="Share of each encoder's prunable parameters removed by the global budget, mean over seeds. "
                        "Source: evlm/encoder_sparsity. Paper: " + NO_PAPER)
for which, title in (("table1", "EfficientVLM Tab. 1 (manual sparsities)"), ("table4", "EfficientVLM Tab. 4")):
    report_table(rp.evlm_ablation(res, which), f"evlm_{which}", title, note=(
        f"Source: evlm/{which} (seed 0). Paper: " + NO_PAPER))
report_table(rp.evlm_table2(res), "evlm_table2", "EfficientVLM Tab. 2 (params, GMACs, latency)", note=(
    "Parameters (M), GMACs and latency (ms) per module; latency from results/bench/prune_xvlm.<device>.json, "
    "'not measured' where a device (GPU included) has no file. Source: evlm/table2."))

# %%
def draw_sweep(ax, sw):
    sns.lineplot(data=sw, x="sparsity", y="test", hue="budget", style="budget", markers=True, ax=ax)
    ax.legend(fontsize=7)


def draw_encoders(ax, enc):
    long = enc.melt(id_vars="task", var_name="encoder", value_name="sparsity")
    sns.barplot(data=long, x="task", y="sparsity", hue="encoder", ax=ax)
    ax.legend(fontsize=7, title="encoder")


fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
panel(axes[0], sw, draw_sweep, "achieved sparsity", "test accuracy (%)", "score against sparsity (Fig. 3)")
panel(axes[1], enc, draw_encoders, "", "share of the encoder pruned", "global budget: where the pruning goes")
fig.tight_layout()
save_figure(fig, out, "evlm_sparsity")

# %% [markdown]
# ## SHERL (Diao et al., ECCV 2024)
# **Tab. 1**: trainable parameters (% of the backbone), training memory -- accounted
# (weights + gradients + AdamW states + saved activations) and measured (peak RSS of a fresh
# process) -- with their ratio to full fine-tuning, and the score.

# %%
for which, title in (("text", "SHERL Tab. 1 (text)"), ("vl", "SHERL Tab. 1 (vision-language)")):
    report_table(rp.sherl_tab1(res, which), f"sherl_tab1_{which}", title, note=(
        "`params_pct`: trained parameters / backbone's (head excluded); `est_mib`: accounted training memory, "
        "`peak_mib`: measured peak (sherl/memory; '–' where not measured); `*_vs_full`: over full "
        f"fine-tuning's of the same task and backbone. Source: sherl/tab1_{which}. Paper Tab. 1 scores: " + NO_PAPER))
report_table(rp.sherl_headline(res), "sherl_headline", "SHERL vs full fine-tuning over seeds", note=(
    "Mean and SD over seeds; `verdict`: tie when the difference is within the spreads. Source: sherl/headline."))
report_table(rp.sherl_orientation(res, bench, paper), "sherl_orientation", "SHERL memory beside the paper", note=(
    NOT_COMPARABLE + "Paper: T5-base 2.9 GB (SHERL) vs 17.6 GB (full fine-tuning), GPU, as quoted in issue #6 "
    "('GB' as the paper reports it). Ours: results/bench/memory.<device>.json (fp32, batch 8 x 128 tokens) and "
    "the MiniLM rows of Tab. 1."))
report_table(rp.sherl_fig7(res), "sherl_fig7", "SHERL Fig. 7 (reduction factor r)", note=(
    "MTSA width D / r; full fine-tuning (r empty) for the memory ratio. Source: sherl/fig7_reduction. Paper: "
    + NO_PAPER))
report_table(rp.sherl_cnn(res), "sherl_cnn", "SHERL on a CNN", note=(
    "EfficientNet-Lite0 on generated counting. Source: sherl/cnn. Paper: " + NO_PAPER))

# %%
mem = pd.concat([t for t in (tables["sherl_tab1_text"], tables["sherl_tab1_vl"]) if not rp.is_missing(t)] or
                [pd.DataFrame()], ignore_index=True)
if len(mem):
    cells = mem.groupby(["task", "backbone"], sort=False).size().index.tolist()
    methods = list(dict.fromkeys(mem.method))  # one colour and marker per method in every panel
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), squeeze=False)
    for i, (ax, (task, bb)) in enumerate(zip(axes.flat, cells)):
        c = mem[(mem.task == task) & (mem.backbone == bb)]
        sns.scatterplot(data=c, x="est_mib", y="test", hue="method", style="method", hue_order=methods,
                        style_order=methods, s=70, ax=ax, legend=i == len(cells) - 1)
        ax.set_title(f"{bb} / {task}", fontsize=9)
        ax.set_xlabel("accounted training memory (MiB)")
        ax.set_ylabel("test score (%)")
    axes.flat[len(cells) - 1].legend(fontsize=7, title="method", bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(f"SHERL Tab. 1: score against training memory (profile {profile})")
    fig.tight_layout()
    save_figure(fig, out, "sherl_score_vs_memory")
else:
    print(rp.not_produced("sherl/tab1_text").status[0])

# %% [markdown]
# ## Benchmarks
# One row per measured quantity, one column per device. They were measured as the bench
# files record (threads, batch, load average at the start: a loaded machine slows the
# ratios); `reference` is the acceptance bar where there is one.

# %%
report_table(rp.bench_summary(bench, paper), "bench_summary", "Benchmarks", note=(
    "From results/bench/<bench>.<device>.json (committed); 'not measured' where a device has no file, '–' where "
    "its file has no such row. `reference`: the acceptance bar of the issue (paper-number id in brackets)."))

# %% [markdown]
# ## Stage times against the budgets
# Minutes of each stage's last timed run under this profile (the notebook runner's wall
# time, else the sum of the stage's own sections) against the budget for the
# default profile on 2 CPU cores.

# %%
st = report_table(rp.stage_times(timing_dirs, profile), "stage_times", "Stage times", note=(
    "Budgets (minutes) are for the default profile on 2 CPU cores (issue #7); `helps` and `tour` have no budget of "
    "their own; `total` sums every stage against the whole pipeline's 150 minutes. "
    "'not timed': no timing file under this profile. Timings were taken as recorded (other jobs may have shared "
    "the cores)."))
fig, ax = plt.subplots(figsize=(6.5, 3.4))
per_stage = st[st.stage != "total"]
shown = per_stage.assign(measured=per_stage.measured_min.fillna(0))
sns.barplot(data=shown, y="stage", x="measured", color="tab:blue", ax=ax, label="measured")
ax.scatter(shown.budget_min, range(len(shown)), marker="|", s=300, color="tab:red", label="budget", zorder=3)
for i, (m, s) in enumerate(zip(per_stage.measured_min, per_stage.source)):
    ax.annotate("not timed" if s == "not timed" else f"{m:g}", (0 if pd.isna(m) else m, i), fontsize=7,
                xytext=(3, -3), textcoords="offset points")
ax.set_xlabel("minutes")
ax.set_ylabel("")
total = st.set_index("stage").loc["total"]
ax.set_title(f"Stage times vs budget (profile {profile}): total {total.measured_min:g} of "
             f"{total.budget_min:g} min" + ("" if total.within_budget != "–" else " (not all timed)"))
ax.legend(fontsize=7, loc="lower right")
save_figure(fig, out, "stage_times")

# %% [markdown]
# ## The paper numbers and their sources

# %%
pn = report_table(rp.paper_numbers_table(paper), "paper_numbers", "Paper numbers and sources", note=(
    "kind: paper (printed in the paper or its official repository), derived (derived from a paper table in "
    "DESIGN.md), issue (quoted or set in this project's issues). Nothing here is from memory."))
rp.write_index(out, written, intro=(
    f"# vlkit results report (profile `{profile}`)\n\nGenerated by `notebooks/90_report.py` from the tables under "
    f"`{res.relative_to(RESULTS_DIR.parent) if res.is_relative_to(RESULTS_DIR.parent) else res}` and the committed "
    "benchmarks. " + NOT_COMPARABLE + "Figures: `score_vs_gmacs.png`, `das_policy.png`, `evlm_sparsity.png`, "
    "`sherl_score_vs_memory.png`, `stage_times.png`."))

# %% [markdown]
# ## Checks
# Every listed table was written; every missing input says which stage to run; every paper
# number carries its source; the ratios are computed from the same rows they are shown with.

# %%
for _, name in written:
    assert (out / f"{name}.csv").is_file() and (out / f"{name}.md").is_file(), name
assert (out / "index.md").is_file()
for name, df in tables.items():
    if rp.is_missing(df):
        assert df.status.str.startswith("not produced: run `dvc repro ").all(), name
assert pn.source.str.len().gt(0).all() and len(pn) == len(paper)
print(f"{len(written)} tables written, {sum(rp.is_missing(d) for d in tables.values())} not produced yet")

# %%
raw = rp.read_result(res, "sherl/tab1_text")
tab = tables["sherl_tab1_text"]
if raw is not None:  # est_vs_full from the same rows as est_mib
    full_est = raw.loc[raw.method == "full", "est_mib"].iloc[0]
    assert ((tab.est_vs_full - tab.est_mib / full_est).abs() < 1e-3).all()
t3 = tables["evlm_table3"]
if not rp.is_missing(t3):
    assert (t3.loc[t3.method == "teacher", ["score_vs_teacher_pct", "params_vs_teacher_pct"]] == 100).all().all()
ta = tables["das_table_a"]
if not rp.is_missing(ta):
    das = ta[ta.method == "das"]
    assert (das[das.k == 0].score_vs_k0.fillna(0) == 0).all()
print("ratios agree with the rows they come from")
