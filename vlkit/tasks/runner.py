"""Task specs and the one fine-tuning entry point every method notebook uses.

``get_task(name)`` returns a :class:`TaskSpec`; ``finetune(task, backbone, method, ...)``
tunes a backbone on it with :func:`vlkit.train.fit` and evaluates on ``val`` and ``test``.

Tasks (the heads are :mod:`vlkit.tasks.heads`; ViLT's recipes, Kim et al. 2021, Sec. 4):

================  ================  =================================================  ====================
task              data              training                                           metric (percent)
================  ================  =================================================  ====================
easyvqa           easy-VQA          13-way answer classification on ``pooled``        accuracy
                                    (ViLT's VQA head; one answer per question)
shapes_nlvr       shapes_nlvr       two passes, (left image, statement) and (right     accuracy
                                    image, statement) -- image token type 1 and 2
                                    where the backbone has them -- then
                                    :class:`PairHead` on both pooled outputs (ViLT's
                                    NLVR2 "pair" recipe)
shapes_retrieval  shapes_retrieval  ITM on pooled (ViLT / ALBEF): each (image,         R@1 (mean of the
                                    caption) positive meets its one-slot hard          two directions);
                                    negative caption and an in-batch negative image;   R@1/5/10 i2t, t2i
                                    two-tower presets add ITC (symmetric InfoNCE,
                                    CLIP / ALBEF Eq. 1-2) on learned projections of
                                    ``encode_image`` / ``encode_text``
movie_reviews     movie_reviews     binary sentiment on pooled (text backbones)        accuracy, macro-F1
bbc_news          bbc_news          5 topics on pooled (text backbones)                accuracy, macro-F1
================  ================  =================================================  ====================

Retrieval evaluation (fixed gallery: the first ``gallery_images`` images of the split and
their first ``captions_per_image`` captions): two-tower presets (``meter-*``, ``xvlm-*``,
which have ``encode_image`` / ``encode_text``) rank every caption for every image by the
contrastive score, then re-rank the top ``rerank_k`` of each query with the matching head
(ALBEF's protocol, Li et al. 2021, Sec. 4; below the re-ranked candidates the contrastive
order continues); single-stream presets score every pair with the matching head. A caption counts as a hit for every gallery image it is *true* of
(:func:`vlkit.data.shapes.relevance`, computed on the scene metadata), so R@K is not
penalised for ranking a second true image first; with one true image per caption this is
exactly the Flickr30K/COCO protocol of :func:`vlkit.tasks.metrics.recall_at_k`.

Two-tower presets that stay protocol backbones are scored fast: the towers run once per
image and once per caption (``embed`` + ``run_units`` over each tower's units) and only the
fusion units run per pair -- the same numbers as a full forward of each pair.

Methods: ``"full"``, ``"linear_probe"`` (backbone frozen, a single linear layer on its
pooled output; its inputs are computed once, in eval mode, and the layer is trained on
them) and every :data:`vlkit.methods.petl.METHODS` name (``apply(method, backbone, **opts)``).
Standard errors: binomial ``sqrt(p (1 - p) / n)`` per query set; for the mean of two R@1
the two are combined as independent. Tune on ``val``; ``test`` is reported, never tuned on.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlkit.models.protocol import Backbone, BackboneOutput, State, UnknownNameError

from .data import DEFAULT_TEXT_LEN, CellStore, Collate, TaskData, pad_ids, token_ids
from .heads import ClassifierHead, ITMHead, PairHead, contrastive_loss
from .metrics import accuracy, macro_f1

__all__ = ["TASKS", "TaskSpec", "ClassifyTask", "NLVRTask", "RetrievalTask", "TaskModel", "LinearPairHead",
           "RetrievalHead", "get_task", "finetune", "subset_rows", "recall_at_k_relevant", "chance_recall_at_k",
           "METHODS_EXTRA", "fusion_start", "training_collate"]

METHODS_EXTRA = ("full", "linear_probe")  # besides vlkit.methods.petl.METHODS
FEATURES = ("cache", "compute")


# ============================================================================ helpers
def subset_rows(n: int, limit: int | None, seed: int, *salt: Any, groups: Sequence[int] | None = None) -> list[int]:
    """A fixed subset of ``limit`` of ``n`` rows (sorted; all rows if ``limit`` is ``None``
    or >= ``n``), drawn from a seed stream of ``(seed, salt)`` -- independent of any training
    seed, so every method sees the same rows. With ``groups`` (a group id per row), whole
    groups are taken (NLVR minimal pairs stay together) until ``limit`` rows are reached."""
    if limit is None or limit >= n:
        return list(range(n))
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"subset limit must be a positive int or None, got {limit!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(repr(salt).encode())]))
    if groups is None:
        return sorted(rng.choice(n, size=limit, replace=False).tolist())
    groups = np.asarray(groups)
    members: dict[int, list[int]] = {}
    for i, gid in enumerate(groups.tolist()):
        members.setdefault(gid, []).append(i)
    order = sorted(members)
    rows: list[int] = []
    for j in rng.permutation(len(order)):
        if len(rows) >= limit:
            break
        rows += members[order[j]]
    return sorted(rows[:limit] if len(rows) > limit else rows)


def recall_at_k_relevant(i2t_scores: torch.Tensor, t2i_scores: torch.Tensor, relevant: torch.Tensor,
                         ks: Sequence[int] = (1, 5, 10)) -> dict:
    """R@K (percent) in both directions with a relevance matrix.

    ``i2t_scores`` / ``t2i_scores``: (n_images, n_captions) scores used to rank captions for
    each image / images for each caption (they differ under re-ranking); ``relevant``:
    (n_captions, n_images) bool, caption j is true of image i. An image query is a hit at K
    when a relevant caption is among its top K; a caption query when a relevant image is.
    Queries without any relevant item are an error (every gallery caption has its image).
    Ties keep the gallery order (stable sort). Also returns ``n_i2t`` / ``n_t2i`` (queries).
    """
    rel = torch.as_tensor(relevant, dtype=torch.bool)
    n_img, n_cap = i2t_scores.shape
    if tuple(t2i_scores.shape) != (n_img, n_cap) or tuple(rel.shape) != (n_cap, n_img):
        raise ValueError(f"shapes: i2t {tuple(i2t_scores.shape)}, t2i {tuple(t2i_scores.shape)}, relevant "
                         f"{tuple(rel.shape)}; expected ({n_img}, {n_cap}) twice and ({n_cap}, {n_img})")
    if not rel.any(0).all() or not rel.any(1).all():
        raise ValueError("every image and every caption needs at least one relevant partner")
    order_i = i2t_scores.float().argsort(dim=1, descending=True, stable=True)  # (n_img, n_cap)
    hit_i = rel.t().gather(1, order_i)  # hit_i[i, r]: the caption at rank r is relevant to image i
    order_t = t2i_scores.float().t().argsort(dim=1, descending=True, stable=True)  # (n_cap, n_img)
    hit_t = rel.gather(1, order_t)
    first_i = hit_i.float().argmax(1)
    first_t = hit_t.float().argmax(1)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * (first_i < k).float().mean().item()
        out[f"t2i_R@{k}"] = 100.0 * (first_t < k).float().mean().item()
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    out["n_i2t"], out["n_t2i"] = n_img, n_cap
    return out


def chance_recall_at_k(relevant: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Expected R@K (percent) of a uniformly random ranking: a query with ``r`` relevant of
    ``N`` candidates hits at K with probability ``1 - C(N - r, K) / C(N, K)``."""
    rel = torch.as_tensor(relevant, dtype=torch.bool)
    n_cap, n_img = rel.shape

    def p(r: int, n: int, k: int) -> float:
        k = min(k, n)
        return 1.0 - (math.comb(n - r, k) / math.comb(n, k))

    out = {}
    r_i = rel.sum(0).tolist()  # relevant captions per image
    r_t = rel.sum(1).tolist()  # relevant images per caption
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float(np.mean([p(r, n_cap, k) for r in r_i]))
        out[f"t2i_R@{k}"] = 100.0 * float(np.mean([p(r, n_img, k) for r in r_t]))
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


def _pct_se(p: float, n: int) -> float:
    """Binomial standard error, in percent, of a percentage ``p`` over ``n`` queries."""
    q = p / 100.0
    return 100.0 * math.sqrt(max(q * (1 - q), 0.0) / n) if n else float("nan")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _raw_backbone(model: nn.Module) -> nn.Module:
    """The protocol backbone under a method wrapper (``.backbone``), or the model itself."""
    if isinstance(model, Backbone):
        return model
    inner = getattr(model, "backbone", None)
    return inner if isinstance(inner, nn.Module) else model


def _takes_image_type(model: nn.Module) -> bool:
    embed = getattr(_raw_backbone(model), "embed", None)
    return embed is not None and "image_token_type_idx" in inspect.signature(embed).parameters


def _two_tower(model: nn.Module) -> bool:
    return callable(getattr(model, "encode_image", None)) and callable(getattr(model, "encode_text", None))


def fusion_start(model: nn.Module) -> int | None:
    """Index of the first fusion unit of a two-stream protocol backbone whose units after it
    are all fusion units and whose streams are ``vision`` / ``text`` -- then the towers can
    run once per image / caption and only ``units[start:]`` per pair; else ``None``."""
    if not isinstance(model, Backbone):
        return None
    specs = model.specs
    mods = [s.modality for s in specs]
    if "fusion" not in mods:
        return None
    start = mods.index("fusion")
    if any(m != "fusion" for m in mods[start:]) or {s.stream for s in specs} != {"vision", "text"}:
        return None
    return start


def _tower_blocks(model: Backbone, start: int) -> dict[str, tuple[int, int]] | None:
    """``{"vision": (i0, i1), "text": (j0, j1)}``: contiguous unit ranges of each tower before
    ``start`` (``None`` if a tower's units are interleaved). Empty towers give ``(0, 0)``."""
    out = {}
    for stream in ("vision", "text"):
        idx = [i for i, s in enumerate(model.specs[:start]) if s.stream == stream]
        if idx and idx != list(range(idx[0], idx[-1] + 1)):
            return None
        out[stream] = (idx[0], idx[-1] + 1) if idx else (0, 0)
    return out


# ============================================================================ models
class TaskModel(nn.Module):
    """A tuned backbone (what ``apply(method, backbone)`` returned, or the frozen backbone of
    a linear probe) and a task head. Trainable: the method's parameters and the head's.
    ``forward(**inputs)`` is the backbone's (a :class:`BackboneOutput`); the task spec reads
    ``pooled`` and applies the head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, method: str = "full"):
        super().__init__()
        self.backbone, self.head, self.method = backbone, head, method
        self.image_types = _takes_image_type(backbone)

    def forward(self, **inputs) -> BackboneOutput:
        return self.backbone(**inputs)

    def trainable(self) -> dict[str, int]:
        """Trainable parameter elements of the backbone (the method's) and of the head."""
        count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
        return {"backbone": count(self.backbone), "head": count(self.head)}


class LinearPairHead(nn.Module):
    """Linear probe of NLVR: ``Linear(2D, 2)`` on ``[pooled_left; pooled_right]`` (the linear
    counterpart of :class:`PairHead`; the order of the pair matters)."""

    def __init__(self, dim: int, num_classes: int = 2):
        super().__init__()
        self.fc = nn.Linear(2 * dim, num_classes)

    def forward(self, pooled_left: torch.Tensor, pooled_right: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([pooled_left, pooled_right], dim=-1))


class RetrievalHead(nn.Module):
    """ITM head (``Linear(D, 2)``, ViLT / ALBEF) and, for two-tower backbones, the ITC
    projections ``g_v``, ``g_w`` onto ``embed_dim`` with a learned temperature
    (CLIP: ``logit_scale = log(1 / 0.07)`` at init, clamped to <= 100)."""

    def __init__(self, dim: int, image_dim: int | None = None, text_dim: int | None = None, embed_dim: int = 256):
        super().__init__()
        self.itm = ITMHead(dim)
        self.contrastive = image_dim is not None
        if self.contrastive:
            self.image_proj = nn.Linear(image_dim, embed_dim)
            self.text_proj = nn.Linear(text_dim, embed_dim)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def temperature(self) -> torch.Tensor:
        return 1.0 / self.logit_scale.clamp(max=math.log(100.0)).exp()

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(x), dim=-1)

    def embed_text(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(x), dim=-1)

    def match_score(self, pooled: torch.Tensor) -> torch.Tensor:
        """``logit(match) - logit(no match)`` of each pooled pair (ranking score)."""
        logits = self.itm(pooled)
        return logits[:, 1] - logits[:, 0]


# ============================================================================ specs
@dataclass(frozen=True)
class TaskSpec:
    """What a task needs from data to metric. Subclasses implement the task's parts:

    * :meth:`load` (split -> :class:`TaskData`), :meth:`make_head` (``dims`` -> head),
    * :meth:`encode` (model, batch -> the head's inputs, with graph) and :meth:`head_loss`
      (head, those inputs, batch -> ``{"loss", ...}``); :meth:`loss` chains the two, which is
      what :func:`vlkit.train.fit` calls; a linear probe computes :meth:`encode` once and
      trains :meth:`head_loss` on it,
    * :meth:`evaluate` (model, data -> ``{"score", "se", "n", ...}``, percent) and
      :meth:`chance` (train, eval data -> the same keys for a chance-level predictor).
    """

    name: str
    dataset: str
    modality: str  # "vl" | "text"
    metric: str
    text_column: str
    text_len: int = DEFAULT_TEXT_LEN

    # -------------------------------------------------------------- data
    def source(self, split: str, *, seed: int = 0, knobs: dict | None = None, profile: str | None = None):
        """``(dataset split, seed, knobs)``: the profile's knobs and seed when ``profile`` is
        given (params.yaml's data section), else ``seed`` / ``knobs``."""
        from vlkit.data import load

        if profile is not None:
            from vlkit import config
            from vlkit.data.stage import data_config

            seed, knobs = config.seed(), {**data_config(profile).knobs_for(self.dataset), **(knobs or {})}
        knobs = dict(knobs or {})
        return load(self.dataset, split, seed=seed, **knobs), seed, knobs

    def _token_key(self, split: str, seed: int, knobs: dict, column: str, rows: Sequence[int]) -> tuple:
        """Cache key of the token ids of ``column`` at ``rows`` of a split (set, split, rows)."""
        from vlkit.data.registry import key, spec

        digest = zlib.crc32(np.asarray(rows, dtype=np.int64).tobytes())
        return (self.dataset, key(spec(self.dataset, seed, **knobs)), split, column, len(rows), digest)

    def _cells(self, ds, split: str, rows: list[int], seed: int, knobs: dict, features: str, size: int):
        """(CellStore, row -> store row)."""
        if features not in FEATURES:
            raise UnknownNameError("features mode", features, FEATURES)
        if features == "cache":
            return CellStore.from_cache(self.dataset, split, ds, size=size, seed=seed, **knobs), {r: r for r in rows}
        return CellStore.compute(self.dataset, ds, rows, size=size), {r: i for i, r in enumerate(rows)}

    def load(self, split: str, *, limit: int | None = None, seed: int = 0, knobs: dict | None = None,
             profile: str | None = None, features: str = "cache", image_size: int = 128,
             text_len: int | None = None, **extra) -> TaskData:  # pragma: no cover - abstract
        raise NotImplementedError

    # -------------------------------------------------------------- model parts
    def make_head(self, dims: dict, linear: bool = False) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def dims(self, model: nn.Module, data: TaskData) -> dict:
        """Widths the head needs, from one forward of two examples (eval mode, no grad)."""
        batch = data.collate(data.examples[:2])
        with _eval_mode(model):
            out = model(**self.inputs(batch, "image_feats_left" if "image_feats_left" in batch else "image_feats"))
        return {"dim": int(out.pooled.shape[-1])}

    def inputs(self, batch: dict, image_key: str = "image_feats", ids: str = "input_ids",
               mask: str = "attention_mask") -> dict:
        x = {"input_ids": batch[ids], "attention_mask": batch[mask]}
        if self.modality == "vl":
            x["image_feats"] = batch[image_key]
        return x

    def encode(self, model: TaskModel, batch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def head_loss(self, head: nn.Module, enc: dict, batch: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, model: TaskModel, batch: dict) -> dict:
        """The training loss of ``model`` on ``batch`` (what :func:`vlkit.train.fit` calls)."""
        return self.head_loss(model.head, self.encode(model, batch), batch)

    def evaluate(self, model: TaskModel, data: TaskData, batch_size: int = 64) -> dict:  # pragma: no cover
        raise NotImplementedError

    def chance(self, train: TaskData, data: TaskData) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class ClassifyTask(TaskSpec):
    """Single-input classification on ``pooled``: easy-VQA answers (image + question) or
    text classes. Head: :class:`ClassifierHead` (ViLT's VQA classifier; ``hidden=0`` for the
    linear probe); loss: cross-entropy. Metrics: accuracy (+ macro-F1 for text)."""

    num_classes: int = 2

    def load(self, split: str, *, limit: int | None = None, seed: int = 0, knobs: dict | None = None,
             profile: str | None = None, features: str = "cache", image_size: int = 128,
             text_len: int | None = None, **extra) -> TaskData:
        self._no_extra_options(extra)
        ds, seed, knobs = self.source(split, seed=seed, knobs=knobs, profile=profile)
        rows = subset_rows(len(ds), limit, seed, self.name, split)
        n_len = text_len or self.text_len
        sub = ds.select(rows)
        ids = token_ids(self._token_key(split, seed, knobs, self.text_column, rows), sub[self.text_column], n_len)
        cells, where = (None, None)
        if self.modality == "vl":
            cells, where = self._cells(ds, split, rows, seed, knobs, features, image_size)
        examples = [{"ids": i, "label": int(y), **({"row": where[r]} if where else {})}
                    for r, i, y in zip(rows, ids, sub["label"])]
        classes = ds.features["label"].names
        if len(classes) != self.num_classes:
            raise ValueError(f"{self.name}: dataset has {len(classes)} classes, the spec says {self.num_classes}")
        return TaskData(self.name, split, examples, Collate(cells), rows, len(ds), {"classes": classes})

    def make_head(self, dims: dict, linear: bool = False) -> nn.Module:
        return ClassifierHead(dims["dim"], self.num_classes, hidden=0 if linear else None)

    def encode(self, model: TaskModel, batch: dict) -> dict:
        return {"pooled": model(**self.inputs(batch)).pooled}

    def _no_extra_options(self, extra: dict) -> None:
        if extra:
            raise UnknownNameError(f"{self.name} data option", next(iter(extra)),
                                   ["limit", "seed", "knobs", "profile", "features", "image_size", "text_len"])

    def logits(self, head: nn.Module, enc: dict) -> torch.Tensor:
        """Class logits of the head on :meth:`encode`'s output."""
        return head(enc["pooled"])

    def head_loss(self, head: nn.Module, enc: dict, batch: dict) -> dict:
        logits = self.logits(head, enc)
        return {"loss": F.cross_entropy(logits, batch["labels"]),
                "acc": (logits.argmax(-1) == batch["labels"]).float().mean()}

    def predict(self, model: TaskModel, data: TaskData, batch_size: int = 64) -> torch.Tensor:
        preds = []
        with _eval_mode(model):
            for batch in data.batches(batch_size):
                preds.append(self.logits(model.head, self.encode(model, batch)).argmax(-1))
        return torch.cat(preds)

    def _metrics(self, pred, target) -> dict:
        a = accuracy(pred, target)
        out = {"score": 100 * a["acc"], "se": 100 * a["se"], "n": a["n"]}
        if self.modality == "text":
            out["macro_f1"] = 100 * macro_f1(pred, target, self.num_classes)
        return out

    def evaluate(self, model: TaskModel, data: TaskData, batch_size: int = 64) -> dict:
        return self._metrics(self.predict(model, data, batch_size), torch.as_tensor(data.labels()))

    def chance(self, train: TaskData, data: TaskData) -> dict:
        """Always answer the majority class of ``train`` (ties: the lowest class id)."""
        majority = int(np.bincount(train.labels(), minlength=self.num_classes).argmax())
        target = torch.as_tensor(data.labels())
        return self._metrics(torch.full_like(target, majority), target)

    def text_only(self, train: TaskData) -> Callable[[TaskData], dict]:
        """The text-only baseline (:mod:`vlkit.tasks.text_only`: bag of token n-grams ->
        logistic regression, no image), fit once on ``train``; returns ``score(data) ->
        metrics`` for any split."""
        from .text_only import fit_text_only

        predict = fit_text_only([e["ids"] for e in train.examples], train.labels(), self.num_classes)
        return lambda data: self._metrics(predict([e["ids"] for e in data.examples]), torch.as_tensor(data.labels()))


@dataclass(frozen=True)
class NLVRTask(ClassifyTask):
    """shapes_nlvr: ViLT's NLVR2 pair recipe -- the statement with the left image (image
    token type 1) and with the right image (type 2, where the backbone's ``embed`` takes
    ``image_token_type_idx``), both pooled outputs into :class:`PairHead` (linear probe:
    :class:`LinearPairHead`). Subsets keep both rows of a minimal pair."""

    def load(self, split: str, *, limit: int | None = None, seed: int = 0, knobs: dict | None = None,
             profile: str | None = None, features: str = "cache", image_size: int = 128,
             text_len: int | None = None, **extra) -> TaskData:
        self._no_extra_options(extra)
        ds, seed, knobs = self.source(split, seed=seed, knobs=knobs, profile=profile)
        rows = subset_rows(len(ds), limit, seed, self.name, split, groups=ds["group"])
        sub = ds.select(rows)
        ids = token_ids(self._token_key(split, seed, knobs, "statement", rows), sub["statement"],
                        text_len or self.text_len)
        cells, where = self._cells(ds, split, rows, seed, knobs, features, image_size)
        examples = [{"ids": i, "label": int(y), "row": where[r]} for r, i, y in zip(rows, ids, sub["label"])]
        return TaskData(self.name, split, examples, Collate(cells), rows, len(ds),
                        {"classes": ds.features["label"].names})

    def make_head(self, dims: dict, linear: bool = False) -> nn.Module:
        return LinearPairHead(dims["dim"]) if linear else PairHead(dims["dim"])

    def encode(self, model: TaskModel, batch: dict) -> dict:
        out = {}
        for side, type_idx in (("left", 1), ("right", 2)):
            x = self.inputs(batch, f"image_feats_{side}")
            if model.image_types:
                x["image_token_type_idx"] = type_idx
            out[side] = model(**x).pooled
        return out

    def logits(self, head: nn.Module, enc: dict) -> torch.Tensor:
        return head(enc["left"], enc["right"])


@dataclass(frozen=True)
class RetrievalTask(TaskSpec):
    """shapes_retrieval: ITM (+ ITC for two-tower backbones) training, R@K on a fixed gallery
    (module docstring). Train examples are (image, caption) pairs, each with the hard
    negative made from that caption (``negative_of``)."""

    gallery_images: int = 100  # two-tower protocol (the 100 images x 500 captions)
    gallery_images_single: int = 20  # single-stream protocol (every pair scored: 20 x 100)
    captions_per_image: int = 5
    rerank_k: int = 16
    embed_dim: int = 256
    ks: tuple[int, ...] = (1, 5, 10)

    def load(self, split: str, *, limit: int | None = None, seed: int = 0, knobs: dict | None = None,
             profile: str | None = None, features: str = "cache", image_size: int = 128,
             text_len: int | None = None, gallery_images: int | None = None,
             captions_per_image: int | None = None, as_pairs: bool = False) -> TaskData:
        """``train``: ``limit`` images (fixed random subset), all their (caption, hard
        negative) pairs. ``val`` / ``test``: the gallery -- the first ``gallery_images``
        images (``limit`` is its alias) and their first ``captions_per_image`` captions.

        ``as_pairs=True`` (``val`` only): the split in the *training* format instead of a
        gallery -- ``limit`` images drawn exactly as the train split draws its own
        (:func:`subset_rows` under the data seed, salted with the split name) and all their
        (caption, hard negative) pairs, so :meth:`loss` scores them (the DAS search's reward
        batches). The test split is never offered in this form (nothing is tuned on it); its
        images are generated from another seed stream than val's (:mod:`vlkit.data.splits`)."""
        if as_pairs and split != "val":
            raise ValueError(f"as_pairs=True loads the val split in the training format; got split {split!r} "
                             "(train is always pairs; test is never tuned on)")
        ds, seed, knobs = self.source(split, seed=seed, knobs=knobs, profile=profile)
        n_len = text_len or self.text_len
        cpi = captions_per_image or self.captions_per_image
        pairs = split == "train" or as_pairs
        if pairs:
            rows = subset_rows(len(ds), limit, seed, self.name, split)
        else:
            g = gallery_images or limit or self.gallery_images
            rows = list(range(min(g, len(ds))))
        sub = ds.select(rows)
        caps = sub["captions"]
        if cpi < 1 or any(len(c) < cpi for c in caps):
            raise ValueError(f"captions_per_image={cpi}: some {split} rows have only "
                             f"{min(len(c) for c in caps)} captions")
        # the first cpi captions of each row (and, for train, the hard negative of each)
        cap_ids = token_ids(self._token_key(split, seed, knobs, f"captions[:{cpi}]", rows),
                            [t for c in caps for t in c[:cpi]], n_len)
        cells, where = self._cells(ds, split, rows, seed, knobs, features, image_size)
        examples = []
        if pairs:
            neg_texts = []
            for n, of in zip(sub["negatives"], sub["negative_of"]):
                by_caption = {int(j): t for t, j in zip(n, of)}
                neg_texts += [by_caption[j] for j in range(cpi)]
            neg_ids = token_ids(self._token_key(split, seed, knobs, f"negatives[:{cpi}]", rows), neg_texts, n_len)
            for i, r in enumerate(rows):
                for j in range(cpi):
                    examples.append({"ids": cap_ids[i * cpi + j], "neg_ids": neg_ids[i * cpi + j],
                                     "row": where[r], "image": r})
            meta = {}
        else:
            from vlkit.data.shapes import relevance

            rel = relevance(sub)  # (n_img * n_all_captions, n_img)
            n_all = len(caps[0])
            if any(len(c) != n_all for c in caps):
                raise ValueError("gallery rows have different caption counts")
            keep = [i * n_all + j for i in range(len(rows)) for j in range(cpi)]
            for i, r in enumerate(rows):
                for j in range(cpi):
                    examples.append({"ids": cap_ids[i * cpi + j], "row": where[r], "image": i})
            meta = {"image_rows": [where[r] for r in rows], "owner": [i for i in range(len(rows)) for _ in range(cpi)],
                    "relevant": torch.as_tensor(rel[keep]), "captions_per_image": cpi}
        return TaskData(self.name, split, examples, Collate(cells), rows, len(ds), meta)

    # -------------------------------------------------------------- model parts
    def dims(self, model: nn.Module, data: TaskData) -> dict:
        batch = data.collate(data.examples[:2])
        out = {}
        with _eval_mode(model):
            out["dim"] = int(model(**self.inputs(batch)).pooled.shape[-1])
            if _two_tower(model):
                out["image_dim"] = int(model.encode_image(image_feats=batch["image_feats"]).shape[-1])
                out["text_dim"] = int(model.encode_text(batch["input_ids"], batch["attention_mask"]).shape[-1])
        return out

    def make_head(self, dims: dict, linear: bool = False) -> nn.Module:
        """Linear either way: the ITM head is one ``Linear(D, 2)`` and the ITC projections are
        linear maps of the frozen tower features (``linear`` changes nothing here)."""
        return RetrievalHead(dims["dim"], dims.get("image_dim"), dims.get("text_dim"), self.embed_dim)

    @staticmethod
    def _fused(model: nn.Module, start: int, vision: State, text: State, vi, ti) -> torch.Tensor:
        """Pooled output of fusion units ``start:`` on vision stream rows ``vi`` of ``vision``
        and text stream rows ``ti`` of ``text`` (tower outputs of earlier passes)."""
        vmask, tmask = vision.masks.get("vision"), text.masks.get("text")
        st = State(streams={"vision": vision.streams["vision"][vi], "text": text.streams["text"][ti]},
                   masks={"vision": None if vmask is None else vmask[vi], "text": None if tmask is None else tmask[ti]},
                   extra=dict(vision.extra))
        return model.finalize(model.run_units(st, start, None)).pooled

    def encode(self, model: TaskModel, batch: dict) -> dict:
        """Pooled outputs of the positive pairs, of the hard-negative captions with their
        images, and of each caption with the previous image of the batch (in-batch negative;
        ``imgneg_valid`` is 0 where that image is the caption's own); two-tower backbones add
        the tower embeddings ``encode_image`` / ``encode_text`` for ITC."""
        bb = model.backbone
        img = batch["image_feats"]
        roll = torch.roll(torch.arange(img.shape[0]), 1)
        out = {}
        start = fusion_start(bb)
        blocks = _tower_blocks(bb, start) if start is not None else None
        if blocks is not None:
            a = bb.run_units(bb.embed(**self.inputs(batch)), 0, start)  # both towers, positive captions
            b = bb.embed(**self.inputs(batch, ids="neg_input_ids", mask="neg_attention_mask"))
            b = bb.run_units(b, *blocks["text"])  # the text tower only, on the hard negatives
            everyone = torch.arange(img.shape[0])
            out["pos"] = self._fused(bb, start, a, a, everyone, everyone)
            out["hard"] = self._fused(bb, start, a, b, everyone, everyone)
            out["imgneg"] = self._fused(bb, start, a, a, roll, everyone)
        else:
            out["pos"] = model(**self.inputs(batch)).pooled
            out["hard"] = model(**self.inputs(batch, ids="neg_input_ids", mask="neg_attention_mask")).pooled
            out["imgneg"] = model(**{**self.inputs(batch), "image_feats": img[roll]}).pooled
        if "images" in batch:
            out["imgneg_valid"] = (batch["images"][roll] != batch["images"]).float()
        else:
            out["imgneg_valid"] = torch.ones(img.shape[0])
        if model.head.contrastive:
            out["img_emb"] = bb.encode_image(image_feats=img)
            out["txt_emb"] = bb.encode_text(batch["input_ids"], batch["attention_mask"])
        return out

    def head_loss(self, head: nn.Module, enc: dict, batch: dict) -> dict:
        """ITM cross-entropy over positives (label 1), hard-negative captions and in-batch
        negative images (label 0; ALBEF's 1:2 ratio), + ITC (symmetric InfoNCE) if two-tower."""
        logits = head.itm(torch.cat([enc["pos"], enc["hard"], enc["imgneg"]]))
        b = enc["pos"].shape[0]
        target = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        weight = torch.cat([torch.ones(2 * b, device=logits.device), enc["imgneg_valid"].to(logits.device)])
        itm = (F.cross_entropy(logits, target, reduction="none") * weight).sum() / weight.sum()
        out = {"itm": itm}
        loss = itm
        if head.contrastive:
            itc = contrastive_loss(head.image_proj(enc["img_emb"]), head.text_proj(enc["txt_emb"]),
                                   head.temperature())
            out["itc"] = itc
            loss = loss + itc
        out["loss"] = loss
        return out

    # -------------------------------------------------------------- evaluation
    def score_pairs(self, model: TaskModel, data: TaskData, pairs: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """ITM ranking score of each (gallery image, caption) pair in ``pairs`` (P, 2)."""
        bb = model.backbone
        cells = data.collate.cells[data.meta["image_rows"]]
        ids, mask = pad_ids([e["ids"] for e in data.examples])
        start = fusion_start(bb)
        blocks = _tower_blocks(bb, start) if start is not None else None
        scores = []
        with _eval_mode(model):
            if blocks is not None:
                n_img, n_cap = cells.shape[0], ids.shape[0]
                c = getattr(bb, "config", None)  # a [CLS] [SEP] text beside each image (its text stream is unused)
                cls_sep = pad_ids([[getattr(c, "bos_token_id", 101), getattr(c, "eos_token_id", 102)]] * n_img)
                vis = bb.run_units(bb.embed(image_feats=cells, input_ids=cls_sep[0], attention_mask=cls_sep[1]),
                                   *blocks["vision"])
                blank = torch.zeros((n_cap, *cells.shape[1:]))
                txt = bb.run_units(bb.embed(image_feats=blank, input_ids=ids, attention_mask=mask), *blocks["text"])
                for s in range(0, len(pairs), batch_size):
                    p = pairs[s:s + batch_size]
                    scores.append(model.head.match_score(self._fused(bb, start, vis, txt, p[:, 0], p[:, 1])))
            else:
                for s in range(0, len(pairs), batch_size):
                    p = pairs[s:s + batch_size]
                    pooled = model(image_feats=cells[p[:, 0]], input_ids=ids[p[:, 1]],
                                   attention_mask=mask[p[:, 1]]).pooled
                    scores.append(model.head.match_score(pooled))
        return torch.cat(scores) if scores else torch.empty(0)

    def gallery_for(self, data: TaskData, contrastive: bool) -> TaskData:
        """The gallery a model is scored on: two-tower (contrastive) models the whole loaded
        gallery; single-stream ones its first ``gallery_images_single`` images."""
        if contrastive:
            return data
        g = self.gallery_images_single
        if len(data.rows) <= g:
            return data
        cpi = data.meta["captions_per_image"]
        n = g * cpi
        meta = {**data.meta, "image_rows": data.meta["image_rows"][:g], "owner": data.meta["owner"][:n],
                "relevant": data.meta["relevant"][:n, :g]}
        return TaskData(data.task, data.split, data.examples[:n], data.collate, data.rows[:g], data.n_source, meta)

    def evaluate(self, model: TaskModel, data: TaskData, batch_size: int = 64) -> dict:
        data = self.gallery_for(data, model.head.contrastive)
        cells = data.collate.cells[data.meta["image_rows"]]
        n_img, n_cap = cells.shape[0], len(data)
        if model.head.contrastive:
            ids, mask = pad_ids([e["ids"] for e in data.examples])
            bb = model.backbone
            with _eval_mode(model):
                im = torch.cat([model.head.embed_image(bb.encode_image(image_feats=cells[s:s + batch_size]))
                                for s in range(0, n_img, batch_size)])
                tx = torch.cat([model.head.embed_text(bb.encode_text(ids[s:s + batch_size], mask[s:s + batch_size]))
                                for s in range(0, n_cap, batch_size)])
            sim = im @ tx.t()  # (n_img, n_cap)
            k_c, k_i = min(self.rerank_k, n_cap), min(self.rerank_k, n_img)
            cand_i2t = sim.topk(k_c, dim=1).indices  # captions per image
            cand_t2i = sim.t().topk(k_i, dim=1).indices  # images per caption
            flat = torch.cat([torch.arange(n_img).repeat_interleave(k_c) * n_cap + cand_i2t.reshape(-1),
                              cand_t2i.reshape(-1) * n_cap + torch.arange(n_cap).repeat_interleave(k_i)])
            uniq = torch.unique(flat)
            pairs = torch.stack([uniq // n_cap, uniq % n_cap], 1)
            itm = self.score_pairs(model, data, pairs)
            full = torch.full((n_img * n_cap,), float("nan"))
            full[uniq] = itm
            full = full.view(n_img, n_cap)
            # below the re-ranked candidates, the rest keep their contrastive order (ALBEF puts
            # them at -100; keeping the order matters when rerank_k < K)
            low = sim - 1e4
            i2t = low.clone()
            i2t.scatter_(1, cand_i2t, full.gather(1, cand_i2t))
            t2i = low.clone()
            t2i.t().scatter_(1, cand_t2i, full.t().gather(1, cand_t2i))
            protocol = f"ITC top-{self.rerank_k} re-ranked by ITM"
        else:
            pairs = torch.cartesian_prod(torch.arange(n_img), torch.arange(n_cap))
            i2t = t2i = self.score_pairs(model, data, pairs).view(n_img, n_cap)
            protocol = "ITM on every pair"
        r = recall_at_k_relevant(i2t, t2i, data.meta["relevant"], self.ks)
        return {**self._summary(r), "protocol": protocol}

    @staticmethod
    def _summary(r: dict) -> dict:
        n_i, n_t = r.pop("n_i2t", None), r.pop("n_t2i", None)
        out = dict(r)
        out["score"] = (r["i2t_R@1"] + r["t2i_R@1"]) / 2
        if n_i and n_t:
            out["se"] = 0.5 * math.sqrt(_pct_se(r["i2t_R@1"], n_i) ** 2 + _pct_se(r["t2i_R@1"], n_t) ** 2)
            out["n"] = n_i
            out["n_captions"] = n_t
        return out

    def chance(self, train: TaskData, data: TaskData, single_stream: bool = False) -> dict:
        """Expected R@K of a random ranking on the gallery (the single-stream one if asked)."""
        data = self.gallery_for(data, not single_stream)
        rel = data.meta["relevant"]
        r = chance_recall_at_k(rel, self.ks)
        out = {**r, "score": (r["i2t_R@1"] + r["t2i_R@1"]) / 2, "n": rel.shape[1], "n_captions": rel.shape[0]}
        out["se"] = 0.0  # an exact expectation, not an estimate
        return out


_SPECS: dict[str, TaskSpec] = {
    "easyvqa": ClassifyTask("easyvqa", "easyvqa", "vl", "accuracy", "question", text_len=32, num_classes=13),
    "shapes_nlvr": NLVRTask("shapes_nlvr", "shapes_nlvr", "vl", "accuracy", "statement", text_len=40, num_classes=2),
    "shapes_retrieval": RetrievalTask("shapes_retrieval", "shapes_retrieval", "vl", "R@1 (mean of i2t, t2i)",
                                      "captions", text_len=40),
    "movie_reviews": ClassifyTask("movie_reviews", "movie_reviews", "text", "accuracy", "text", text_len=64,
                                  num_classes=2),
    "bbc_news": ClassifyTask("bbc_news", "bbc_news", "text", "accuracy", "text", text_len=128, num_classes=5),
}
TASKS: tuple[str, ...] = tuple(_SPECS)


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of task ``name``; unknown names raise with the valid ones."""
    if name not in _SPECS:
        raise UnknownNameError("task", name, TASKS)
    return _SPECS[name]


# ============================================================================ fine-tuning
def _check_method(method: str) -> None:
    from vlkit.methods.petl import METHODS

    valid = list(METHODS_EXTRA) + [m for m in METHODS if m not in METHODS_EXTRA]
    if method not in valid:
        raise UnknownNameError("method", method, valid)


def _collate_encoded(items: list[dict]) -> dict:
    """Batch of precomputed head inputs (linear probe): stack every tensor field."""
    enc = {k: torch.stack([it["enc"][k] for it in items]) for k in items[0]["enc"]}
    out = {"enc": enc}
    if "label" in items[0]:
        out["labels"] = torch.as_tensor([it["label"] for it in items], dtype=torch.long)
    return out


def _chunks(n: int, batch_size: int, min_size: int = 1) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in batches of ``batch_size``; a last batch
    smaller than ``min_size`` is merged into the one before it."""
    out = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(out) > 1 and out[-1][1] - out[-1][0] < min_size:
        out[-2:] = [(out[-2][0], out[-1][1])]
    return out


def encode_dataset(spec: TaskSpec, model: TaskModel, data: TaskData, batch_size: int = 64) -> list[dict]:
    """The head's inputs of every example of ``data`` under ``model`` (eval mode, no grad):
    what a linear probe trains on. Batches are formed in order (never of one example, which
    would leave retrieval without an in-batch negative), so the negatives are fixed."""
    retrieval = isinstance(spec, RetrievalTask)
    items: list[dict] = []
    with _eval_mode(model):
        for s, e in _chunks(len(data), batch_size, 2 if retrieval else 1):
            chunk = data.examples[s:e]
            batch = data.collate(chunk)
            if retrieval:
                batch["images"] = torch.as_tensor([x["image"] for x in chunk])
            enc = spec.encode(model, batch)
            for j, x in enumerate(chunk):
                item = {"enc": {k: v[j].detach().clone() for k, v in enc.items()}}
                if "label" in x:
                    item["label"] = int(x["label"])
                items.append(item)
    return items


def _with_images(collate: Callable[[list], dict]) -> Callable[[list], dict]:
    """Retrieval training batches also carry each example's source image (in-batch negatives
    that are the caption's own image are masked out)."""
    def run(examples: list[dict]) -> dict:
        batch = collate(examples)
        batch["images"] = torch.as_tensor([e["image"] for e in examples])
        return batch

    return run


def training_collate(spec: TaskSpec, data: TaskData) -> Callable[[list], dict]:
    """The collation of ``data`` for training with ``spec``'s loss: the split's own, and for
    retrieval also each pair's image id (see :func:`_with_images`). The one place :func:`finetune`
    and the method studies (DAS's search) get their training batches from."""
    return _with_images(data.collate) if isinstance(spec, RetrievalTask) else data.collate


def finetune(task: str | TaskSpec, backbone: str | nn.Module, method: str = "full", *,
             data: dict[str, TaskData] | None = None, train_config=None, profile: str | None = None,
             limit: dict | None = None, method_options: dict | None = None,
             eval_splits: Sequence[str] = ("val", "test"), weights: str | None = None,
             overrides: dict | None = None, seed: int = 0, features: str = "cache",
             run_dir: str | None = None, eval_batch_size: int = 64, head_lr_mult: float | None = None) -> dict:
    """Tune ``backbone`` on ``task`` with ``method`` and evaluate.

    ``backbone``: a preset name (built with ``weights`` and ``overrides``) or a protocol
    backbone (changed in place; pass a copy to keep it). ``method``: ``"full"``,
    ``"linear_probe"`` or a :data:`vlkit.methods.petl.METHODS` name (``method_options`` go to
    :func:`vlkit.methods.petl.apply`). ``data``: ``{split: TaskData}``; missing splits are
    loaded with the profile's data knobs (``profile``), ``limit`` (``{split: rows}``) and
    ``features``. ``train_config``: a :class:`vlkit.train.TrainConfig` (default: 1 epoch,
    batch 32, lr 1e-4 for the backbone methods, 1e-3 for a linear probe). The head is
    initialised under ``seed``; ``head_lr_mult``: the head's learning rate is the config's
    times this (ViLT trains its task heads at 10x; ``None``: the same lr).

    Returns ``{"val": metrics, "test": metrics, "history": [per-step records], "trainable":
    {"backbone", "head"}, "train_seconds", "eval_seconds", "steps", "n_train", "model"}``.
    """
    from vlkit.methods.petl import apply
    from vlkit.train import TrainConfig, fit

    spec = get_task(task) if isinstance(task, str) else task
    _check_method(method)
    limit = dict(limit or {})
    data = dict(data or {})
    for split in ("train", *eval_splits):
        if split not in data:
            data[split] = spec.load(split, limit=limit.get(split), profile=profile, features=features)
    if isinstance(backbone, str):
        from vlkit.models import build

        kw = dict(overrides or {})
        if weights is not None:
            kw["weights"] = weights
        backbone = build(backbone, **kw)
    linear = method == "linear_probe"
    dims = spec.dims(backbone, data["train"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = spec.make_head(dims, linear=linear)
    if linear:
        for p in backbone.parameters():
            p.requires_grad_(False)
        tuned = backbone
    else:
        tuned = apply(method, backbone, **(method_options or {}))
    model = TaskModel(tuned, head, method)
    cfg = train_config or TrainConfig(epochs=1, batch_size=32, lr=1e-3 if linear else 1e-4, seed=seed,
                                      progress=False)
    train = data["train"]
    t0 = time.perf_counter()
    if linear:
        items = encode_dataset(spec, model, train, eval_batch_size)
        result = fit(model.head, lambda h, b: spec.head_loss(h, b["enc"], b), items, config=cfg,
                     collate_fn=_collate_encoded, run_dir=run_dir)
    else:
        collate = training_collate(spec, train)
        groups = None
        if head_lr_mult is not None:
            from vlkit.train import default_param_groups

            groups = default_param_groups(model.backbone, cfg.weight_decay)
            groups += [{**g, "lr": cfg.lr * float(head_lr_mult)} for g in default_param_groups(model.head,
                                                                                              cfg.weight_decay)]
        result = fit(model, spec.loss, train, config=cfg, collate_fn=collate, run_dir=run_dir, param_groups=groups,
                     params_hash=f"{spec.name}:{getattr(_raw_backbone(backbone), 'preset', '?')}:{method}")
    t1 = time.perf_counter()
    out = {split: spec.evaluate(model, data[split], eval_batch_size) for split in eval_splits}
    out.update(history=result.history, trainable=model.trainable(), train_seconds=t1 - t0,
               eval_seconds=time.perf_counter() - t1, steps=result.step, n_train=len(train), model=model)
    return out
