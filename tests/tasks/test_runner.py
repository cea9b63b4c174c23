"""Task specs and fine-tuning: which parameters train, R@K on hand-made galleries, NLVR pair
order, the fused two-tower scoring path, determinism and the baselines settings."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from vlkit.models import build
from vlkit.models.protocol import BackboneOutput, UnknownNameError
from vlkit.tasks import metrics
from vlkit.tasks.data import CellStore, Collate, TaskData
from vlkit.tasks.runner import (RetrievalHead, TaskModel, chance_recall_at_k, finetune, get_task, recall_at_k_relevant,
                                subset_rows)
from vlkit.train import TrainConfig

TOK = 103  # first ordinary token id of the tiny configs (0 pad, 101 [CLS], 102 [SEP])
TINY_TEXT = dict(pretrained_text=False, vocab_size=200, max_positions=40, image_size=64)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def vilt():
    return build("vilt-mini", dim=32, heads=4, ffn_dim=64, layers=1, **TINY_TEXT)


@pytest.fixture(scope="module")
def meter():
    return build("meter-mini", fusion_init="random", text_dim=32, text_heads=4, text_ffn_dim=64, vision_dim=16,
                 vision_heads=2, vision_ffn_dim=32, vision_layers=1, text_layers=1, fusion_layers=2, hidden_dim=32,
                 fusion_heads=4, fusion_ffn_dim=64, **TINY_TEXT)


@pytest.fixture(scope="module")
def xvlm():
    return build("xvlm-mini", text_dim=32, text_heads=4, text_ffn_dim=64, vision_dim=16, vision_heads=2,
                 vision_ffn_dim=32, vision_layers=1, text_layers=1, fusion_layers=2, embed_dim=8, **TINY_TEXT)


def _examples(n, seed=0, classes=13, pairs=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 6, (1,), generator=g))
        ids = [101] + torch.randint(TOK, 200, (length,), generator=g).tolist() + [102]
        out.append({"ids": ids, "row": i, "label": int(torch.randint(0, classes, (1,), generator=g))})
    return out


def _vqa_data(n=12, seed=0, split="train"):
    g = torch.Generator().manual_seed(100 + seed)
    cells = CellStore((6 * torch.rand(n, 4, 1280, generator=g)).to(torch.float16))
    return TaskData("easyvqa", split, _examples(n, seed), Collate(cells), list(range(n)), n)


def _nlvr_data(n=8, seed=0):
    g = torch.Generator().manual_seed(200 + seed)
    cells = CellStore((6 * torch.rand(n, 2, 4, 1280, generator=g)).to(torch.float16))
    return TaskData("shapes_nlvr", "train", _examples(n, seed, classes=2), Collate(cells), list(range(n)), n)


def _params(m: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _changed(before: dict, m: nn.Module) -> set:
    return {k for k, v in m.named_parameters() if not torch.equal(before[k], v)}


CFG = TrainConfig(steps=3, batch_size=4, lr=1e-2, progress=False)


# ---------------------------------------------------------------------------- registry and helpers
def test_unknown_task_and_method_list_valid_names(vilt):
    with pytest.raises(UnknownNameError, match="easyvqa.*shapes_nlvr.*shapes_retrieval.*movie_reviews.*bbc_news"):
        get_task("vqa2")
    data = {s: _vqa_data(8, split=s) for s in ("train", "val", "test")}
    with pytest.raises(UnknownNameError, match="linear_probe"):
        finetune("easyvqa", copy.deepcopy(vilt), "frozen", data=data, train_config=CFG)


def test_subset_rows_fixed_sorted_and_keeps_groups():
    a = subset_rows(100, 10, 0, "t", "train")
    assert a == subset_rows(100, 10, 0, "t", "train") and a == sorted(a) and len(set(a)) == 10
    assert a != subset_rows(100, 10, 0, "t", "val")  # another stream per split
    assert subset_rows(5, None, 0) == subset_rows(5, 9, 0) == [0, 1, 2, 3, 4]
    groups = [0, 1, 2, 3, 4, 5] * 2  # rows i and i + 6 form a group
    rows = subset_rows(12, 6, 0, "g", groups=groups)
    assert len(rows) == 6 and all((r + 6) % 12 in rows for r in rows)


def test_chance_recall_hand_example():
    # 2 images x 4 captions (2 each), one true image per caption: a random ranking of 4
    # captions hits one of 2 relevant at K=1 with p = 1/2; K=2: 1 - C(2,2)/C(4,2) = 5/6;
    # captions: 1 of 2 images at K=1 -> 1/2, K=2 -> 1
    rel = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool)
    r = chance_recall_at_k(rel, ks=(1, 2))
    assert r["i2t_R@1"] == pytest.approx(50.0) and r["i2t_R@2"] == pytest.approx(500 / 6)
    assert r["t2i_R@1"] == pytest.approx(50.0) and r["t2i_R@2"] == pytest.approx(100.0)


def test_recall_with_one_true_image_equals_the_standard_protocol_and_counts_extra_positives():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.5, 0.6, 0.2, 0.3]])
    owner = [0, 0, 1, 1]
    rel = torch.zeros(4, 2, dtype=torch.bool)
    rel[torch.arange(4), torch.tensor(owner)] = True
    mine = recall_at_k_relevant(scores, scores, rel, ks=(1, 2, 3))
    ref = metrics.recall_at_k(scores, owner, ks=(1, 2, 3))
    assert all(mine[k] == pytest.approx(v) for k, v in ref.items())
    # caption 2 (image 1's) is also true of image 0, which it ranks first: now a hit at 1
    rel[2, 0] = True
    assert recall_at_k_relevant(scores, scores, rel, ks=(1,))["t2i_R@1"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------- which parameters train
def test_linear_probe_trains_the_head_only(vilt):
    data = {s: _vqa_data(8, seed=i, split=s) for i, s in enumerate(("train", "val", "test"))}
    bb = copy.deepcopy(vilt)
    before = _params(bb)
    res = finetune("easyvqa", bb, "linear_probe", data=data, train_config=CFG)
    model = res["model"]
    assert res["trainable"]["backbone"] == 0 and res["trainable"]["head"] == 32 * 13 + 13  # Linear(32, 13)
    assert not _changed(before, bb)
    assert [type(m).__name__ for m in model.head.modules() if isinstance(m, nn.Linear)] == ["Linear"]
    assert res["steps"] == 3 and set(res["test"]) >= {"score", "se", "n"} and res["test"]["n"] == 8


def test_full_and_bitfit_train_the_methods_parameters_and_the_head(vilt):
    data = {s: _vqa_data(8, seed=i, split=s) for i, s in enumerate(("train", "val", "test"))}
    bb = copy.deepcopy(vilt)
    before = _params(bb)
    res = finetune("easyvqa", bb, "full", data=data, train_config=CFG, eval_splits=("test",))
    assert res["trainable"]["backbone"] == sum(p.numel() for p in bb.parameters())
    changed = _changed(before, bb)
    assert any(k.startswith("blocks.En0.") for k in changed) and "vision_embeddings.proj.weight" in changed
    bb = copy.deepcopy(vilt)
    before = _params(bb)
    res = finetune("easyvqa", bb, "bitfit", data=data, train_config=CFG, eval_splits=("test",))
    changed = _changed(before, bb)
    assert changed and all(k.endswith(".bias") for k in changed)
    head_before = get_task("easyvqa").make_head({"dim": 32})
    assert res["trainable"]["head"] == sum(p.numel() for p in head_before.parameters())


def test_head_learning_rate_multiple(vilt):
    """The head's lr is lr x head_lr_mult (ViLT's 10x): with a constant schedule and a tiny
    base lr the backbone barely moves while the head moves about as far as at 10x."""
    data = {s: _vqa_data(8, seed=i, split=s) for i, s in enumerate(("train", "val", "test"))}
    cfg = TrainConfig(steps=1, batch_size=8, lr=1e-3, progress=False)
    r1 = finetune("easyvqa", copy.deepcopy(vilt), "full", data=data, train_config=cfg, eval_splits=("test",))
    r2 = finetune("easyvqa", copy.deepcopy(vilt), "full", data=data, train_config=cfg, eval_splits=("test",),
                  head_lr_mult=10.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # finetune's head seed
        h0 = get_task("easyvqa").make_head({"dim": 32})
    d1 = (r1["model"].head.net[0].weight - h0.net[0].weight).abs().max().item()
    d2 = (r2["model"].head.net[0].weight - h0.net[0].weight).abs().max().item()
    # AdamW's first step moves each weight by ~lr (sign of the gradient)
    assert d1 == pytest.approx(1e-3, rel=0.05) and d2 == pytest.approx(1e-2, rel=0.05)


# ---------------------------------------------------------------------------- NLVR
def test_nlvr_pair_order_and_image_types_matter(vilt, meter, xvlm):
    spec = get_task("shapes_nlvr")
    data = _nlvr_data(4)
    batch = data.collate(data.examples)
    same = dict(batch, image_feats_right=batch["image_feats_left"])
    swapped = dict(batch, image_feats_left=batch["image_feats_right"], image_feats_right=batch["image_feats_left"])
    for bb, typed in ((vilt, True), (meter, True), (xvlm, False)):
        torch.manual_seed(0)
        model = TaskModel(bb, spec.make_head({"dim": bb(**bb.dummy_inputs(1)).pooled.shape[-1]}))
        assert model.image_types is typed
        model.eval()
        with torch.no_grad():
            enc = spec.encode(model, same)
            # the same image as left and as right: equal inputs except the image token type
            assert torch.allclose(enc["left"], enc["right"]) is (not typed)
            a = spec.encode(model, batch)
            b = spec.encode(model, swapped)
            if not typed:  # without image types, swapping the images swaps the pooled outputs
                torch.testing.assert_close(a["left"], b["right"], atol=1e-5, rtol=1e-4)
            # ... and the pair head reads them in order, so the prediction changes
            assert not torch.allclose(model.head(a["left"], a["right"]), model.head(b["left"], b["right"]))


# ---------------------------------------------------------------------------- retrieval: hand-made models
class ScoredPairs(nn.Module):
    """A stand-in backbone whose pooled output for (image i, caption j) is ``[S[i, j], 0]``:
    image i has cells filled with i, caption j is ``[CLS] TOK+j [SEP]``. With ``emb`` it is a
    two-tower model: ``encode_image`` / ``encode_text`` return the given embeddings."""

    def __init__(self, scores, img_emb=None, txt_emb=None):
        super().__init__()
        self.S, self.img_emb, self.txt_emb = scores, img_emb, txt_emb
        self.dummy = nn.Parameter(torch.zeros(1))
        if img_emb is not None:
            self.encode_image = lambda image_feats: self.img_emb[image_feats[:, 0, 0].round().long()]
            self.encode_text = lambda ids, mask=None: self.txt_emb[ids[:, 1] - TOK]

    def forward(self, input_ids, attention_mask=None, image_feats=None, **_):
        s = self.S[image_feats[:, 0, 0].round().long(), input_ids[:, 1] - TOK]
        return BackboneOutput(pooled=torch.stack([s, torch.zeros_like(s)], -1), sequences={})


def _gallery(n_img, cpi, relevant=None):
    n_cap = n_img * cpi
    cells = CellStore(torch.arange(n_img, dtype=torch.float16)[:, None, None].expand(n_img, 1, 3).clone())
    owner = [i for i in range(n_img) for _ in range(cpi)]
    if relevant is None:
        relevant = torch.zeros(n_cap, n_img, dtype=torch.bool)
        relevant[torch.arange(n_cap), torch.tensor(owner)] = True
    ex = [{"ids": [101, TOK + j, 102], "row": owner[j], "image": owner[j]} for j in range(n_cap)]
    meta = {"image_rows": list(range(n_img)), "owner": owner, "relevant": relevant, "captions_per_image": cpi}
    return TaskData("shapes_retrieval", "test", ex, Collate(cells), list(range(n_img)), n_img, meta)


def _itm_head(dim=2, image_dim=None, text_dim=None):
    head = RetrievalHead(dim, image_dim, text_dim, embed_dim=image_dim or 8)
    with torch.no_grad():  # logit(match) - logit(no match) = pooled[0] = S[i, j]
        head.itm.fc.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
        head.itm.fc.bias.zero_()
        if head.contrastive:
            head.image_proj.weight.copy_(torch.eye(image_dim))
            head.image_proj.bias.zero_()
            head.text_proj.weight.copy_(torch.eye(text_dim))
            head.text_proj.bias.zero_()
    return head


def test_single_stream_recall_hand_example():
    """Every pair scored by ITM: the metrics test's example, then with an extra true image."""
    spec = dataclasses.replace(get_task("shapes_retrieval"), ks=(1, 2, 3), gallery_images_single=2)
    S = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.5, 0.6, 0.2, 0.3]])
    model = TaskModel(ScoredPairs(S), _itm_head())
    r = spec.evaluate(model, _gallery(2, 2))
    assert r["i2t_R@1"] == 50.0 and r["i2t_R@2"] == 50.0 and r["i2t_R@3"] == 100.0
    assert r["t2i_R@1"] == 75.0 and r["t2i_R@2"] == 100.0
    assert r["score"] == 62.5 and r["n"] == 2 and r["n_captions"] == 4
    assert r["se"] == pytest.approx(0.5 * ((50 * 50 / 2) + (75 * 25 / 4)) ** 0.5)
    rel = torch.tensor([[1, 0], [1, 0], [1, 1], [0, 1]], dtype=torch.bool)  # caption 2 is also true of image 0
    assert spec.evaluate(model, _gallery(2, 2, rel))["t2i_R@1"] == 100.0


def test_two_tower_recall_reranks_only_the_contrastive_top_k():
    """3 images x 6 captions, k = 2 (worked by hand in the comments)."""
    spec = dataclasses.replace(get_task("shapes_retrieval"), ks=(1, 2), rerank_k=2)
    img = torch.eye(3)
    # caption embeddings: cosine with image i is the i-th component over the norm
    txt = torch.tensor([[1, .1, 0], [0, 1, .1], [.6, .8, 0], [.1, .6, .8], [0, .1, 1], [.8, 0, .6]])
    # ITC top-2 captions: img0 {c0, c5}, img1 {c1, c2}, img2 {c4, c3};
    # ITC top-2 images:   c0 {0, 1}, c1 {1, 2}, c2 {1, 0}, c3 {2, 1}, c4 {2, 1}, c5 {0, 2}
    S = torch.tensor([[0.2, 0.9, 0.1, 0.0, 0.0, 0.5],
                      [0.3, 0.1, 0.4, 0.7, 0.2, 0.0],
                      [0.0, 0.8, 0.0, 0.1, 0.6, 0.9]])
    model = TaskModel(ScoredPairs(S, img, txt), _itm_head(2, 3, 3))
    r = spec.evaluate(model, _gallery(3, 2))
    # i2t: img0 ranks c5 (0.5) over c0 (0.2) -- c1's 0.9 is not a candidate -> miss@1, hit@2;
    #      img1: c2 (0.4) > c1 -> hit; img2: c4 (0.6) > c3 -> hit
    assert r["i2t_R@1"] == pytest.approx(200 / 3) and r["i2t_R@2"] == 100.0
    # t2i: c0 -> img1 (0.3) before img0 (0.2): miss@1, hit@2; c1 -> img2 (0.8), img1, then img0
    #      (not a candidate, rank 3): miss@2; c2, c3, c4, c5: their own image first
    assert r["t2i_R@1"] == pytest.approx(400 / 6) and r["t2i_R@2"] == pytest.approx(500 / 6)
    assert r["protocol"].startswith("ITC top-2")
    # k = 1: below the one re-ranked candidate the contrastive order goes on -- img1's ITC
    # order is c1 (image 0's), c2 (its own): a hit at 2 (a gallery-order fallback would give c0)
    r1 = dataclasses.replace(spec, rerank_k=1).evaluate(model, _gallery(3, 2))
    assert r1["i2t_R@1"] == pytest.approx(200 / 3) and r1["i2t_R@2"] == 100.0


class Opaque(nn.Module):
    """Hides the protocol (not a Backbone): the runner falls back to a full forward per pair."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **x):
        return self.inner(**x)

    def encode_image(self, **kw):
        return self.inner.encode_image(**kw)

    def encode_text(self, *a):
        return self.inner.encode_text(*a)


@pytest.mark.parametrize("name", ["meter", "xvlm"])
def test_two_tower_fused_scoring_equals_full_forwards(name, request):
    """Towers once per image / caption + fusion per pair == a full forward of every pair,
    at evaluation (score_pairs) and in the training encoder (pos / hard / in-batch negatives)."""
    bb = request.getfixturevalue(name)
    spec = get_task("shapes_retrieval")
    g = torch.Generator().manual_seed(0)
    data = _gallery(3, 2)
    data.collate.cells = CellStore((6 * torch.rand(3, 4, 1280, generator=g)).to(torch.float16))
    ex = data.examples
    for i, e in enumerate(ex):  # captions of different lengths, so padding is exercised
        e["ids"] = [101] + list(range(TOK, TOK + 1 + i % 3)) + [102]
    dims = {"dim": bb(**bb.dummy_inputs(1)).pooled.shape[-1]}
    torch.manual_seed(0)
    head = spec.make_head(dims)
    fast, slow = TaskModel(bb, head), TaskModel(Opaque(bb), head)
    pairs = torch.cartesian_prod(torch.arange(3), torch.arange(6))
    torch.testing.assert_close(spec.score_pairs(fast, data, pairs), spec.score_pairs(slow, data, pairs),
                               atol=1e-5, rtol=1e-4)
    train = [{"ids": e["ids"], "neg_ids": ex[-1 - i]["ids"], "row": e["row"], "image": e["row"]}
             for i, e in enumerate(ex)]
    batch = Collate(data.collate.cells)(train)
    batch["images"] = torch.tensor([e["image"] for e in train])
    bb.eval()
    with torch.no_grad():
        a, b = spec.encode(fast, batch), spec.encode(slow, batch)
    for k in ("pos", "hard", "imgneg", "imgneg_valid"):
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------- determinism and chance
def test_evaluate_is_deterministic_and_batch_size_free(vilt):
    spec = get_task("easyvqa")
    data = _vqa_data(10, seed=3, split="test")
    torch.manual_seed(0)
    model = TaskModel(vilt, spec.make_head({"dim": 32}))
    a, b = spec.evaluate(model, data), spec.evaluate(model, data)
    assert a == b
    assert torch.equal(spec.predict(model, data, batch_size=3), spec.predict(model, data, batch_size=64))
    # a fine-tuning run is reproducible too
    d = {s: _vqa_data(8, seed=i, split=s) for i, s in enumerate(("train", "val", "test"))}
    r1 = finetune(spec, copy.deepcopy(vilt), "full", data=d, train_config=CFG, eval_splits=("test",))
    r2 = finetune(spec, copy.deepcopy(vilt), "full", data=d, train_config=CFG, eval_splits=("test",))
    assert [h["loss"] for h in r1["history"]] == [h["loss"] for h in r2["history"]]
    assert r1["test"] == r2["test"]


def test_chance_is_the_train_majority_class():
    spec = get_task("shapes_nlvr")
    train, test = _nlvr_data(8), _nlvr_data(8, seed=5)
    for e, y in zip(train.examples, [1, 1, 1, 0, 0, 1, 0, 1]):
        e["label"] = y
    for e, y in zip(test.examples, [1, 0, 0, 0, 1, 1, 0, 0]):
        e["label"] = y
    r = spec.chance(train, test)
    assert r["score"] == 37.5 and r["n"] == 8 and r["se"] == pytest.approx(100 * (0.375 * 0.625 / 8) ** 0.5)


# ---------------------------------------------------------------------------- real data, tiny sets
def test_nlvr_load_keeps_minimal_pairs_and_balanced_chance(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_DATA_DIR", str(tmp_path))
    spec = get_task("shapes_nlvr")
    knobs = {"n_train": 8, "n_val": 8, "n_test": 8}
    val = spec.load("val", limit=4, knobs=knobs, features="compute", image_size=64)
    from vlkit.data import load

    groups = load("shapes_nlvr", "val", **knobs)["group"]
    picked = [groups[r] for r in val.rows]
    assert len(val) == 4 and all(picked.count(gid) == 2 for gid in picked)  # both rows of each pair
    assert sorted(val.labels().tolist()) == [0, 0, 1, 1]  # minimal pairs: one true, one false
    batch = val.collate(val.examples)
    assert batch["image_feats_left"].shape == batch["image_feats_right"].shape == (4, 4, 1280)
    assert spec.chance(val, val)["score"] == 50.0


def test_retrieval_load_train_pairs_and_gallery(tmp_path, monkeypatch):
    monkeypatch.setenv("VLKIT_DATA_DIR", str(tmp_path))
    spec = get_task("shapes_retrieval")
    knobs = {"n_train": 3, "n_val": 3, "n_test": 3}
    train = spec.load("train", limit=2, knobs=knobs, features="compute", image_size=64)
    assert len(train) == 2 * 5 and all("neg_ids" in e for e in train.examples)
    assert train.examples[0]["neg_ids"] != train.examples[0]["ids"]
    gal = spec.load("test", knobs=knobs, features="compute", image_size=64, captions_per_image=2)
    assert len(gal) == 6 and gal.meta["relevant"].shape == (6, 3)
    assert all(gal.meta["relevant"][j, gal.meta["owner"][j]] for j in range(6))  # a caption is true of its image


# ---------------------------------------------------------------------------- baselines settings
def test_baselines_config_checks_names_and_weights(tmp_path):
    from vlkit.tasks.baselines import BaselinesConfig, load_backbone

    with pytest.raises(UnknownNameError, match="shapes_nlvr"):
        BaselinesConfig(tasks=["nlvr2"])
    with pytest.raises(UnknownNameError, match="probe_lr"):
        BaselinesConfig(task_settings={"easyvqa": {"probe_rate": 1.0}})
    with pytest.raises(ValueError, match="text task"):
        BaselinesConfig(tasks=["movie_reviews"])
    with pytest.raises(UnknownNameError, match="full, linear_probe"):
        BaselinesConfig(methods=["lora"])
    cfg = BaselinesConfig(task_settings={"easyvqa": {"train": 64}}, train={"lr": 1e-3})
    assert cfg.settings("easyvqa")["train"] == 64 and cfg.settings("shapes_nlvr")["lr"] == 1e-3
    missing = tmp_path / "runs" / "pretrain" / "vilt-mini" / "final"  # never left behind by another run
    with pytest.raises(FileNotFoundError, match="runs/pretrain/vilt-mini/final"):
        load_backbone("vilt-mini", BaselinesConfig(weights={"vilt-mini": str(missing)}))
