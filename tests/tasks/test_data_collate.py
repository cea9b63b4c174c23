"""Collation: padding, cell gathering, pairs and negatives; token and cell caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from vlkit.tasks.data import CellStore, Collate, clear_token_cache, pad_ids, token_ids, tokenize


def test_pad_ids_hand_example():
    ids, mask = pad_ids([[101, 7, 102], [101, 102], [101, 5, 6, 102]])
    assert ids.tolist() == [[101, 7, 102, 0], [101, 102, 0, 0], [101, 5, 6, 102]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
    with pytest.raises(ValueError, match="empty batch"):
        pad_ids([])


def _store(n=5, cells=4, dim=6, pairs=False):
    shape = (n, 2, cells, dim) if pairs else (n, cells, dim)
    x = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    return CellStore(x.to(torch.float16))


def test_collate_single_images_labels_and_dynamic_padding():
    store = _store()
    batch = Collate(store)([{"ids": [101, 9, 102], "row": 3, "label": 2}, {"ids": [101, 102], "row": 0, "label": 0}])
    assert set(batch) == {"input_ids", "attention_mask", "image_feats", "labels"}
    assert batch["input_ids"].shape == (2, 3)  # the longest member, not a fixed 40
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["image_feats"].shape == (2, 4, 6) and batch["image_feats"].dtype == torch.float32
    assert torch.equal(batch["image_feats"][0], store.cells[3].float())
    assert torch.equal(batch["image_feats"][1], store.cells[0].float())
    assert batch["labels"].tolist() == [2, 0]


def test_collate_pairs_and_negatives_and_text_only():
    store = _store(pairs=True)
    batch = Collate(store)([{"ids": [101, 4, 102], "row": 1, "label": 1}])
    assert torch.equal(batch["image_feats_left"][0], store.cells[1, 0].float())
    assert torch.equal(batch["image_feats_right"][0], store.cells[1, 1].float())
    assert "image_feats" not in batch
    neg = Collate(_store())([{"ids": [101, 4, 102], "neg_ids": [101, 5, 6, 7, 102], "row": 0}])
    assert neg["neg_input_ids"].tolist() == [[101, 5, 6, 7, 102]] and "labels" not in neg
    text = Collate(None)([{"ids": [101, 3, 102], "label": 1}])
    assert set(text) == {"input_ids", "attention_mask", "labels"}


def test_cell_store_index_and_bounds():
    store = CellStore(_store().cells, index=torch.tensor([4, 4, 0]))
    assert len(store) == 3
    assert torch.equal(store[[0, 1]][0], store[[0, 1]][1])
    with pytest.raises(IndexError, match=r"\[0, 3\)"):
        store[[3]]
    with pytest.raises(ValueError, match="cells must be"):
        CellStore(torch.zeros(3, 4))


def test_tokenize_special_tokens_truncation_and_cache():
    ids = tokenize(["a red circle above a blue square."], max_len=40)[0]
    assert ids[0] == 101 and ids[-1] == 102 and len(ids) > 4
    short = tokenize(["a red circle above a blue square."], max_len=5)[0]
    assert len(short) == 5 and short[-1] == 102 and short[:4] == ids[:4]
    with pytest.raises(ValueError, match="max_len"):
        tokenize(["x"], max_len=1)
    clear_token_cache()
    first = token_ids(("test", "col"), ["one text", "two texts"], 16)
    assert token_ids(("test", "col"), ["one text", "two texts"], 16) is first  # from memory
    assert token_ids(("test", "col"), ["one text", "two texts"], 8) is not first  # another max_len


def _png(colour) -> dict:
    import io

    buf = io.BytesIO()
    PILImage.new("RGB", (64, 64), colour).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def test_cell_store_compute_shares_images_and_matches_image_features():
    from vlkit.data.features import image_features

    ds = Dataset.from_dict({"image": [_png((200, 0, 0)), _png((0, 0, 200)), _png((200, 0, 0))],
                            "image_id": [7, 3, 7]},
                           features=Features({"image": Image(), "image_id": Value("int32")}))
    store = CellStore.compute("easyvqa", ds, [0, 1, 2], size=64)
    assert store.cells.shape == (2, 4, 1280)  # image 7 computed once
    assert torch.equal(store[[0]], store[[2]]) and not torch.equal(store[[0]], store[[1]])
    direct = image_features([_png((0, 0, 200))], 64)  # float32; the store keeps float16 (ReLU6 range: < 0.004)
    torch.testing.assert_close(store[[1]], direct, atol=4e-3, rtol=0)


def test_cell_store_from_cache_equals_compute(tmp_path, monkeypatch):
    """The on-disk features cache and on-the-spot cells give the same values row for row."""
    monkeypatch.setenv("VLKIT_DATA_DIR", str(tmp_path))
    from vlkit.data import load

    knobs = {"n_train": 2, "n_val": 3, "n_test": 2}
    ds = load("shapes_retrieval", "val", **knobs)
    cached = CellStore.from_cache("shapes_retrieval", "val", ds, size=64, **knobs)
    computed = CellStore.compute("shapes_retrieval", ds, [2, 0], size=64)
    assert torch.equal(cached[[2, 0]], computed[[0, 1]])
