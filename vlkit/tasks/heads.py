"""Task heads on a backbone's pooled output, and the contrastive loss.

Shapes follow ViLT's heads (Kim et al. 2021), which DAS and SHERL fine-tune:

* :class:`ClassifierHead` -- VQA answer classification / text classification:
  ``Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, C)`` (ViLT's ``vqa_classifier``), or a
  single ``Linear(D, C)`` with ``hidden=0`` (BERT-style classification, linear probes).
* :class:`PairHead` -- NLVR2: the pooled outputs of (left image, statement) and (right image,
  statement) are concatenated, ``Linear(2D, 2D) -> LayerNorm -> GELU -> Linear(2D, 2)``
  (ViLT's ``nlvr2_classifier``).
* :class:`ITMHead` -- image-text matching, ``Linear(D, 2)``.
* :func:`contrastive_loss` -- symmetric InfoNCE over a batch of (image, text) embeddings
  (CLIP; METER and X-VLM's ITC): ``(CE(s, I) + CE(sᵀ, I)) / 2`` with ``s = îᵀt̂ / τ``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassifierHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        hidden = 2 * dim if hidden is None else hidden
        self.net = (nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes)) if hidden == 0 else
                    nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                  nn.Linear(hidden, num_classes)))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


class PairHead(nn.Module):
    def __init__(self, dim: int, num_classes: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(),
                                 nn.Linear(2 * dim, num_classes))

    def forward(self, pooled_left: torch.Tensor, pooled_right: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([pooled_left, pooled_right], dim=-1))


class ITMHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float | torch.Tensor = 0.07):
    """Symmetric InfoNCE; row i of both inputs is a matching pair."""
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"{image_emb.shape[0]} images vs {text_emb.shape[0]} texts")
    s = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).t() / temperature
    target = torch.arange(s.shape[0], device=s.device)
    return (F.cross_entropy(s, target) + F.cross_entropy(s.t(), target)) / 2
