"""In-repo vision-language pre-training of the mini backbones (the DVC ``pretrain`` stage).

``vilt-mini``, ``meter-mini`` and ``xvlm-mini`` (:mod:`vlkit.models.mini`) start from real
MiniLM text weights and EfficientNet-Lite0 cells, but their vision layers, cross-attention
and cell embeddings are random. This module pre-trains them on image-text pairs with the
papers' objectives, through the one training loop (:func:`vlkit.train.fit`: seeded,
checkpointed, resumable), and exports each backbone as a checkpoint folder that
``vlkit.models.build(preset, weights=folder)`` loads::

    python -m vlkit.pretrain --profile default                  # all presets of params.yaml
    python -m vlkit.pretrain --profile default --preset vilt-mini
    python -m vlkit.tasks.helps --profile default               # does it help fine-tuning?

Objectives (summed with equal weights, as ViLT / METER / X-VLM do)
--------------------------------------------------------------------
* **ITM** -- image-text matching (ViLT, Kim et al. 2021, Sec. 3.3; UNITER): a binary head
  (:class:`vlkit.tasks.heads.ITMHead`) on the pooled output; in every batch exactly half of
  the images keep their caption (label 1) and half get a negative (label 0): a *random*
  caption of another image of the same corpus, or -- a share ``hard_frac`` of them -- a
  *hard* negative that differs in one slot (below). Negatives are checked to be false for
  the image wherever the data allows it.

  ``hard_frac`` defaults to 0 in training, as ViLT (Sec. 3.3) and METER sample ITM
  negatives at random; validation always scores half hard negatives (``val_hard_frac``),
  so the summary reports how far a backbone tells one changed word. Why not train on them:
  with half the negatives hard, ITM stayed at chance through the whole CPU budget (first
  default runs: train ITM loss 0.69 after 350-600 steps on all three backbones); on
  vilt-mini, 200 steps of ITM alone reached train accuracy 0.62 with ``hard_frac=0.5``
  against 0.82 with 0, and ITM + MLM with 0 reached 0.79 (batch 32, lr 1e-4, new x5). A
  one-word difference is learnt in fine-tuning (shapes_retrieval has such negatives).

  **Hard-negative phase** (``hard_start``): hard negatives are switched on only for the last
  part of the run -- steps ``>= round(hard_start * steps)`` draw a share ``hard_frac`` of
  their negatives hard, earlier steps draw random ones (:func:`hard_frac_at`;
  ``hard_start=0``: hard negatives throughout, as above). A curriculum, not a paper's recipe
  (ALBEF / X-VLM mine hard negatives from ITC similarities instead, which vilt-mini has no
  towers for): first learn *which* image a caption is about, then *which word* is wrong.
  Evidence (issue #3, ``scripts/probes/hard_negative_phase.py``, vilt-mini, one seed, val):
  200 extra steps with half the negatives hard after the random-negative run lifted NLVR
  *with minimal pairs* to 61.0, against 54.3 for the same extra steps with random negatives.
* **MLM** -- masked language modelling conditioned on the image (BERT, Devlin et al. 2019,
  Sec. 3.1 / Appendix A.1; ViLT Sec. 3.3) on every image's own caption: 15 % of the
  (non-special, non-padding) tokens are chosen, and in addition each *grounded* word -- a
  colour, shape, size, relation or number word of a caption, or the answer of an easy-VQA
  question-answer text -- is chosen with probability ``grounded_prob`` (0.5), all its
  WordPiece tokens at once (ERNIE-ViL's object / attribute / relationship prediction, Yu et
  al. 2021, Sec. 3.2, which masks scene-graph words of the caption); chosen tokens become
  ``[MASK]`` (80 %), a random token (10 %) or stay (10 %). The fused text states at the chosen
  positions go through BERT's prediction head (:class:`MLMHead`: dense -> GELU -> LayerNorm
  -> decoder tied to the word embeddings, plus a bias) and a cross-entropy over the
  vocabulary. ITM (unmasked texts) and MLM (masked captions) are two passes over the same
  images, as in ViLT, computed in one backbone call of ``2 B`` sequences.

  Why the grounded words: the captions are templated, so plain 15 % masking mostly asks for
  words the text itself predicts; in the first default run (plain masking, one shared pass
  for ITM and MLM, 350-600 steps) every backbone learnt MLM from the text alone -- masked
  colour words were predicted as well with shuffled images as with the right ones -- and ITM
  stayed at chance. Masking the grounded words (and giving MLM every image of the batch)
  made the image matter within ~100 steps (vilt-mini: colour-word accuracy 0.39 with the
  right images vs 0.29 shuffled; 0.54 vs 0.24 with captions only).
* **ITC** -- image-text contrastive (CLIP / ALBEF / X-VLM Eq. 1): the symmetric InfoNCE
  :func:`vlkit.tasks.heads.contrastive_loss` on ``encode_image`` / ``encode_text`` of the
  matching pairs (in-batch negatives, temperature ``itc_temperature``). The default turns it
  on for ``xvlm-mini`` (X-VLM pre-trains with ITC + ITM + MLM) and off for ``meter-mini``,
  whose paper pre-trains with MLM + ITM only (``objectives`` in params.yaml changes that).

Data (``corpora``)
------------------
* ``shapes_captions`` (train): each generated image with its caption. Hard negatives are
  exact: the caption is parsed back into its program (:mod:`vlkit.data.grammar`) and
  :func:`~vlkit.data.grammar.hard_negative` changes one slot (size, colour, shape, relation
  or number) until the caption is *false* for the image's scene; a random negative is
  rejected if it happens to be true of the image (checked on the scene metadata).
* ``easyvqa`` (train): the caption of an image is one of its question-answer pairs written as
  ``"<question> <answer>"`` (``"what color is the shape? red"``); each question of the image
  gives one example. Hard negative: the same question with another answer of the same kind
  (yes <-> no; another colour; another shape), false because every easy-VQA image shows one
  shape. A random negative (another image's question-answer) is rejected if it is one of the
  image's own true texts; it may still be true of the image when the image was never asked
  that question -- easy-VQA has no scene metadata to check it (a little label noise, as in
  web-caption ITM).

Images enter as the cached 128 px EfficientNet-Lite0 cells (4 x 4 = 16 cells, from the
``features`` stage, :func:`vlkit.data.features.cached_features`). Text: MiniLM's tokenizer,
at most ``text_len`` tokens, padded to the longest text of the batch.

Learning rates: parameters that the builder copies from MiniLM train at ``lr``; parameters
it initialises randomly (vision layers, cell embeddings, cross-attention, the heads) at
``lr * lr_new_mult`` (METER, Dou et al. 2022, Sec. 4: a larger rate for the randomly
initialised cross-modal layers). Which is which is found by building the preset under two
seeds: a tensor that does not change with the seed came from MiniLM.

Outputs
-------
``runs/pretrain/<preset>/`` (``runs/pretrain-ci/`` under ``ci``): ``fit``'s checkpoints
(resume after a kill) and ``final/``: a vlkit checkpoint folder holding the *backbone only*
(``model.safetensors`` + ``meta.json``, whose ``extra`` records steps, objectives, corpus,
final losses and validation metrics) -- ``build(preset, weights=final)`` loads it strictly.
``results/pretrain/`` (``runs/results-ci/pretrain/`` under ``ci``): ``curves.csv`` (step,
preset, loss per objective), ``summary.md`` / ``.csv`` (the ``helps`` stage,
:mod:`vlkit.tasks.helps`, adds ``helps.md`` / ``.csv``); the stage's wall time goes to
``results/timings/pretrain.<profile>.json``.

``xvlm-mini-half`` is not pre-trained here (EfficientVLM distils it from the teacher later);
:func:`pretrained_backbone` builds it from the pre-trained ``xvlm-mini``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models.protocol import UnknownNameError

log = logging.getLogger("vlkit.pretrain")

OBJECTIVES = ("itm", "mlm", "itc")
PRETRAIN_PRESETS = ("vilt-mini", "meter-mini", "xvlm-mini")
CORPORA = ("shapes_captions", "easyvqa")
IGNORE = -100  # cross-entropy ignore index (labels of unmasked tokens)
# ITM example kinds, recorded per row of a batch
POSITIVE, RANDOM_NEG, HARD_NEG = 0, 1, 2

__all__ = ["PretrainConfig", "Source", "Corpus", "PretrainCollator", "MLMHead", "PretrainModel", "PretrainResult",
           "mask_tokens", "pretrain_loss", "caption_program", "shapes_source", "easyvqa_source", "build_corpus",
           "build_val_corpus", "hard_frac_at", "pretrain_preset",
           "export_final", "read_final", "run_dir_for", "weights_for", "pretrained_backbone",
           "run", "main", "OBJECTIVES", "PRETRAIN_PRESETS", "CORPORA"]


# ============================================================================ settings
@dataclass(frozen=True)
class PretrainConfig:
    """The ``pretrain`` section of params.yaml (see the module docstring).

    ``steps``: optimiser steps per preset (an int, or ``{preset: steps}``); one step sees
    ``batch_size`` image-text pairs (one fused forward pass, plus the towers for ITC).
    ``objectives``: ``{preset: [itm, mlm, itc]}``. ``max_rows``: ``{corpus: n}`` caps a corpus at a seeded
    subset of n examples. ``hard_frac`` / ``val_hard_frac``: share of the negatives that are
    hard ones in training (from step ``round(hard_start * steps)`` on: the hard-negative
    phase, :func:`hard_frac_at`) / in the validation batches.
    ``eval_rows``: validation pairs for the ITM / MLM metrics (fixed, seeded).
    ``overrides``: builder overrides for every preset (tiny test models). ``helps_tasks`` /
    ``helps_presets``: the pre-training-helps comparison (:mod:`vlkit.tasks.helps`; its fine-tuning
    budgets are the ``baselines`` section's)."""

    presets: list[str] = field(default_factory=lambda: list(PRETRAIN_PRESETS))
    objectives: dict = field(default_factory=lambda: {"vilt-mini": ["itm", "mlm"], "meter-mini": ["itm", "mlm"],
                                                       "xvlm-mini": ["itm", "mlm", "itc"]})
    corpora: list[str] = field(default_factory=lambda: list(CORPORA))
    max_rows: dict = field(default_factory=dict)
    steps: int | dict = 600
    batch_size: int = 32
    lr: float = 1e-4
    lr_new_mult: float = 5.0
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    max_grad_norm: float = 1.0
    text_len: int = 40
    mlm_prob: float = 0.15
    grounded_prob: float = 0.5
    hard_frac: float = 0.0
    hard_start: float = 0.0
    val_hard_frac: float = 0.5
    itc_temperature: float = 0.07
    image_size: int = 128
    ckpt_every: int = 50
    eval_rows: int = 256
    overrides: dict = field(default_factory=dict)
    # pre-training helps (fine-tuning comparison)
    helps_tasks: list[str] = field(default_factory=lambda: ["shapes_nlvr", "shapes_retrieval", "easyvqa"])
    helps_presets: list[str] = field(default_factory=lambda: list(PRETRAIN_PRESETS))

    def __post_init__(self):
        for p in list(self.presets) + list(self.objectives) + list(self.helps_presets):
            if p not in PRETRAIN_PRESETS:
                raise UnknownNameError("pre-training preset", p, PRETRAIN_PRESETS)
        for p in self.presets:
            objs = self.objectives.get(p)
            if not objs:
                raise ValueError(f"pretrain.objectives has no objectives for preset {p!r}")
            for o in objs:
                if o not in OBJECTIVES:
                    raise UnknownNameError("pre-training objective", o, OBJECTIVES)
            if "itc" in objs and p == "vilt-mini":
                raise ValueError("objective 'itc' needs a two-tower preset (meter-mini, xvlm-mini), not vilt-mini")
        for c in list(self.corpora) + list(self.max_rows):
            if c not in CORPORA:
                raise UnknownNameError("pre-training corpus", c, CORPORA)
        if not self.corpora:
            raise ValueError(f"pretrain.corpora is empty; valid: {', '.join(CORPORA)}")
        steps = self.steps if isinstance(self.steps, dict) else {p: self.steps for p in self.presets}
        for p in self.presets:
            s = steps.get(p)
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(f"pretrain.steps for {p!r} must be an int >= 1, got {s!r}")
        if not 0 < self.mlm_prob < 1:
            raise ValueError(f"mlm_prob must be in (0, 1), got {self.mlm_prob}")
        if not 0 <= self.grounded_prob <= 1:
            raise ValueError(f"grounded_prob must be in [0, 1], got {self.grounded_prob}")
        for k in ("hard_frac", "hard_start", "val_hard_frac"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        for name in ("batch_size", "text_len", "ckpt_every", "eval_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "batch_size" else 1):
                raise ValueError(f"pretrain.{name} must be an int >= {2 if name == 'batch_size' else 1}, got {v!r}")

    def steps_for(self, preset: str) -> int:
        return int(self.steps[preset] if isinstance(self.steps, dict) else self.steps)


def hard_frac_at(cfg: PretrainConfig, done: int, total: int) -> float:
    """Share of hard ITM negatives in the batch of step ``done + 1`` of ``total`` (``done``
    steps finished): ``cfg.hard_frac`` from step ``round(cfg.hard_start * total)`` on (0-based
    count of finished steps), 0 before it -- the hard-negative phase (module docstring)."""
    return cfg.hard_frac if done >= round(cfg.hard_start * total) else 0.0


# ============================================================================ masking
def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mask_token_id: int,
                special_ids: Sequence[int], vocab_size: int, random_low: int = 0, prob: float = 0.15,
                force: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (Devlin et al. 2019, Sec. 3.1 and Appendix A.1; HF
    ``DataCollatorForLanguageModeling.torch_mask_tokens``): each text token that is neither
    special (``[CLS]``, ``[SEP]``, ``[PAD]``, ...) nor padding is chosen with probability
    ``prob``; a chosen token becomes ``[MASK]`` with probability 0.8, a random token from
    ``[random_low, vocab_size)`` with 0.1, and stays with 0.1. If no token of the whole batch
    was chosen, one is forced (so the loss is defined). Returns ``(masked_ids, labels)`` with
    ``labels = IGNORE`` (-100) where nothing is predicted. ``force`` (bool, like the ids):
    positions chosen in any case unless special or padding (the grounded words of
    :class:`PretrainCollator`, ERNIE-ViL's attribute / object / relation prediction)."""
    ids = input_ids.clone()
    maskable = attention_mask.bool() & ~torch.isin(ids, torch.as_tensor(list(special_ids), dtype=ids.dtype))
    chosen = (torch.rand(ids.shape, generator=generator) < prob) & maskable
    if force is not None:
        chosen |= force & maskable
    if not chosen.any() and maskable.any():
        flat = maskable.flatten().nonzero().flatten()
        pick = flat[torch.randint(len(flat), (1,), generator=generator)]
        chosen.view(-1)[pick] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    u = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (u < 0.8)
    to_random = chosen & (u >= 0.8) & (u < 0.9)
    ids[to_mask] = mask_token_id
    rand = torch.randint(random_low, vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
    ids[to_random] = rand[to_random]
    return ids, labels


# ============================================================================ data
@dataclass
class Source:
    """One pre-training corpus: examples = (image, positive text), images as cached cells.

    ``feats``: (n_images, cells, 1280) cells (a float16 memory map is fine); ``rows[i]``:
    the feats row (= image) of example ``i``; ``ids[i]``: token ids of its text;
    ``hard[i]``: token ids of its hard negatives (may be empty: a random negative is used);
    ``truth(i, j)``: whether example ``j``'s text is true of example ``i``'s image (``True`` /
    ``False``, or ``None`` when the data cannot tell) -- random negatives with ``truth`` True
    are rejected."""

    name: str
    feats: torch.Tensor
    rows: torch.Tensor
    texts: list[str]
    ids: list[list[int]]
    hard: list[list[list[int]]]
    truth: Callable[[int, int], bool | None]

    def __len__(self) -> int:
        return len(self.ids)


class Corpus(torch.utils.data.Dataset):
    """The concatenation of :class:`Source` s; item ``k`` is ``(source index, example index)``,
    which :class:`PretrainCollator` turns into a batch (so ``fit``'s seeded, resumable data
    order applies unchanged)."""

    def __init__(self, sources: Sequence[Source]):
        self.sources = list(sources)
        if not self.sources or not all(len(s) for s in self.sources):
            raise ValueError("a pre-training corpus needs at least one non-empty source")
        self._offsets = np.cumsum([0] + [len(s) for s in self.sources])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, k: int) -> tuple[int, int]:
        if not 0 <= k < len(self):
            raise IndexError(f"example {k} out of range for a corpus of {len(self)}")
        s = int(np.searchsorted(self._offsets, k, side="right") - 1)
        return s, int(k - self._offsets[s])


class PretrainCollator:
    """Builds a pre-training batch from ``[(source, example), ...]`` (module docstring).

    With ``itm``, exactly ``B // 2`` rows (chosen at random) get a negative text and
    ``round(hard_frac * (B // 2))`` of those a hard negative (a random one if the example has
    none). With ``mlm``, every example's own caption is masked (:func:`mask_tokens`: BERT's
    15 %, plus each *grounded* word -- see :meth:`grounded_groups` -- with probability
    ``grounded_prob``, all its WordPiece tokens at once). Randomness comes from ``generator``
    or, when ``None``, torch's global RNG -- which ``fit`` seeds and restores on resume.
    Returned tensors (``L`` = longest text of the batch):

    ``image_feats`` (B, cells, 1280) float32; ``itm_ids`` / ``itm_mask`` (B, L): the ITM
    texts, unmasked; ``itm_labels`` (B,) 1 = match; ``itm_kind`` (B,) 0 positive / 1 random
    / 2 hard negative; ``pos_ids`` / ``pos_mask`` (B, L): every example's own caption;
    ``mlm_ids`` / ``mlm_labels`` (B, L): that caption masked, and the original ids at the
    chosen positions (-100 elsewhere) -- only with ``mlm``.
    """

    def __init__(self, corpus: Corpus, *, pad_id: int = 0, mask_token_id: int = 103,
                 special_ids: Sequence[int] = (0, 100, 101, 102, 103), vocab_size: int = 30522,
                 random_low: int = 999, mlm_prob: float = 0.15, hard_frac: float = 0.5,
                 generator: torch.Generator | None = None, max_tries: int = 50, itm: bool = True, mlm: bool = True,
                 vocab: Sequence[str] | None = None, grounded_words: Sequence[str] = (), grounded_prob: float = 0.0,
                 answer_after: str = "?"):
        self.corpus, self.pad_id, self.itm, self.mlm = corpus, pad_id, itm, mlm
        if grounded_prob and vocab is None:
            raise ValueError("grounded_prob > 0 needs the tokenizer's vocab (id -> token) to find the grounded words")
        self.vocab, self.grounded_words, self.grounded_prob = vocab, frozenset(grounded_words), grounded_prob
        self.answer_after, self.special, self._groups = answer_after, frozenset(special_ids), {}
        self.mask_kw = dict(mask_token_id=mask_token_id, special_ids=tuple(special_ids), vocab_size=vocab_size,
                            random_low=min(random_low, vocab_size - 1), prob=mlm_prob)
        self.hard_frac, self.generator, self.max_tries = hard_frac, generator, max_tries

    def _randint(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def random_negative(self, s: int, i: int) -> list[int]:
        """Text of another example of source ``s`` that is not known to be true of ``i``'s image."""
        src = self.corpus.sources[s]
        for _ in range(self.max_tries):
            j = self._randint(len(src))
            if int(src.rows[j]) != int(src.rows[i]) and src.ids[j] != src.ids[i] and src.truth(i, j) is not True:
                return src.ids[j]
        raise RuntimeError(f"source {src.name!r}: no random negative for example {i} in {self.max_tries} draws "
                           "(is every text the same?)")

    def grounded_groups(self, ids: Sequence[int]) -> list[list[int]]:
        """Positions of the grounded words of a text, one list of (WordPiece) positions per
        word: words in ``grounded_words``, or -- in a question-answer text (one holding
        ``answer_after``, "?") -- every word after it, i.e. the answer. Needs ``vocab``."""
        key = tuple(ids)
        hit = self._groups.get(key)
        if hit is not None:
            return hit
        words: list[list[int]] = []
        text: list[str] = []
        for k, t in enumerate(ids):
            tok = self.vocab[t] if 0 <= t < len(self.vocab) else ""
            if t in self.special:
                words.append([])
                text.append("")
            elif tok.startswith("##") and words and words[-1]:
                words[-1].append(k)
                text[-1] += tok[2:]
            else:
                words.append([k])
                text.append(tok)
        if self.answer_after in text:
            start = text.index(self.answer_after) + 1
            out = [w for w in words[start:] if w]
        else:
            out = [w for w, x in zip(words, text) if w and x in self.grounded_words]
        if len(self._groups) < 200_000:
            self._groups[key] = out
        return out

    def pad(self, seqs: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        return ids, mask

    def __call__(self, items: list[tuple[int, int]]) -> dict:
        b = len(items)
        n_neg = b // 2 if self.itm else 0
        if self.itm and b < 2:
            raise ValueError(f"an ITM batch needs at least 2 examples (one positive, one negative), got {b}")
        srcs = self.corpus.sources
        feats = torch.stack([srcs[s].feats[int(srcs[s].rows[i])] for s, i in items]).float()
        pos = [srcs[s].ids[i] for s, i in items]
        neg_rows = torch.randperm(b, generator=self.generator)[:n_neg].tolist()
        n_hard = round(self.hard_frac * n_neg)
        kind = torch.zeros(b, dtype=torch.long)
        texts = list(pos)
        for r_i, r in enumerate(neg_rows):
            s, i = items[r]
            hard = srcs[s].hard[i]
            if r_i < n_hard and hard:
                texts[r], kind[r] = hard[self._randint(len(hard))], HARD_NEG
            else:
                texts[r], kind[r] = self.random_negative(s, i), RANDOM_NEG
        length = max(len(t) for t in texts + pos)
        ids, mask = self.pad(texts, length)
        pos_ids, pos_mask = self.pad(pos, length)
        out = {"image_feats": feats, "itm_ids": ids, "itm_mask": mask, "itm_labels": (kind == POSITIVE).long(),
               "itm_kind": kind, "pos_ids": pos_ids, "pos_mask": pos_mask}
        if self.mlm:
            force = None
            if self.grounded_prob:
                force = torch.zeros_like(pos_mask, dtype=torch.bool)
                for r in range(b):
                    groups = self.grounded_groups(pos[r])
                    if groups:
                        draw = torch.rand(len(groups), generator=self.generator) < self.grounded_prob
                        for g, d in zip(groups, draw.tolist()):
                            if d:
                                force[r, g] = True
            out["mlm_ids"], out["mlm_labels"] = mask_tokens(pos_ids, pos_mask, force=force, generator=self.generator,
                                                            **self.mask_kw)
            if force is not None:
                out["mlm_grounded"] = force & (out["mlm_labels"] != IGNORE)
        return out


# ---------------------------------------------------------------------------- sources
_NUM = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}
_REL = re.compile(r"^a (.+?) (to the left of|to the right of|above|below) a (.+)\.$")


def _parse_desc(words: list[str], plural: bool) -> dict | None:
    from .data.scenes import COLOURS, SHAPES, SIZES

    if not words:
        return None
    noun = words[-1]
    if plural:
        if not noun.endswith("s"):
            return None
        noun = noun[:-1]
    d = {"size": None, "colour": None, "shape": None if noun == "shape" else noun}
    if d["shape"] is not None and d["shape"] not in SHAPES:
        return None
    for w in words[:-1]:
        slot = "size" if w in SIZES else "colour" if w in COLOURS else None
        if slot is None or d[slot] is not None:
            return None
        d[slot] = w
    return d


def caption_program(text: str, kind: str) -> dict | None:
    """The :mod:`vlkit.data.grammar` program of a ``shapes_captions`` caption (``kind``
    scene | list | rel | count), or ``None`` if ``text`` does not parse; a parsed program
    always renders back to ``text`` exactly (checked)."""
    from .data import grammar as g

    p = None
    if kind in ("scene", "list"):
        body = text.rstrip(".")
        parts = body.split(", ")
        if " and " in parts[-1]:
            parts = parts[:-1] + parts[-1].split(" and ")
        descs = []
        for part in parts:
            w = part.split()
            if not w or w[0] != "a":
                return None
            d = _parse_desc(w[1:], False)
            if d is None:
                return None
            descs.append(d)
        p = {"kind": kind, "descs": descs}
    elif kind == "rel":
        m = _REL.match(text)
        if m:
            a, b = _parse_desc(m.group(1).split(), False), _parse_desc(m.group(3).split(), False)
            if a is not None and b is not None:
                p = {"kind": "rel", "a": a, "rel": m.group(2), "b": b}
    elif kind == "count":
        w = text.rstrip(".").split()
        if len(w) >= 3 and w[0] == "exactly" and w[1] in _NUM:
            n = _NUM[w[1]]
            d = _parse_desc(w[2:], n != 1)
            if d is not None:
                p = {"kind": "count", "desc": d, "n": n}
    if p is None or g.caption_text(p) != text:
        return None
    return p


def shapes_source(ds, feats: torch.Tensor, tokenize: Callable[[list[str]], list[list[int]]], *, seed: int = 0,
                  n_hard: int = 3, name: str = "shapes_captions") -> Source:
    """A :class:`Source` from a ``shapes_captions`` split: exact hard negatives (one slot of
    the caption's program changed until it is false for the scene; up to ``n_hard`` distinct
    ones per caption, seeded) and a ``truth`` computed on the scene metadata."""
    from .data import grammar as g
    from .data.scenes import Scene

    texts, kinds = list(ds["caption"]), list(ds["kind"])
    scenes = [Scene.from_records(r) for r in ds["scene"]]
    rng = np.random.default_rng(seed)
    programs, hard_texts = [], []
    for text, kind, scene in zip(texts, kinds, scenes):
        p = caption_program(text, kind)
        programs.append(p)
        negs: list[str] = []
        if p is not None:
            avoid = {text}
            for _ in range(n_hard):
                found = g.hard_negative(p, scene, rng, avoid)
                if found is None:
                    break
                t = g.caption_text(found[0])
                avoid.add(t)
                negs.append(t)
        hard_texts.append(negs)

    def truth(i: int, j: int) -> bool | None:
        return None if programs[j] is None else bool(g.caption_truth(programs[j], scenes[i]))

    ids = tokenize(texts)
    flat = [t for ts in hard_texts for t in ts]
    flat_ids = iter(tokenize(flat)) if flat else iter(())
    hard = [[next(flat_ids) for _ in ts] for ts in hard_texts]
    return Source(name, feats, torch.arange(len(texts)), texts, ids, hard, truth)


EASYVQA_KINDS = {"yesno": ("yes", "no"), "colour": ("blue", "black", "brown", "gray", "green", "red", "teal", "yellow"),
                 "shape": ("circle", "rectangle", "triangle")}


def easyvqa_text(question: str, answer: str) -> str:
    """An easy-VQA question-answer pair as a caption: ``"<question> <answer>"``."""
    return f"{question} {answer}"


def easyvqa_source(ds, feats: torch.Tensor, rows: torch.Tensor, tokenize: Callable[[list[str]], list[list[int]]],
                   name: str = "easyvqa") -> Source:
    """A :class:`Source` from an easy-VQA split (one example per question; ``rows`` = the
    cells row of each question's image, :func:`vlkit.data.features.feature_rows`). Hard
    negatives: the same question with every other answer of the same kind."""
    questions, answers = list(ds["question"]), list(ds["answer"])
    texts = [easyvqa_text(q, a) for q, a in zip(questions, answers)]
    family = {a: k for k, vals in EASYVQA_KINDS.items() for a in vals}
    for a in set(answers):
        if a not in family:
            raise ValueError(f"easy-VQA answer {a!r} is in none of the answer kinds {EASYVQA_KINDS}")
    hard_texts = [[easyvqa_text(q, o) for o in EASYVQA_KINDS[family[a]] if o != a] for q, a in zip(questions, answers)]
    rows = torch.as_tensor(rows, dtype=torch.long)
    true_of: dict[int, set[str]] = {}
    for r, t in zip(rows.tolist(), texts):
        true_of.setdefault(r, set()).add(t)
    false_of: dict[int, set[str]] = {}
    for r, ts in zip(rows.tolist(), hard_texts):
        false_of.setdefault(r, set()).update(ts)

    def truth(i: int, j: int) -> bool | None:
        r, t = int(rows[i]), texts[j]
        return True if t in true_of[r] else False if t in false_of[r] else None

    ids = tokenize(texts)
    flat = [t for ts in hard_texts for t in ts]
    uniq = sorted(set(flat))
    lookup = dict(zip(uniq, tokenize(uniq)))
    hard = [[lookup[t] for t in ts] for ts in hard_texts]
    return Source(name, feats, rows, texts, ids, hard, truth)


def make_tokenize(text_len: int):
    """``texts -> token ids`` with MiniLM's tokenizer (``[CLS] ... [SEP]``, at most ``text_len``)."""
    from .models.text import minilm_tokenizer

    tok = minilm_tokenizer()

    def tokenize(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return tok(list(texts), truncation=True, max_length=text_len)["input_ids"]

    return tokenize


def _subset(ds, n: int | None, seed: int, name: str):
    if n is None or n >= len(ds):
        return ds
    g = np.random.default_rng(seed)
    keep = np.sort(g.permutation(len(ds))[:n])
    log.info("%s: seeded subset of %d of %d rows", name, n, len(ds))
    return ds.select(keep.tolist())


def build_corpus(cfg: PretrainConfig, profile: str | None, split: str = "train", seed: int | None = None) -> Corpus:
    """The corpus of ``cfg.corpora`` for ``profile`` (params.yaml's data knobs and seed),
    images from the cached cells at ``cfg.image_size`` px."""
    from . import config
    from .data.features import cached_features, feature_rows
    from .data.stage import data_config, load_for

    seed = config.seed() if seed is None else seed
    dcfg = data_config(profile)
    tokenize = make_tokenize(cfg.text_len)
    sources = []
    for name in cfg.corpora:
        ds = load_for(profile, name, split)
        ds = _subset(ds, cfg.max_rows.get(name), seed, name).remove_columns(
            [c for c in ("image", "image_left", "image_right") if c in ds.column_names])
        feats = cached_features(name, split, cfg.image_size, seed=config.seed(), **dcfg.knobs_for(name))
        if name == "shapes_captions":
            # rows of a subset: map back to the split's rows through image_id (= row index)
            src = shapes_source(ds, feats, tokenize, seed=seed)
            src.rows = torch.as_tensor(np.asarray(ds["image_id"]), dtype=torch.long)
        else:
            src = easyvqa_source(ds, feats, feature_rows(name, ds), tokenize)
        sources.append(src)
    return Corpus(sources)


# ============================================================================ model
class MLMHead(nn.Module):
    """BERT's masked-LM prediction head (HF ``BertLMPredictionHead``; Devlin et al. 2019):
    ``decoder(LN(GELU(W h + b))) + bias``, where the decoder's weight *is* the text word
    embedding matrix (tied, as BERT's; Press & Wolf 2017)."""

    def __init__(self, dim: int, word_embeddings: nn.Embedding, eps: float = 1e-12):
        super().__init__()
        vocab, emb_dim = word_embeddings.weight.shape
        self.dense = nn.Linear(dim, emb_dim)
        self.norm = nn.LayerNorm(emb_dim, eps=eps)
        self.decoder = nn.Linear(emb_dim, vocab, bias=False)
        self.decoder.weight = word_embeddings.weight  # tied
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h)))) + self.bias


def head_dims(backbone: nn.Module) -> tuple[int, int]:
    """``(pooled width, fused text width)`` of ``backbone`` (one forward on its dummy inputs):
    the ITM head reads the first, the MLM head the second."""
    with torch.no_grad():
        was = backbone.training
        x = backbone.dummy_inputs(1)
        out = backbone.eval()(**x)
        backbone.train(was)
    return int(out.pooled.shape[-1]), int(text_states(out, x["input_ids"].shape[1]).shape[-1])


def text_states(out, n_text: int) -> torch.Tensor:
    """The fused text states (B, L, D): the ``text`` stream of a two-tower backbone, or the
    first ``n_text`` tokens of a single-stream (``joint``) one."""
    if "text" in out.sequences:
        return out.sequences["text"]
    return out.sequences["joint"][:, :n_text]


class PretrainModel(nn.Module):
    """A backbone plus its pre-training heads; ``forward(batch)`` returns the summed loss and
    each objective's loss and accuracy (a dict, as ``fit``'s ``loss_fn`` may return).

    ITM and MLM run as one backbone call over ``[ITM pairs; MLM pairs]`` (both halves carry
    the batch's images); ITC encodes the images and their own captions with the towers."""

    def __init__(self, backbone: nn.Module, objectives: Sequence[str], itc_temperature: float = 0.07,
                 seed: int = 0):
        super().__init__()
        for o in objectives:
            if o not in OBJECTIVES:
                raise UnknownNameError("pre-training objective", o, OBJECTIVES)
        if "itc" in objectives and not hasattr(backbone, "encode_image"):
            raise ValueError(f"objective 'itc' needs encode_image / encode_text; preset "
                             f"{getattr(backbone, 'preset', '?')!r} has none")
        self.backbone, self.objectives, self.itc_temperature = backbone, tuple(objectives), itc_temperature
        if "itc" in objectives:
            with torch.no_grad():
                x = backbone.dummy_inputs(1)
                dims = (backbone.encode_image(image_feats=x["image_feats"]).shape[-1],
                        backbone.encode_text(x["input_ids"], x["attention_mask"]).shape[-1])
            if dims[0] != dims[1]:
                raise ValueError(f"objective 'itc' needs image and text embeddings of one width; preset "
                                 f"{getattr(backbone, 'preset', '?')!r} gives {dims[0]} and {dims[1]} (it has "
                                 "no contrastive projections)")
        pooled, text = head_dims(backbone)
        from .seeding import derive_seed
        from .tasks.heads import ITMHead

        with torch.random.fork_rng(devices=[]):  # heads seeded by ``seed`` alone, the global RNG untouched
            torch.manual_seed(derive_seed(seed, "pretrain-heads") % 2**32)
            if "itm" in objectives:
                self.itm_head = ITMHead(pooled)
            if "mlm" in objectives:
                self.mlm_head = MLMHead(text, backbone.text_embeddings.word_embeddings)

    def forward(self, batch: dict) -> dict:
        feats = batch["image_feats"]
        b = feats.shape[0]
        parts = [k for k in ("itm", "mlm") if k in self.objectives]
        out: dict[str, torch.Tensor] = {}
        total = feats.new_zeros(())
        if parts:
            ids = torch.cat([batch[f"{k}_ids"] for k in parts])
            mask = torch.cat([batch["itm_mask" if k == "itm" else "pos_mask"] for k in parts])
            fused = self.backbone(input_ids=ids, attention_mask=mask, image_feats=feats.repeat(len(parts), 1, 1))
            if "itm" in parts:
                logits = self.itm_head(fused.pooled[:b])
                labels = batch["itm_labels"]
                out["itm"] = F.cross_entropy(logits, labels)
                right = (logits.argmax(-1) == labels).float()
                out["itm_acc"] = right.mean().detach()
                hard = batch["itm_kind"] == HARD_NEG
                if hard.any():
                    out["itm_hard_acc"] = right[hard].mean().detach()
                total = total + out["itm"]
            if "mlm" in parts:
                k = parts.index("mlm")
                labels = batch["mlm_labels"]
                sel = labels != IGNORE
                h = text_states(fused, ids.shape[1])[k * b:(k + 1) * b][sel]
                logits = self.mlm_head(h)
                out["mlm"] = F.cross_entropy(logits, labels[sel])
                right = (logits.argmax(-1) == labels[sel]).float()
                out["mlm_acc"] = right.mean().detach()
                grounded = batch.get("mlm_grounded")
                if grounded is not None and grounded[sel].any():
                    out["mlm_grounded_acc"] = right[grounded[sel]].mean().detach()
                total = total + out["mlm"]
        if "itc" in self.objectives:
            from .tasks.heads import contrastive_loss

            img = self.backbone.encode_image(image_feats=feats)
            txt = self.backbone.encode_text(batch["pos_ids"], batch["pos_mask"])
            out["itc"] = contrastive_loss(img, txt, self.itc_temperature)
            total = total + out["itc"]
        out["loss"] = total
        return out


def pretrain_loss(model: PretrainModel, batch: dict) -> dict:
    """The loss record of one pre-training batch (the `fit` loss function of pre-training and of
    pre-training KD's probe): the model's own forward, one loss per objective and their sum."""
    return model(batch)


def param_groups(model: PretrainModel, backbone_new: set[str], lr: float, mult: float,
                 weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on ``ndim >= 2`` tensors only; ``lr * mult`` for the
    backbone tensors in ``backbone_new`` (randomly initialised) and for the heads."""
    groups: dict[tuple[bool, bool], list] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        new = not name.startswith("backbone.") or name[len("backbone."):] in backbone_new
        groups.setdefault((new, p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr": lr * (mult if new else 1.0), "weight_decay": weight_decay if decay else 0.0}
            for (new, decay), ps in sorted(groups.items())]


def random_parameters(preset: str, seed: int, overrides: dict, built: nn.Module | None = None) -> set[str]:
    """Names of the backbone tensors the builder initialises randomly: those that differ
    between builds under ``seed`` and ``seed + 1`` (MiniLM's copies do not). ``built``: the
    untrained ``seed`` build, if the caller has it (saves a build)."""
    from .models import build

    a = (built if built is not None else build(preset, seed=seed, **overrides)).state_dict()
    b = build(preset, seed=seed + 1, **overrides).state_dict()
    return {k for k in a if not torch.equal(a[k], b[k])}


# ============================================================================ running
def run_dir_for(preset: str, profile: str) -> Path:
    """``runs/pretrain/<preset>`` (``runs/pretrain-ci/<preset>`` under the ci profile)."""
    from .paths import RUNS_DIR

    return RUNS_DIR / ("pretrain-ci" if profile == "ci" else "pretrain") / preset


def _grounded_words() -> frozenset[str]:
    from .data import grammar as g
    from .data.scenes import COLOURS, SHAPES, SIZES

    return frozenset([*COLOURS, *SHAPES, *(f"{x}s" for x in SHAPES), *SIZES, "left", "right", "above", "below",
                      *g.NUMBERS])


GROUNDED_WORDS = _grounded_words()


def minilm_tokens() -> dict:
    """Special-token settings of MiniLM's tokenizer for :class:`PretrainCollator` (random MLM
    replacements come from the ordinary tokens, from ``!`` = 999 on, not the ``[unused]`` ones)."""
    from .models.text import minilm_tokenizer

    tok = minilm_tokenizer()
    vocab = [""] * len(tok)
    for t, i in tok.get_vocab().items():
        vocab[i] = t
    return dict(pad_id=tok.pad_token_id, vocab=vocab,
                mask_token_id=tok.mask_token_id, special_ids=tuple(tok.all_special_ids),
                random_low=tok.convert_tokens_to_ids("!"))


def build_val_corpus(cfg: PretrainConfig, profile: str | None, seed: int | None = None) -> Corpus:
    """The validation corpus of :func:`build_corpus`: the ``val`` split with a tenth of each
    capped corpus's cap (all of an uncapped one), so it mixes like the train set."""
    return build_corpus(dataclasses.replace(cfg, max_rows={k: max(1, v // 10) for k, v in cfg.max_rows.items()}),
                        profile, "val", seed)


def collator_for(corpus: Corpus, cfg: PretrainConfig, vocab_size: int, tokens: dict | None = None,
                 generator=None, objectives: Sequence[str] = ("itm", "mlm"), val: bool = False) -> PretrainCollator:
    """:class:`PretrainCollator` with ``cfg``'s masking / negatives (``val``: the validation
    share of hard negatives) and ``tokens``' special ids (default :func:`minilm_tokens`)."""
    return PretrainCollator(corpus, **(tokens if tokens is not None else minilm_tokens()), vocab_size=vocab_size,
                            mlm_prob=cfg.mlm_prob, hard_frac=cfg.val_hard_frac if val else cfg.hard_frac,
                            generator=generator,
                            itm="itm" in objectives, mlm="mlm" in objectives, grounded_words=GROUNDED_WORDS,
                            grounded_prob=cfg.grounded_prob)


def fixed_batches(corpus: Corpus, collate: PretrainCollator, rows: int, batch_size: int, seed: int) -> list[dict]:
    """Seeded validation batches (their own generator: the training RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(corpus), generator=g)[:rows].tolist()
    saved, collate.generator = collate.generator, g
    try:
        return [collate([corpus[k] for k in keep[s:s + batch_size]]) for s in range(0, len(keep), batch_size)
                if len(keep[s:s + batch_size]) >= 2]
    finally:
        collate.generator = saved


@torch.no_grad()
def evaluate(model: PretrainModel, batches: list[dict]) -> dict:
    """Mean of each logged value over ``batches`` (eval mode), keys prefixed ``val_``; and,
    as a test of whether the model reads the image at all, ITM and grounded-word MLM
    accuracy with every text paired with *another* example's image (the batch's images
    rolled by one), prefixed ``val_shuffled_``."""
    was = model.training
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        shuffled = {**batch, "image_feats": batch["image_feats"].roll(1, 0)}
        for prefix, b in (("", batch), ("shuffled_", shuffled)):
            for k, v in model(b).items():
                if prefix and k not in ("itm_acc", "mlm_grounded_acc", "mlm_acc"):
                    continue
                sums[prefix + k] = sums.get(prefix + k, 0.0) + float(v)
                counts[prefix + k] = counts.get(prefix + k, 0) + 1
    model.train(was)
    return {f"val_{k}": v / counts[k] for k, v in sums.items()}


def _atomic_replace_dir(src: Path, dst: Path) -> None:
    old = None
    if dst.exists():
        old = dst.with_name(f".tmp-old-{dst.name}-{secrets.token_hex(4)}")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_final(backbone: nn.Module, run_dir: str | Path, step: int, extra: dict) -> Path:
    """Write ``run_dir/final/``: a vlkit checkpoint folder of the *backbone only*
    (``model.safetensors`` with the backbone's own state-dict names, ``meta.json`` with
    sha256s and ``extra``), written aside and renamed into place atomically."""
    from .checkpoint import save_checkpoint

    run_dir = Path(run_dir)
    tmp = run_dir / f".tmp-final-{secrets.token_hex(4)}"
    try:
        ckpt = save_checkpoint(tmp, step, backbone, extra=extra, keep=None)
        _atomic_replace_dir(ckpt, run_dir / "final")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return run_dir / "final"


def read_final(path: str | Path) -> dict:
    """The ``extra`` record of an exported ``final/`` folder (steps, objectives, losses, ...)."""
    from .checkpoint import read_meta

    return read_meta(path)["extra"]


def _train_config(cfg: PretrainConfig, preset: str, seed: int):
    from .train import TrainConfig

    steps = cfg.steps_for(preset)
    return TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       max_grad_norm=cfg.max_grad_norm, schedule="linear", warmup_steps=int(cfg.warmup_frac * steps),
                       seed=seed, log_every=max(1, steps // 20), ckpt_every=cfg.ckpt_every, keep=1, progress=False,
                       fused=True)


@dataclass
class PretrainResult:
    """What :func:`pretrain_preset` returns: the JSON-able ``record`` (also in
    ``final/meta.json``'s ``extra``) and the trained :class:`PretrainModel` (``None`` when an
    up-to-date export made training unnecessary)."""

    record: dict
    model: PretrainModel | None = None


def pretrain_preset(preset: str, cfg: PretrainConfig, corpus: Corpus, val_corpus: Corpus | None, *,
                    run_dir: str | Path, seed: int = 0, profile: str = "default",
                    stop_at_step: int | None = None, resume: bool = True, keep_checkpoints: bool = False,
                    tokens: dict | None = None) -> PretrainResult:
    """Pre-train ``preset`` on ``corpus`` (resuming from ``run_dir``'s checkpoints), export
    ``run_dir/final`` and return its record: steps, objectives, wall time, history (one dict
    per step), validation metrics before and after (on ``val_corpus``).

    A finished run whose ``final/`` matches these settings is not trained again (its record
    is returned). ``stop_at_step``: stop early, as a preemption would (a checkpoint is
    written, a later call resumes; nothing is exported). After the export the training
    checkpoints are deleted unless ``keep_checkpoints`` (``final/`` is all later stages use).
    ``tokens``: special-token ids for the collator (default: MiniLM's, :func:`minilm_tokens`)."""
    from .checkpoint import hash_params, latest_checkpoint, list_checkpoints, read_meta
    from .models import build
    from .train import fit

    overrides = dict(cfg.overrides)
    objectives = list(cfg.objectives[preset])
    tcfg = _train_config(cfg, preset, seed)
    spec = {"preset": preset, "objectives": objectives, "overrides": overrides, "lr_new_mult": cfg.lr_new_mult,
            "mlm_prob": cfg.mlm_prob, "grounded_prob": cfg.grounded_prob, "hard_frac": cfg.hard_frac,
            **({"hard_start": cfg.hard_start} if cfg.hard_start else {}), "val_hard_frac": cfg.val_hard_frac,
            "itc_temperature": cfg.itc_temperature,
            "text_len": cfg.text_len, "image_size": cfg.image_size, "seed": seed, "train": tcfg.result_dict(),
            "corpus": [[s.name, len(s)] for s in corpus.sources]}
    phash = hash_params(spec)
    run_dir = Path(run_dir)
    final = run_dir / "final"
    if resume and (final / "meta.json").is_file():
        done = read_final(final)
        if done.get("params_hash") == phash and done.get("steps") == tcfg.steps:
            log.info("%s: %s is up to date (%d steps); not training again", preset, final, tcfg.steps)
            return PretrainResult(done)
    found = latest_checkpoint(run_dir) if resume else None
    if found is not None and read_meta(found)["extra"].get("caller_params_hash") != phash:
        log.warning("%s: checkpoint %s is from other settings; starting over", preset, found)
        resume, found = False, None

    backbone = build(preset, seed=seed, **overrides)
    new = random_parameters(preset, seed, overrides, built=backbone)
    model = PretrainModel(backbone, objectives, cfg.itc_temperature, seed=seed)
    vocab = backbone.text_embeddings.word_embeddings.num_embeddings
    tokens = tokens if tokens is not None else minilm_tokens()
    collate = collator_for(corpus, cfg, vocab, tokens, objectives=objectives)
    val = (fixed_batches(val_corpus, collator_for(val_corpus, cfg, vocab, tokens, objectives=objectives, val=True),
                         cfg.eval_rows, cfg.batch_size, seed)
           if val_corpus is not None else [])
    before_file = run_dir / "val_before.json"
    before = {}
    if val:
        saved = json.loads(before_file.read_text()) if before_file.is_file() else {}
        if saved.get("params_hash") == phash and found is not None:
            before = saved["metrics"]
        else:
            before = evaluate(model, val)
            from .results import atomic_write_text

            atomic_write_text(before_file, json.dumps({"params_hash": phash, "metrics": before}, indent=1) + "\n")
    resumed = int(read_meta(found)["step"]) if found is not None else 0
    collate.hard_frac = hard_frac_at(cfg, resumed, tcfg.steps)

    def hard_phase(done: int, _rec: dict) -> None:  # the batch of the next step is collated after this
        collate.hard_frac = hard_frac_at(cfg, done, tcfg.steps)

    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(model, pretrain_loss, corpus, config=tcfg, collate_fn=collate, run_dir=run_dir, resume=resume,
                 params_hash=phash, param_groups=param_groups(model, new, cfg.lr, cfg.lr_new_mult, cfg.weight_decay),
                 stop_at_step=stop_at_step, callbacks=[hard_phase])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    record = {"preset": preset, "profile": profile, "steps": result.step, "total_steps": result.total_steps,
              "objectives": objectives, "batch_size": cfg.batch_size, "examples_seen": result.step * cfg.batch_size,
              "corpus": spec["corpus"], "wall_s_this_call": round(wall, 1), "cpu_s_this_call": round(cpu, 1),
              "threads": torch.get_num_threads(), "resumed_from_step": resumed,
              "s_per_step": round(wall / (result.step - resumed), 3) if result.step > resumed else None,
              "hard_frac": cfg.hard_frac, "hard_start": cfg.hard_start, "params_hash": phash,
              "history": result.history}
    if not result.finished:
        return PretrainResult(record, model)
    record["val_before"] = before
    record["val_after"] = evaluate(model, val) if val else {}
    tail = result.history[-max(1, len(result.history) // 10):]
    record["final_train"] = {k: float(np.mean([h[k] for h in tail if k in h]))
                             for k in ("loss", "itm", "mlm", "itc", "itm_acc", "itm_hard_acc", "mlm_acc",
                                       "mlm_grounded_acc")
                             if any(k in h for h in tail)}
    export_final(model.backbone.eval(), run_dir, result.step, record)
    if not keep_checkpoints:
        for ck in list_checkpoints(run_dir):
            shutil.rmtree(ck)
        (run_dir / "latest").unlink(missing_ok=True)
    return PretrainResult(record, model)


def write_results(records: list[dict], out_dir: Path) -> None:
    """``curves.csv`` (step, preset, lr, losses, accuracies) and ``summary.md`` / ``.csv``."""
    import pandas as pd

    from .results import atomic_write_text, write_table

    curve_keys = ("loss", "itm", "mlm", "itc", "itm_acc", "itm_hard_acc", "mlm_acc", "mlm_grounded_acc", "lr",
                  "grad_norm")
    rows = [{"step": h["step"], "preset": r["preset"], **{k: h.get(k) for k in curve_keys}}
            for r in records for h in r["history"]]
    curves = pd.DataFrame(rows, columns=["step", "preset", *curve_keys])
    atomic_write_text(out_dir / "curves.csv", curves.to_csv(index=False, lineterminator="\n", float_format="%.6g"))
    summary = []
    for r in records:
        ft, vb, va = r.get("final_train", {}), r.get("val_before", {}), r.get("val_after", {})
        summary.append({"preset": r["preset"], "objectives": "+".join(r["objectives"]), "steps": r["steps"],
                        "examples": r["examples_seen"], "train loss": ft.get("loss"), "train ITM": ft.get("itm"),
                        "train MLM": ft.get("mlm"), "train ITC": ft.get("itc"),
                        "val ITM acc before": vb.get("val_itm_acc"), "val ITM acc after": va.get("val_itm_acc"),
                        "val hard-neg acc after": va.get("val_itm_hard_acc"),
                        "val MLM acc before": vb.get("val_mlm_acc"), "val MLM acc after": va.get("val_mlm_acc"),
                        "val grounded-word acc after": va.get("val_mlm_grounded_acc"),
                        "same, shuffled images": va.get("val_shuffled_mlm_grounded_acc"),
                        "val ITM acc, shuffled images": va.get("val_shuffled_itm_acc"),
                        "val ITC before": vb.get("val_itc"), "val ITC after": va.get("val_itc"),
                        "wall s": r.get("wall_s_this_call"), "CPU s": r.get("cpu_s_this_call"),
                        "threads": r.get("threads")})
    corpus = ", ".join(f"{n} ({k} pairs)" for n, k in records[0]["corpus"]) if records else ""
    hard = {(r.get("hard_frac"), r.get("hard_start") or 0.0) for r in records if r.get("hard_frac") is not None}
    (frac, start), = hard if len(hard) == 1 else ((None, None),)
    note = (f"Corpus: {corpus}. Train losses: mean over the last 10% of steps"
            + ("" if frac is None else
               f"; a share {frac} of the training ITM negatives are hard ones" if not start else
               f"; hard-negative phase: the last {1 - start:.0%} of the steps draw a share {frac} of their ITM "
               f"negatives hard (earlier steps: random negatives), so the train losses are the phase's")
            + ". Val: fixed seeded pairs of the "
            "val splits (half negatives, half of those hard), before pre-training (MiniLM text, random "
            "vision/fusion) and after; 'grounded-word acc': MLM accuracy on the masked colour / shape / size / "
            "relation / number words and easy-VQA answers, with the right images and with every caption paired "
            "with another example's image (a model that ignores the image scores the same on both). "
            "wall s / CPU s: this call's training time (a resumed run counts only "
            "what it did); CPU s counts every thread; the stage total is in results/timings/.")
    write_table(pd.DataFrame(summary), "summary", out_dir, note=note)


# ============================================================================ using the weights
def weights_for(preset: str, profile: str | None = None, *, build_if_missing: bool | None = None) -> Path:
    """The exported ``final/`` folder of ``preset`` for ``profile``. Missing: under ``ci`` (or
    with ``build_if_missing=True``) it is pre-trained now (a few steps); otherwise a clear
    error says how to make it (``dvc repro pretrain``)."""
    from . import config

    profile = config.check_profile(profile or config.load_params().get("profile", "default"))
    if preset not in PRETRAIN_PRESETS:
        raise UnknownNameError("pre-trained preset", preset, PRETRAIN_PRESETS)
    final = run_dir_for(preset, profile) / "final"
    if (final / "model.safetensors").is_file():
        return final
    if build_if_missing is None:
        build_if_missing = profile == "ci"
    if not build_if_missing:
        raise FileNotFoundError(f"no pre-trained {preset} for profile {profile!r} at {final}: run "
                                f"`dvc repro pretrain` (or `python -m vlkit.pretrain --profile {profile} "
                                f"--preset {preset}`)")
    run(profile, presets=[preset])
    return final


def pretrained_backbone(preset: str, profile: str | None = None, **overrides) -> nn.Module:
    """``build(preset, weights=weights_for(preset, profile))``; ``xvlm-mini-half`` is built from
    the pre-trained ``xvlm-mini`` teacher (EfficientVLM's initialisation, layers 2i + 1)."""
    from .models import build

    if preset == "xvlm-mini-half":
        teacher = build("xvlm-mini", weights=weights_for("xvlm-mini", profile))
        return build(preset, teacher=teacher, **overrides)
    return build(preset, weights=weights_for(preset, profile), **overrides)


# ============================================================================ stage
def run(profile: str | None = None, presets: Sequence[str] | None = None) -> list[dict]:
    """The ``pretrain`` stage: pre-train ``presets`` (default: params.yaml's) one after the
    other, export each, write the results tables and the stage time."""
    from . import config
    from .results import results_dir, stage_timer

    profile = config.check_profile(profile or config.load_params().get("profile", "default"))
    cfg: PretrainConfig = config.resolve("pretrain", profile)
    seed = config.seed()
    out_dir = results_dir(profile) / "pretrain"
    names = list(presets) if presets else list(cfg.presets)
    for p in names:
        if p not in cfg.presets:
            raise UnknownNameError(f"preset of params.yaml pretrain.presets ({profile})", p, cfg.presets)
    records = []
    with stage_timer("pretrain" if not presets else f"pretrain-{'-'.join(names)}", profile,
                     results_dir(profile)):
        corpus = build_corpus(cfg, profile, "train", seed)
        val = build_val_corpus(cfg, profile, seed)
        log.info("corpus: %s; val: %s", [(s.name, len(s)) for s in corpus.sources],
                 [(s.name, len(s)) for s in val.sources])
        for p in names:
            t0 = time.perf_counter()
            rec = pretrain_preset(p, cfg, corpus, val, run_dir=run_dir_for(p, profile), seed=seed,
                                  profile=profile).record
            log.info("%s: %d steps in %.0f s (this call); final %s; val %s", p, rec["steps"],
                     time.perf_counter() - t0, rec.get("final_train"), rec.get("val_after"))
            records.append(rec)
    # the tables cover every preset with a final export (a --preset run keeps the others' rows)
    done = {r["preset"]: r for r in records}
    for p in cfg.presets:
        final = run_dir_for(p, profile) / "final"
        if p not in done and (final / "meta.json").is_file():
            done[p] = read_final(final)
    write_results([done[p] for p in cfg.presets if p in done], out_dir)
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlkit.pretrain", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default=None, help="ci | default | paper (default: params.yaml's)")
    ap.add_argument("--preset", action="append", default=None, help="pre-train only this preset (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run(args.profile, args.preset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
