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
# # 11 · Learn EfficientVLM's pruning step by step: hard-concrete gates and one Lagrangian step
#
# EfficientVLM (Wang et al., ACL Findings 2023) prunes attention heads and FFN units of a
# distilled student. Each prunable structure gets a **gate** `z ∈ [0, 1]` that multiplies its
# output. The gates are random during training (so the model learns to live without any of
# them) and binary at the end; one **Lagrangian** term steers the expected model size to a
# target sparsity shared by the vision, text and fusion encoders.
#
# Every claim below is checked by an `assert` in the cell that follows it.

# %% tags=["parameters"]
profile = "ci"  # the walkthroughs are the same under every profile
results_root = None

# %%
import math

import matplotlib.pyplot as plt
import pandas as pd
import torch

from vlkit.nn import HardConcreteGate
from vlkit.nn.lagrangian import LagrangianController, expected_size, full_size

# %% [markdown]
# ## 1. The hard-concrete gate (Louizos et al., 2018)
# A draw: `u ~ U(0,1)`, `s = sigmoid((log u − log(1−u) + log α) / β)`, then stretch to
# `(l, r) = (−0.1, 1.1)` and clamp to `[0, 1]`. The stretch puts real probability mass on
# exactly 0 and exactly 1 -- a gate can switch a head *off*, not just turn it down.

# %%
gate = HardConcreteGate(4, init_log_alpha=[-2.0, 0.0, 1.0, 3.0])
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    draws = torch.stack([gate.sample(gen) for _ in range(20000)])
fig, axes = plt.subplots(1, 4, figsize=(12, 2.4), sharey=True)
for i, ax in enumerate(axes):
    ax.hist(draws[:, i].numpy(), bins=40)
    ax.set_title(f"log α = {gate.log_alpha[i].item():.0f}")
    ax.set_xlabel("z")
plt.tight_layout()

# %% [markdown]
# ## 2. The expected L0 norm in closed form
# `z > 0` exactly when the logistic noise exceeds `β·log(−l/r) − log α`, so
# `P(z > 0) = sigmoid(log α − β·log(−l/r))`. Its sum is the expected number of kept
# structures -- a smooth function of `log α` that the size budget can differentiate.

# %%
empirical = (draws > 0).float().mean(0)
closed = gate.prob_nonzero().detach()
pd.DataFrame({"log α": gate.log_alpha.detach().numpy(), "P(z>0) sampled": empirical.numpy(),
              "P(z>0) closed form": closed.numpy()})

# %%
assert torch.allclose(empirical, closed, atol=0.015)
by_hand = 1 / (1 + math.exp(-(0.0 - (2 / 3) * math.log(0.1 / 1.1))))
assert abs(closed[1].item() - by_hand) < 1e-6
print(f"expected L0 = {gate.expected_l0().item():.3f} of 4 gates")

# %% [markdown]
# ## 3. The binary mask at evaluation
# At the end the expected number of zeros, `Σ (1 − P(z>0))`, is rounded, and that many gates
# with the smallest `log α` are switched off; the rest are exactly 1. So the masked model is
# the model with those heads physically removed.

# %%
gate.eval()
n_zero = round(sum(1 - closed).item())
mask = gate()
print("expected zeros:", round(sum(1 - closed).item(), 3), "-> mask", mask.tolist())
assert set(mask.tolist()) <= {0.0, 1.0} and int((mask == 0).sum()) == n_zero
assert torch.equal(mask, gate())  # deterministic
gate.train()

# %% [markdown]
# ## 4. One Lagrangian step
# Size: each gate entry owns some parameters (`cost`); expected size `Σ cost · P(z>0)`,
# expected sparsity `s = 1 − E_size / full`. The penalty `λ1 (s − t) + λ2 (s − t)²` is
# *descended* by the gates and *ascended* by λ. Below the model is too dense (`s < t`): after
# one step λ1 turns negative, and the gates' gradient points towards more sparsity.

# %%
gates_costs = [(gate, 10.0)]  # each entry owns 10 parameters
controller = LagrangianController(target_sparsity=0.5, warmup_steps=0)
opt = torch.optim.SGD([{"params": gate.parameters()}, {"params": controller.parameters()}], lr=0.1)
term = controller(expected_size(gates_costs), full_size(gates_costs), step=0)
print(f"expected sparsity {term.expected_sparsity.item():.3f}, target {term.target}")
assert term.expected_sparsity.item() < term.target
opt.zero_grad()
term.penalty.backward()
opt.step()
print(f"λ1 after one step: {controller.lambda_1.item():+.4f}")
assert controller.lambda_1.item() < 0  # ascent follows d penalty / d λ1 = s − t < 0, so λ1 goes down

# %%
term2 = controller(expected_size(gates_costs), full_size(gates_costs), step=1)
opt.zero_grad()
term2.penalty.backward()
before = term2.expected_sparsity.item()
opt.step()
after = controller(expected_size(gates_costs), full_size(gates_costs), step=2).expected_sparsity.item()
print(f"expected sparsity {before:.4f} -> {after:.4f} (target 0.5)")
assert after > before  # the gates moved towards the target
