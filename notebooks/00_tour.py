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
# # 00 · A tour of vlkit: presets, units, and what each unit costs
#
# Every method in vlkit (DAS, EfficientVLM, SHERL and the baselines) touches a model only
# through the **backbone protocol**: a backbone is a list of named, ordered *units* with a
# modality tag. This notebook builds a paper preset, lists its units, runs a slice of them by
# hand, and prints the efficiency table -- parameters and GMACs per unit.
#
# *GMACs* are multiply-accumulates (10^9), which is what the papers call "FLOPs"; vlkit counts
# them with torch's flop counter (divided by 2) under the math attention backend.

# %% tags=["parameters"]
profile = "ci"  # ci | default | paper (papermill injects the stage's profile here)
results_root = None  # where tables go; None: results/ (runs/results-ci/ under the ci profile)

# %%
import math

import pandas as pd
import torch

import vlkit
from vlkit import config, efficiency
from vlkit.models import build

cfg = config.resolve("tour", profile)
cfg

# %% [markdown]
# ## Build a preset and list its units
# `vilt-b32` is ViLT-B/32 built from transformers' `ViltConfig` with random weights (weights
# do not change the cost). Its dummy input is the DAS paper's: a 320×640 image (10×20 = 200
# patches + an image CLS token) and 40 text tokens: **241 tokens**.

# %%
torch.manual_seed(0)
backbone = build(cfg.preset, **cfg.overrides).eval()
inputs = backbone.dummy_inputs(cfg.batch_size)
pd.DataFrame(backbone.describe())

# %% [markdown]
# ## Running a slice of units by hand
# `embed` turns inputs into a state; `run_units(state, start, stop)` runs `units[start:stop]`.
# Running the first half without a graph and the rest with one is exactly how SHERL keeps its
# frozen prefix out of memory. The result must equal the plain forward pass.

# %%
n = len(backbone.units)
with torch.no_grad():
    state = backbone.embed(**inputs)
    half = backbone.run_units(state, 0, n // 2)
    rest = backbone.run_units(half, backbone.units[n // 2].name, None)
    by_hand = backbone.finalize(rest).pooled
    direct = backbone(**inputs).pooled
assert torch.allclose(by_hand, direct, atol=1e-5), (by_hand - direct).abs().max()
print("tokens per example:", {k: v.shape[1] for k, v in state.streams.items()})

# %% [markdown]
# ## The efficiency table
# Per unit: parameters and GMACs of one example. For a ViLT layer with N tokens and width D,
# the matmuls cost 12·N·D² (q, k, v, o: 4ND²; FFN with 4D hidden: 8ND²) plus 2·N²·D
# (scores and the weighted sum): at N = 241, D = 768 that is **1.795 GMACs**. The DAS paper's
# Table A implies 1.76 G per layer (skipping one layer nets -1.03 G beside +0.73 G of
# adapters); the small gap is the paper's rounding or token count, and we print both.

# %%
table = pd.DataFrame(efficiency.efficiency_table(backbone, inputs))
table

# %%
N = sum(v.shape[1] for v in state.streams.values())
D = backbone.units[0].module.dim
formula = 12 * N * D**2 + 2 * N**2 * D
unit_rows = table[table["unit"].str.startswith("En")]
print(f"N = {N}, D = {D}: formula 12ND² + 2N²D = {formula / 1e9:.3f} GMACs per layer; "
      f"measured {unit_rows['gmacs'].mean():.3f}; DAS paper Table A implies 1.76")
assert N == 241
assert all(math.isclose(g * 1e9, formula, rel_tol=5e-3) for g in unit_rows["gmacs"])

# %% [markdown]
# ## Totals
# The whole model's MACs equal the sum of its parts (embeddings, units, pooler): the meter
# attributes every multiply-accumulate to exactly one place.

# %%
total = efficiency.macs(backbone, inputs)
print(f"params {efficiency.params(backbone):,}; total {total / 1e9:.2f} GMACs per example "
      f"(batch {cfg.batch_size})")
assert abs(table["gmacs"].sum() * 1e9 - total) <= 1e-6 * total

# %% [markdown]
# ## Save the table
# `dvc repro` writes to `results/tour/`. A notebook run by hand (or by nbval in CI) under the
# `ci` profile writes to `runs/results-ci/` instead (git-ignored), so it never overwrites the
# committed results.

# %%
from vlkit.results import results_dir, write_table

paths = write_table(table, f"tour/{cfg.preset}_units", results_root or results_dir(profile),
                    note=f"GMACs per example (batch {cfg.batch_size}), counted under the math attention backend.")
print(*paths, sep="\n")
