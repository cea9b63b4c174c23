"""Model inputs for the tasks: token ids cached once per dataset, image cells cached once per
image, and the collation that turns a list of examples into a batch dict.

Training a mini backbone is cheap only if nothing is recomputed per epoch. Two caches do it:

* **text**: :func:`token_ids` tokenises a column once with MiniLM's WordPiece tokenizer
  (``[CLS] ... [SEP]``, truncated to ``max_len``, no padding) and keeps the ids in memory,
  keyed by the dataset's registry key, split, column and ``max_len``;
* **images**: a :class:`CellStore` maps an example to its EfficientNet-Lite0 cells --
  either the on-disk cache of :func:`vlkit.data.features.cached_features` (memory-mapped,
  float16; the DVC ``features`` stage fills it) or, for a handful of rows (the ``ci``
  profile, tests), cells computed on the spot with
  :func:`vlkit.data.features.image_features` (the same call, so the same values).

Examples are small dicts (``ids``: token ids, ``row``: cell-store row, ``label``, ...);
:class:`Collate` pads the ids of a batch to its longest member (dynamic padding: short
easy-VQA questions do not pay for 40 positions), gathers the cells and returns tensors::

    {"input_ids": (B, L) long, "attention_mask": (B, L) long,   # 1 = token, 0 = padding
     "image_feats": (B, n, 1280) float32,                         # one image per example
     "image_feats_left" / "image_feats_right": (B, n, 1280),      # NLVR pairs
     "neg_input_ids" / "neg_attention_mask": (B, L'),             # retrieval hard negatives
     "labels": (B,) long}

Padding follows BERT: pad id 0 on the right, mask 0 there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["DEFAULT_TEXT_LEN", "tokenize", "token_ids", "clear_token_cache", "pad_ids", "CellStore", "Collate",
           "TaskData"]

DEFAULT_TEXT_LEN = 40  # the mini presets' text_len
PAD_ID = 0  # MiniLM / BERT [PAD]

_TOKEN_CACHE: dict[tuple, list[list[int]]] = {}


def tokenize(texts: Sequence[str], max_len: int = DEFAULT_TEXT_LEN, tokenizer=None) -> list[list[int]]:
    """WordPiece ids of each text: ``[CLS] tokens [SEP]``, at most ``max_len`` ids, no
    padding (MiniLM's tokenizer unless ``tokenizer`` is given)."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 ([CLS] and [SEP]), got {max_len!r}")
    if tokenizer is None:
        from vlkit.models.text import minilm_tokenizer

        tokenizer = minilm_tokenizer()
    texts = [str(t) for t in texts]
    if not texts:
        return []
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding=False, add_special_tokens=True)
    return [list(map(int, ids)) for ids in enc["input_ids"]]


def token_ids(key: tuple, texts: Sequence[str], max_len: int = DEFAULT_TEXT_LEN) -> list[list[int]]:
    """:func:`tokenize` of ``texts``, computed once per ``(key, max_len)`` and then read from
    memory. ``key`` names the column (e.g. ``(dataset registry key, split, "question")``); the
    caller guarantees the same key always means the same texts (their count is checked)."""
    full = (*tuple(key), int(max_len))
    hit = _TOKEN_CACHE.get(full)
    if hit is not None and len(hit) == len(texts):
        return hit
    ids = tokenize(texts, max_len)
    _TOKEN_CACHE[full] = ids
    return ids


def clear_token_cache() -> None:
    _TOKEN_CACHE.clear()


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs`` to the longest one: ``(input_ids, attention_mask)``, both (B, L) long."""
    if len(seqs) == 0:
        raise ValueError("cannot pad an empty batch")
    n = max(len(s) for s in seqs)
    if n == 0:
        raise ValueError("every sequence in the batch is empty")
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


@functools.lru_cache(maxsize=1)
def _cnn():
    """The frozen EfficientNet-Lite0, built once per process for :meth:`CellStore.compute`."""
    from vlkit.models.cnn import efficientnet_lite0

    return efficientnet_lite0()


class CellStore:
    """Image cells by row: ``store[rows]`` -> float32 ``(len(rows), [2,] n, 1280)``.

    ``cells``: a tensor whose first axis is indexed by ``index[row]`` (``index=None``: the
    identity). Built by :meth:`from_cache` (the features cache of a whole split) or
    :meth:`compute` (cells of the given dataset rows only, computed now).
    """

    def __init__(self, cells: torch.Tensor, index: torch.Tensor | None = None):
        if not isinstance(cells, torch.Tensor) or cells.dim() not in (3, 4):
            raise ValueError(f"cells must be an (N, n, D) or (N, 2, n, D) tensor, got "
                             f"{getattr(cells, 'shape', type(cells).__name__)}")
        self.cells = cells
        self.index = None if index is None else torch.as_tensor(index, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else self.cells.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.cells.shape[1:])

    def __getitem__(self, rows) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise IndexError(f"cell rows must lie in [0, {len(self)}), got [{int(rows.min())}, {int(rows.max())}]")
        src = self.index[rows] if self.index is not None else rows
        return self.cells[src].float()

    @classmethod
    def from_cache(cls, dataset: str, split: str, ds, *, size: int = 128, seed: int = 0, progress: bool = False,
                   **knobs) -> "CellStore":
        """Row ``i`` of ``ds`` (split ``split`` of ``dataset`` under ``seed`` / ``knobs``) -> its
        cells in the features cache (computed and stored on first use)."""
        from vlkit.data.features import cached_features, feature_rows

        cells = cached_features(dataset, split, size, seed=seed, progress=progress, **knobs)
        return cls(cells, feature_rows(dataset, ds))

    @classmethod
    def compute(cls, dataset: str, ds, rows: Sequence[int] | None = None, *, size: int = 128,
                batch_size: int = 32) -> "CellStore":
        """Cells of rows ``rows`` of ``ds`` (all rows if ``None``) computed now with the frozen
        CNN; store row ``i`` is dataset row ``rows[i]``. Images shared by several rows
        (easy-VQA questions about one image, keyed by ``image_id``) are computed once."""
        from datasets import Image

        from vlkit.data.features import IMAGE_COLUMNS, image_features

        cols = IMAGE_COLUMNS.get(dataset)
        if cols is None:
            from vlkit.models.protocol import UnknownNameError

            raise UnknownNameError("dataset with images", dataset, IMAGE_COLUMNS)
        rows = list(range(len(ds))) if rows is None else [int(r) for r in rows]
        keys = list(ds.select(rows)["image_id"]) if "image_id" in ds.column_names and len(cols) == 1 else rows
        uniq: dict[Any, int] = {}
        first = []
        for r, k in zip(rows, keys):
            if k not in uniq:
                uniq[k] = len(first)
                first.append(r)
        sub = ds.select(first).select_columns(list(cols))
        for c in cols:
            sub = sub.cast_column(c, Image(decode=False))
        parts = [image_features(sub[c], size, batch_size, cnn=_cnn()) for c in cols]
        cells = parts[0] if len(parts) == 1 else torch.stack(parts, dim=1)
        return cls(cells.to(torch.float16), torch.as_tensor([uniq[k] for k in keys], dtype=torch.long))


@dataclasses.dataclass
class Collate:
    """Examples -> batch dict (module docstring). ``cells``: the split's :class:`CellStore`
    (``None`` for text-only tasks); an example's ``row`` indexes it. A store of pairs
    (``(N, 2, n, D)``) gives ``image_feats_left`` / ``image_feats_right``."""

    cells: CellStore | None = None
    pad_id: int = PAD_ID

    def __call__(self, examples: Sequence[dict]) -> dict:
        if len(examples) == 0:
            raise ValueError("cannot collate an empty batch")
        batch: dict[str, torch.Tensor] = {}
        batch["input_ids"], batch["attention_mask"] = pad_ids([e["ids"] for e in examples], self.pad_id)
        if "neg_ids" in examples[0]:
            batch["neg_input_ids"], batch["neg_attention_mask"] = pad_ids([e["neg_ids"] for e in examples],
                                                                          self.pad_id)
        if self.cells is not None:
            feats = self.cells[[e["row"] for e in examples]]
            if feats.dim() == 4:
                batch["image_feats_left"], batch["image_feats_right"] = feats[:, 0], feats[:, 1]
            else:
                batch["image_feats"] = feats
        if "label" in examples[0]:
            batch["labels"] = torch.as_tensor([int(e["label"]) for e in examples], dtype=torch.long)
        return batch


@dataclasses.dataclass
class TaskData:
    """One split of a task, ready for :func:`vlkit.train.fit` and the task's ``evaluate``.

    ``examples``: the example dicts (``fit``'s ``train_data``); ``collate``: their
    :class:`Collate`; ``rows``: the dataset rows they come from (a subset is stated in the
    tables); ``meta``: task-specific extras (the retrieval gallery, class names, ...).
    """

    task: str
    split: str
    examples: list[dict]
    collate: Collate
    rows: list[int]
    n_source: int
    meta: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]

    def batches(self, batch_size: int = 64):
        """Collated batches in order (evaluation)."""
        for s in range(0, len(self.examples), batch_size):
            yield self.collate(self.examples[s:s + batch_size])

    def labels(self) -> np.ndarray:
        return np.asarray([int(e["label"]) for e in self.examples])
