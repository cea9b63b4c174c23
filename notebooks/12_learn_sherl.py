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
# # 12 · Learn SHERL step by step: redundancy normalisation on a toy cohort
#
# SHERL (Diao et al., ECCV 2024) never back-propagates through the early layers of the
# frozen backbone. Their outputs -- the *shallow features* -- are computed without a graph and
# merged by the Multi-Tiered Sensing Adapter (MTSA); the merge goes through the last
# pre-trained layer. The merge's key idea is **anti-redundancy**: neighbouring layers often
# say nearly the same thing, and a plain attention-weighted sum would let a cohort of
# near-duplicates drown out a feature that carries something new.
#
# SHERL Eq. 2-3, for one token with guide `e` and shallow features `E` (M × d):
#
# * `S = Ẽ Ẽᵀ` (rows ℓ2-normalised): how alike the features are;
# * `r = ReLU(S) · 1`: the **redundancy** of each feature (≥ 1: it is alike to itself);
# * `m = ℓ1-normalise(ReLU(e Eᵀ) / r)`: relevance to the guide, divided by redundancy;
# * `e' = m E + e`.

# %% tags=["parameters"]
profile = "ci"  # the walkthroughs are the same under every profile
results_root = None

# %%
import pandas as pd
import torch

from vlkit.nn.mtsa import MTSA, aggregation_weights, redundancy, redundancy_aggregate

# %% [markdown]
# ## A cohort of three duplicates beside one distinct feature
# Three shallow layers produced the same direction `[1, 0]`; one produced `[0, 1]`. The guide
# `[1, 1]` finds both directions equally relevant (inner product 1 with each).

# %%
E = torch.tensor([[[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]])  # (B=1, K=1, M=4, d=2)
e = torch.tensor([[[1.0, 1.0]]])  # (1, 1, 2)
r = redundancy(E)[0, 0]
m_linear = aggregation_weights(e, E, redundancy_mode="none")[0, 0]
m_sherl = aggregation_weights(e, E)[0, 0]
pd.DataFrame({"feature": ["dup 1", "dup 2", "dup 3", "distinct"], "redundancy r": r.numpy(),
              "weight, plain linear (LinearA)": m_linear.numpy(), "weight, SHERL": m_sherl.numpy()})

# %% [markdown]
# By hand: each duplicate is alike to 3 features (r = 3), the distinct one only to itself
# (r = 1). Plain linear aggregation gives every feature 1/4, so the cohort takes 3/4 of the
# mass. Dividing by r gives scores 1/3, 1/3, 1/3, 1, which normalise to 1/6 each and 1/2:
# the cohort now counts about as much as one feature, and the distinct feature is heard.

# %%
assert torch.allclose(r, torch.tensor([3.0, 3.0, 3.0, 1.0]))
assert torch.allclose(m_linear, torch.full((4,), 0.25))
assert torch.allclose(m_sherl, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
assert m_sherl[:3].sum() < m_linear[:3].sum() and m_sherl[3] > m_linear[3]
merged = redundancy_aggregate(e, E)[0, 0]
print("e' = m E + e =", merged.tolist())
assert torch.allclose(merged, torch.tensor([1.5, 1.5]))  # 0.5·[1,0] + 0.5·[0,1] + [1,1]

# %% [markdown]
# ## The module: at initialisation the merge replaces the last layer's input
# The MTSA projects each shallow feature to `D / r` with a gated residual (Eq. 1), merges
# them as above, projects back up and adds `tanh(α / T) · x_last` with α = 0 at the start.
# So on day one the last pre-trained layer sees only the merged shallow features.

# %%
torch.manual_seed(0)
mtsa = MTSA(dim=32, num_layers=4, reduction=8)
features = [torch.randn(2, 5, 32) for _ in range(4)]
x_last = torch.randn(2, 5, 32)
out = mtsa(features, x_last)
assert mtsa.gate().item() == 0.0
assert torch.allclose(out, mtsa(features, 7 * x_last))  # x_last does not enter yet
print(f"MTSA output {tuple(out.shape)}; trainable parameters: {sum(p.numel() for p in mtsa.parameters()):,}")
