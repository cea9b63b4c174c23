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
# # 10 · Learn DAS step by step: an adapter, a skipped layer, one policy update
#
# DAS (Wu et al., NeurIPS 2023) makes transfer learning cheaper twice over: only small
# **adapters** train, and the layers a task does not need are **skipped** -- each replaced by
# one adapter. Which layers? A tiny reinforcement-learning **policy** keeps one logit per
# layer, samples skip sets, and rewards the sets whose sub-network still has a low loss.
#
# This walkthrough runs every piece on toy inputs, in well under a minute. Each claim in the
# text is checked by an `assert` below it.

# %% tags=["parameters"]
profile = "ci"  # the walkthroughs are the same under every profile
results_root = None

# %%
import itertools

import numpy as np
import pandas as pd
import torch

from vlkit.methods.das import SkipPolicy
from vlkit.models.layers import TransformerLayer
from vlkit.nn.adapters import BottleneckAdapter, SkipAdapter, add_adapters, bottleneck_params

torch.manual_seed(0)

# %% [markdown]
# ## 1. A bottleneck adapter starts as "do nothing"
# The adapter computes `up(act(down(LN x)))`. Its up-projection starts at zero, so adding
# adapters to a pre-trained layer does not change what the layer computes on day one; the
# adapters then learn a small correction. At width D and bottleneck r it owns
# `2·D·r + r + D` weights and biases (+ `2D` for its LayerNorm).

# %%
D, r = 16, 4
layer = TransformerLayer(D, num_heads=2, ffn_dim=4 * D, norm="pre").eval()
x = torch.randn(2, 5, D)
before = layer(x)
add_adapters(layer, placement="parallel", bottleneck=r, slots=("attn", "ffn"))
after = layer(x)
print("max |change| after adding zero-initialised adapters:", (after - before).abs().max().item())
assert torch.equal(before, after)
adapter = BottleneckAdapter(D, r)
assert sum(p.numel() for p in adapter.parameters()) == bottleneck_params(D, r) == 2 * D * r + r + D + 2 * D

# %% [markdown]
# ## 2. Skipping a layer
# A skipped layer is replaced by a `SkipAdapter`: `x + up(act(down(LN x)))`. At
# initialisation it is the identity, so the network simply jumps over the layer. Its cost is
# two thin matrix products instead of attention plus a 4D-wide FFN.

# %%
skip = SkipAdapter(D, 2 * r)
assert torch.equal(skip(x), x)
layer_params = sum(p.numel() for n, p in layer.named_parameters() if "adapters" not in n)
print(f"a layer owns {layer_params:,} parameters; its skip adapter {sum(p.numel() for p in skip.parameters()):,}")

# %% [markdown]
# ## 3. Sampling skip sets
# The policy keeps one logit per candidate layer, `p = sigmoid(logit)`, and draws k
# **distinct** layers one after another, each time with probability proportional to `p`
# among the layers not yet drawn. With all logits at 0 every set of k layers is equally
# likely.

# %%
names = ["En0", "En1", "En2", "En3"]
policy = SkipPolicy(names, k=2, lr=1.0, seed=0)
draws = [tuple(sorted(policy.sample())) for _ in range(3000)]
freq = pd.Series(draws).value_counts(normalize=True).sort_index()
freq

# %%
assert all(len(set(d)) == 2 for d in draws)
assert len(freq) == 6 and (freq - 1 / 6).abs().max() < 0.03  # C(4, 2) = 6 sets, uniform at start

# %% [markdown]
# ## 4. One policy update, by hand
# Each round scores S skip sets on the **same** validation batch; the reward of a set is
# `exp(-loss)`. With the mean reward as baseline, every layer i in set j moves
# `logit_i += lr · (r_j − mean r) · p_i (1 − p_i)`. A layer that sits in the better sets
# rises -- it is a better candidate to skip.

# %%
sets = [("En0", "En1"), ("En2", "En3")]
losses = [0.5, 1.5]  # skipping En0+En1 hurts less than skipping En2+En3
rewards = [float(np.exp(-l)) for l in losses]
p = policy.probs()  # all 0.5
mean_r = sum(rewards) / 2
expected = {n: 0.0 for n in names}
for s, r_j in zip(sets, rewards):
    for n in s:
        expected[n] += 1.0 * (r_j - mean_r) * p[n] * (1 - p[n])
policy.update(sets, rewards)
table = pd.DataFrame({"reward of its set": [rewards[0]] * 2 + [rewards[1]] * 2,
                      "expected logit": [expected[n] for n in names],
                      "policy logit": [policy.logits()[n] for n in names]}, index=names)
table

# %%
assert all(abs(policy.logits()[n] - expected[n]) < 1e-12 for n in names)
assert set(policy.best()) == {"En0", "En1"}
print("after one round the policy would skip", policy.best())
