"""A tiny seeded regression task shared by the reliability tests and the scripts they launch.

Kept import-light (torch + vlkit only) so a child process starts fast. Every number it makes
is a function of the seed, so a parent process can recompute what a killed child would have
produced.
"""

from __future__ import annotations

import torch
from torch import nn

from vlkit.train import TrainConfig

N_EXAMPLES = 96
DIM = 6


def setup() -> None:
    """Same thread count in every process, so float reductions agree bit for bit."""
    torch.set_num_threads(1)


def make_data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(N_EXAMPLES, DIM, generator=g)
    w = torch.randn(DIM, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(N_EXAMPLES, 1, generator=g)
    return list(zip(x, y))


class TinyMLP(nn.Module):
    """2-layer MLP with dropout, so the resumed run also needs the restored torch RNG."""

    preset = "tiny-mlp"

    def __init__(self, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(DIM, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x)


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def config(**overrides) -> TrainConfig:
    base = dict(steps=24, batch_size=8, lr=3e-2, weight_decay=0.01, schedule="linear", warmup_steps=3,
                max_grad_norm=1.0, ckpt_every=4, keep=2, seed=7, log_every=1000)
    base.update(overrides)
    return TrainConfig(**base)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.state_dict().values()])
