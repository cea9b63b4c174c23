"""vlkit.pretrain on tiny models and toy corpora: BERT masking statistics, ITM batch balance
and negatives that really are negatives (exact on generated scenes), the tied MLM decoder,
caption parsing against the grammar, and a short pre-training run that lowers the loss,
resumes bit-for-bit from its checkpoint and exports a folder that ``build(preset,
weights=...)`` loads with identical outputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vlkit import pretrain as P
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not thrash on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- toy world
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
WORDS = ["a", "red", "blue", "green", "yellow", "circle", "square", "star", "."]
VOCAB = {w: i + 5 for i, w in enumerate(WORDS)}
V = 32  # vocabulary of the tiny models (ids >= 14 are never used by the toy texts)
TOKENS = dict(pad_id=PAD, mask_token_id=MASK, special_ids=(PAD, UNK, CLS, SEP, MASK), random_low=5)
COLOURS, SHAPES = WORDS[1:5], WORDS[5:8]

TINY = {
    "vilt-mini": dict(pretrained_text=False, vocab_size=V, dim=32, layers=2, heads=2, ffn_dim=64, max_positions=16,
                      bos_token_id=CLS, eos_token_id=SEP, image_size=64, text_len=6),
    "meter-mini": dict(pretrained_text=False, fusion_init="random", vocab_size=V, text_dim=32, text_heads=2,
                       text_ffn_dim=64, text_layers=1, vision_dim=16, vision_heads=2, vision_ffn_dim=32,
                       vision_layers=1, hidden_dim=24, fusion_heads=2, fusion_ffn_dim=48, fusion_layers=1,
                       max_positions=16, bos_token_id=CLS, eos_token_id=SEP, image_size=64, text_len=6),
    "xvlm-mini": dict(pretrained_text=False, vocab_size=V, text_dim=32, text_heads=2, text_ffn_dim=64, text_layers=1,
                      vision_dim=16, vision_heads=2, vision_ffn_dim=32, vision_layers=1, fusion_layers=1, embed_dim=8,
                      max_positions=16, bos_token_id=CLS, eos_token_id=SEP, image_size=64, text_len=6),
}


def toy_tokenize(texts):
    return [[CLS] + [VOCAB[w] for w in t.replace(".", " .").split()] + [SEP] for t in texts]


def toy_source(n_images=12, repeats=4, seed=0, cells=4) -> P.Source:
    """Image i shows a (colour, shape); its cells carry that pair as a signal; caption
    'a <colour> <shape> .'; hard negatives change the colour or the shape."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(COLOURS[i % 4], SHAPES[(i // 4) % 3]) for i in range(n_images)]
    feats = 0.1 * torch.randn(n_images, cells, 1280, generator=g)
    for i, (c, s) in enumerate(pairs):
        feats[i, :, COLOURS.index(c)] += 3.0
        feats[i, :, 10 + SHAPES.index(s)] += 3.0
    texts = [f"a {c} {s}." for c, s in pairs]
    hard = [[f"a {o} {s}." for o in COLOURS if o != c] + [f"a {c} {o}." for o in SHAPES if o != s] for c, s in pairs]
    rows = torch.arange(n_images).repeat(repeats)
    all_texts = texts * repeats

    def truth(i, j):
        return all_texts[j] == texts[int(rows[i])]

    return P.Source("toy", feats, rows, all_texts, toy_tokenize(all_texts),
                    [toy_tokenize(h) for h in hard] * repeats, truth)


def toy_cfg(preset="vilt-mini", **kw) -> P.PretrainConfig:
    base = dict(presets=[preset], steps=8, batch_size=8, lr=3e-3, lr_new_mult=1.0, warmup_frac=0.0, ckpt_every=2,
                eval_rows=16, overrides=TINY[preset],
                objectives={preset: ["itm", "mlm"] + (["itc"] if preset == "xvlm-mini" else [])})
    base.update(kw)
    return P.PretrainConfig(**base)


# ---------------------------------------------------------------------------- masking
def test_mask_tokens_bert_statistics_and_specials():
    """15% of maskable tokens chosen; of those 80% [MASK], 10% random, 10% kept; specials and
    padding never touched; labels = original ids exactly at the chosen positions."""
    g = torch.Generator().manual_seed(0)
    b, n = 4000, 24
    ids = torch.randint(5, V, (b, n), generator=g)
    lengths = torch.randint(4, n + 1, (b,), generator=g)
    mask = (torch.arange(n)[None] < lengths[:, None]).long()
    ids[mask == 0] = PAD
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[:, 2] = UNK  # a special id inside the text: never masked either
    out, labels = P.mask_tokens(ids, mask, mask_token_id=MASK, special_ids=(PAD, UNK, CLS, SEP, MASK), vocab_size=V,
                                random_low=5, prob=0.15, generator=torch.Generator().manual_seed(1))
    maskable = mask.bool() & (ids >= 5)
    chosen = labels != P.IGNORE
    assert not (chosen & ~maskable).any()
    assert torch.equal(out[~chosen], ids[~chosen])  # nothing else changes
    assert torch.equal(labels[chosen], ids[chosen])
    n_chosen = int(chosen.sum())
    rate = n_chosen / int(maskable.sum())
    assert abs(rate - 0.15) < 0.005, rate
    to_mask = (out == MASK) & chosen
    kept = (out == ids) & chosen
    other = chosen & ~to_mask & ~kept
    # a random replacement equals the original with prob 1/27: it counts as "kept" here
    p_same = 1 / (V - 5)
    assert abs(int(to_mask.sum()) / n_chosen - 0.8) < 0.01
    assert abs(int(kept.sum()) / n_chosen - (0.1 + 0.1 * p_same)) < 0.01
    assert abs(int(other.sum()) / n_chosen - 0.1 * (1 - p_same)) < 0.01
    assert (out[other] >= 5).all() and (out[other] < V).all()  # random tokens are ordinary ones


def test_mask_tokens_force_chooses_but_never_specials():
    ids = torch.tensor([[CLS, 7, 8, 9, SEP, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    force = torch.tensor([[True, False, True, False, True, True]])
    _, labels = P.mask_tokens(ids, mask, mask_token_id=MASK, special_ids=(PAD, CLS, SEP), vocab_size=V, prob=1e-9,
                              force=force, generator=torch.Generator().manual_seed(0))
    assert (labels != P.IGNORE).nonzero()[:, 1].tolist() == [2]


def test_mask_tokens_forces_one_token_when_none_chosen():
    ids = torch.tensor([[CLS, 7, 8, SEP, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    _, labels = P.mask_tokens(ids, mask, mask_token_id=MASK, special_ids=(PAD, CLS, SEP), vocab_size=V, prob=1e-9,
                              generator=torch.Generator().manual_seed(0))
    chosen = (labels != P.IGNORE).nonzero()[:, 1].tolist()
    assert len(chosen) == 1 and chosen[0] in (1, 2)


# ---------------------------------------------------------------------------- ITM batches
@pytest.mark.parametrize("b", [8, 9, 16])
def test_itm_batch_balance_and_negatives(b):
    src = toy_source()
    corpus = P.Corpus([src])
    collate = P.PretrainCollator(corpus, **TOKENS, vocab_size=V, hard_frac=0.5,
                                 generator=torch.Generator().manual_seed(b))
    for trial in range(5):
        items = [corpus[k] for k in torch.randperm(len(corpus), generator=torch.Generator().manual_seed(trial))[:b]]
        batch = collate(items)
        labels, kind = batch["itm_labels"], batch["itm_kind"]
        n_neg = b // 2
        assert int((labels == 0).sum()) == n_neg and int(labels.sum()) == b - n_neg
        assert int((kind == P.HARD_NEG).sum()) == round(0.5 * n_neg)
        assert torch.equal(labels, (kind == P.POSITIVE).long())
        for r, (s, i) in enumerate(items):
            itm = batch["itm_ids"][r][batch["itm_mask"][r].bool()].tolist()
            pos = batch["pos_ids"][r][batch["pos_mask"][r].bool()].tolist()
            assert pos == src.ids[i]
            if kind[r] == P.POSITIVE:
                assert itm == pos
            else:
                assert itm != pos
                if kind[r] == P.HARD_NEG:
                    assert itm in src.hard[i]
                else:
                    j = src.ids.index(itm)  # another example's caption ...
                    assert src.truth(i, j) is False  # ... false for this image
        # MLM: every row's own caption, changed only where a token was chosen
        chosen = batch["mlm_labels"] != P.IGNORE
        assert chosen.any()
        assert torch.equal(batch["mlm_labels"][chosen], batch["pos_ids"][chosen])
        assert torch.equal(batch["mlm_ids"][~chosen], batch["pos_ids"][~chosen])
        assert batch["image_feats"].dtype == torch.float32
        assert torch.equal(batch["image_feats"], torch.stack([src.feats[src.rows[i]] for _, i in items]))


def test_collator_without_mlm_or_itm():
    corpus = P.Corpus([toy_source()])
    items = [corpus[k] for k in range(8)]
    only_itm = P.PretrainCollator(corpus, **TOKENS, vocab_size=V, mlm=False,
                                  generator=torch.Generator().manual_seed(0))(items)
    assert "mlm_ids" not in only_itm and int(only_itm["itm_labels"].sum()) == 4
    only_mlm = P.PretrainCollator(corpus, **TOKENS, vocab_size=V, itm=False,
                                  generator=torch.Generator().manual_seed(0))(items)
    assert only_mlm["itm_labels"].all() and torch.equal(only_mlm["itm_ids"], only_mlm["pos_ids"])


TOY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS] + [f"[unused{i}]" for i in range(V - 5 - len(WORDS))]


def test_grounded_groups_whole_words_and_answers():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cy", "##an", "circle", "is", "there", "?", "yes",
             "red", "."] + [""] * (V - 15)
    c = P.PretrainCollator(P.Corpus([toy_source()]), **TOKENS, vocab_size=V, vocab=vocab,
                           grounded_words={"cyan", "circle", "red"}, grounded_prob=0.5)
    assert c.grounded_groups([CLS, 5, 6, 7, 8, 14, SEP]) == [[2, 3], [4]]  # "a cyan circle ." -> cy+##an, circle
    # a question-answer text: only the answer (the words after "?") is grounded
    assert c.grounded_groups([CLS, 9, 10, 5, 13, 8, 11, 12, SEP]) == [[7]]
    with pytest.raises(ValueError, match="vocab"):
        P.PretrainCollator(P.Corpus([toy_source()]), **TOKENS, vocab_size=V, grounded_prob=0.5)


def test_grounded_words_are_always_chosen_with_prob_one():
    """grounded_prob=1 and plain masking off: exactly the colour and shape words are chosen,
    then replaced 80/10/10 like any chosen token."""
    corpus = P.Corpus([toy_source()])
    collate = P.PretrainCollator(corpus, **{**TOKENS, "vocab": TOY_VOCAB}, vocab_size=V, mlm_prob=1e-9,
                                 grounded_words=set(COLOURS + SHAPES), grounded_prob=1.0,
                                 generator=torch.Generator().manual_seed(0))
    batch = collate([corpus[k] for k in range(16)])
    grounded = torch.isin(batch["pos_ids"], torch.tensor([VOCAB[w] for w in COLOURS + SHAPES]))
    assert int(grounded.sum()) == 32  # "a <colour> <shape> ." x 16
    assert torch.equal(batch["mlm_labels"] != P.IGNORE, grounded)
    assert int((batch["mlm_ids"] == MASK).sum()) > 16


def test_collator_is_seeded():
    corpus = P.Corpus([toy_source()])
    items = [corpus[k] for k in range(10)]
    a = P.PretrainCollator(corpus, **TOKENS, vocab_size=V, generator=torch.Generator().manual_seed(3))(items)
    b = P.PretrainCollator(corpus, **TOKENS, vocab_size=V, generator=torch.Generator().manual_seed(3))(items)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- real sources
@pytest.fixture(scope="module")
def captions():
    from vlkit.data import shapes

    knobs = {**shapes.KNOBS["shapes_captions"], "n_train": 60, "n_val": 1, "n_test": 1}
    return shapes.build("shapes_captions", 0, **knobs)["train"]


def test_caption_programs_and_exact_negatives(captions):
    """Every generated caption parses back into its program (rendering it gives the caption
    again, and it is true of its scene); hard negatives change one slot and are false of the
    scene; random negatives that are true of the image are rejected."""
    from vlkit.data import grammar as g
    from vlkit.data.scenes import Scene

    src = P.shapes_source(captions, torch.zeros(len(captions), 16, 1280), toy_like_tokenize, seed=0)
    scenes = [Scene.from_records(r) for r in captions["scene"]]
    assert set(captions["kind"]) == {"scene", "rel", "count"}
    for i, (text, kind, scene) in enumerate(zip(captions["caption"], captions["kind"], scenes)):
        p = P.caption_program(text, kind)
        assert p is not None and g.caption_text(p) == text and g.caption_truth(p, scene)
        assert src.truth(i, i) is True
        assert 1 <= len(src.hard[i]) <= 3 and len(set(src.hard[i])) == len(src.hard[i])
        for neg in src.hard[i]:
            q = P.caption_program(neg, kind)
            assert q is not None and neg != text and not g.caption_truth(q, scene)
            slots = lambda prog: [v for v in g.caption_text(prog).rstrip(".").split()]  # noqa: E731
            assert q["kind"] == p["kind"] and slots(q) != slots(p)
    collate = P.PretrainCollator(P.Corpus([src]), **TOKENS, vocab_size=V, generator=torch.Generator().manual_seed(0))
    for i in range(len(src)):
        neg = collate.random_negative(0, i)
        j = src.ids.index(neg)
        assert g.caption_truth(P.caption_program(src.texts[j], captions["kind"][j]), scenes[i]) is False


def toy_like_tokenize(texts):
    """Stand-in tokenizer (the texts themselves), so hard negatives can be read back."""
    return list(texts)


def test_caption_program_rejects_what_it_cannot_render():
    assert P.caption_program("a huge red circle.", "scene") is None
    assert P.caption_program("exactly two red circle.", "count") is None
    assert P.caption_program("a red circle near a blue star.", "rel") is None


def test_easyvqa_source_hard_negatives_and_truth():
    from datasets import Dataset

    ds = Dataset.from_dict({"question": ["what color is the shape?", "is there a circle?", "what shape is it?"],
                            "answer": ["red", "yes", "triangle"], "image_id": [0, 0, 1]})
    src = P.easyvqa_source(ds, torch.zeros(2, 16, 1280), torch.tensor([0, 0, 1]), toy_like_tokenize)
    assert src.texts[0] == "what color is the shape? red"
    assert len(src.hard[0]) == 7 and all(h.startswith("what color is the shape? ") for h in src.hard[0])
    assert "what color is the shape? red" not in src.hard[0]
    assert src.hard[1] == ["is there a circle? no"]
    assert sorted(src.hard[2]) == ["what shape is it? circle", "what shape is it? rectangle"]
    assert src.truth(0, 1) is True  # another true text of the same image
    assert src.truth(0, 2) is None  # image 0 was never asked about its shape this way
    assert src.truth(2, 2) is True


# ---------------------------------------------------------------------------- model
def test_mlm_head_is_tied_to_word_embeddings():
    backbone = build("vilt-mini", **TINY["vilt-mini"])
    model = P.PretrainModel(backbone, ["itm", "mlm"])
    words = backbone.text_embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.weight is words
    # the tie survives a state-dict round trip and a training step moves both as one
    clone = P.PretrainModel(build("vilt-mini", seed=1, **TINY["vilt-mini"]), ["itm", "mlm"])
    clone.load_state_dict(model.state_dict())
    assert clone.mlm_head.decoder.weight is clone.backbone.text_embeddings.word_embeddings.weight
    h = torch.randn(3, 32)
    logits = model.mlm_head(h)
    expected = torch.nn.functional.layer_norm(torch.nn.functional.gelu(model.mlm_head.dense(h)), (32,),
                                              model.mlm_head.norm.weight, model.mlm_head.norm.bias, 1e-12) @ words.t()
    torch.testing.assert_close(logits, expected + model.mlm_head.bias)
    logits.sum().backward()
    assert words.grad is not None and words.grad.abs().sum() > 0


@pytest.mark.parametrize("preset, objectives", [("meter-mini", ["itm", "mlm"]), ("xvlm-mini", ["itm", "mlm", "itc"])])
def test_two_tower_objectives_train_every_new_part(preset, objectives):
    """One step with ITM + MLM (+ ITC): finite losses and gradients in the cross-attention,
    the vision layers, the cell embeddings and every head."""
    torch.manual_seed(0)
    backbone = build(preset, **TINY[preset])
    model = P.PretrainModel(backbone, objectives)
    corpus = P.Corpus([toy_source(cells=4)])
    batch = P.PretrainCollator(corpus, **TOKENS, vocab_size=V, generator=torch.Generator().manual_seed(0))(
        [corpus[k] for k in range(8)])
    out = model.train()(batch)
    assert set(out) >= {"loss", "itm_acc", "mlm_acc", *objectives}
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], sum(out[o] for o in objectives))
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for part in ("cross_attn", "blocks.VEn0", "vision_embeddings.proj", "itm_head", "mlm_head.dense"):
        assert any(part in n and g is not None and g.abs().sum() > 0 for n, g in grads.items()), part


def test_itc_needs_equal_widths():
    with pytest.raises(ValueError, match="itc.*16 and 32"):
        P.PretrainModel(build("meter-mini", **TINY["meter-mini"]), ["itc"])


def test_random_parameters_are_the_non_minilm_ones():
    """vilt-mini with MiniLM text: only the cell embeddings and modality embeddings are random."""
    new = P.random_parameters("vilt-mini", 0, dict(layers=1))
    assert new and all(n.startswith(("vision_embeddings.", "modality_embeddings.")) for n in new)
    assert "vision_embeddings.proj.weight" in new


def test_config_checks_names():
    with pytest.raises(UnknownNameError, match="itm, mlm, itc"):
        P.PretrainConfig(objectives={"vilt-mini": ["wpa"], "meter-mini": ["itm"], "xvlm-mini": ["itm"]})
    with pytest.raises(ValueError, match="itc.*two-tower"):
        P.PretrainConfig(objectives={"vilt-mini": ["itc"], "meter-mini": ["itm"], "xvlm-mini": ["itm"]})
    with pytest.raises(UnknownNameError, match="shapes_captions, easyvqa"):
        P.PretrainConfig(corpora=["coco"])
    with pytest.raises(UnknownNameError, match="vilt-mini, meter-mini, xvlm-mini"):
        P.PretrainConfig(presets=["xvlm-mini-half"])
    from vlkit import config

    for profile in ("ci", "default"):
        cfg = config.resolve("pretrain", profile)
        assert cfg.presets == list(P.PRETRAIN_PRESETS)


# ---------------------------------------------------------------------------- a short run
def test_pretrain_lowers_loss_resumes_and_exports(tmp_path):
    cfg = toy_cfg("vilt-mini", steps=10)
    corpus, val = P.Corpus([toy_source()]), P.Corpus([toy_source(seed=1)])
    kw = dict(seed=0, tokens={**TOKENS, "vocab": TOY_VOCAB})
    # interrupted at step 4, then resumed
    part = P.pretrain_preset("vilt-mini", cfg, corpus, val, run_dir=tmp_path / "a", stop_at_step=4, **kw)
    assert part.record["steps"] == 4 and not (tmp_path / "a" / "final").exists()
    resumed = P.pretrain_preset("vilt-mini", cfg, corpus, val, run_dir=tmp_path / "a", **kw)
    assert resumed.record["resumed_from_step"] == 4 and resumed.record["steps"] == 10
    # uninterrupted
    whole = P.pretrain_preset("vilt-mini", cfg, corpus, val, run_dir=tmp_path / "b", **kw)
    sa, sb = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["loss"] for h in resumed.record["history"]] == [h["loss"] for h in whole.record["history"]]
    losses = [h["loss"] for h in whole.record["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3, losses
    rec = whole.record
    assert rec["val_after"]["val_mlm"] < rec["val_before"]["val_mlm"]
    # the export: backbone only, loads strictly, same outputs; checkpoints are gone
    final = tmp_path / "b" / "final"
    assert not list((tmp_path / "b").glob("ckpt-*"))
    loaded = build("vilt-mini", weights=final, **TINY["vilt-mini"])
    trained = whole.model.backbone.eval()
    x = trained.dummy_inputs(3)
    torch.testing.assert_close(loaded(**x).pooled, trained(**x).pooled, rtol=0, atol=0)
    meta = P.read_final(final)
    assert meta["steps"] == 10 and meta["objectives"] == ["itm", "mlm"] and len(meta["history"]) == 10
    # an up-to-date export is not trained again
    again = P.pretrain_preset("vilt-mini", cfg, corpus, val, run_dir=tmp_path / "b", **kw)
    assert again.model is None and again.record["params_hash"] == rec["params_hash"]


def test_hard_negative_phase_switches_on_at_hard_start_and_resumes(tmp_path):
    """``hard_start=0.6`` of 10 steps: steps 1-6 draw random negatives only, steps 7-10 draw
    ``hard_frac`` of them hard (the training history logs hard-negative accuracy exactly on
    the steps whose batch had one); a run interrupted inside the phase and resumed
    keeps drawing hard negatives and ends bit-identical to an uninterrupted one."""
    cfg = toy_cfg("vilt-mini", steps=10, hard_frac=1.0, hard_start=0.6)
    assert [P.hard_frac_at(cfg, d, 10) for d in range(10)] == [0.0] * 6 + [1.0] * 4
    assert P.hard_frac_at(toy_cfg(hard_frac=0.5), 0, 10) == 0.5  # hard_start 0: from the start
    corpus, val = P.Corpus([toy_source()]), P.Corpus([toy_source(seed=1)])
    kw = dict(seed=0, tokens={**TOKENS, "vocab": TOY_VOCAB})
    whole = P.pretrain_preset("vilt-mini", cfg, corpus, val, run_dir=tmp_path / "w", **kw)
    hist = whole.record["history"]
    assert ["itm_hard_acc" in h for h in hist] == [False] * 6 + [True] * 4
    P.pretrain_preset("vilt-mini", cfg, corpus, val, run_dir=tmp_path / "r", stop_at_step=7, **kw)
    resumed = P.pretrain_preset("vilt-mini", cfg, corpus, val, run_dir=tmp_path / "r", **kw)
    assert [h["loss"] for h in resumed.record["history"]] == [h["loss"] for h in hist]
    assert whole.record["hard_start"] == 0.6
    P.write_results([whole.record], tmp_path / "out")  # the summary says the train losses are the phase's
    assert "the last 40% of the steps draw a share 1.0 of their ITM negatives hard" in (
        tmp_path / "out" / "summary.md").read_text()
    # the phase is part of the run's identity: another hard_start is another run
    other = P.pretrain_preset("vilt-mini", toy_cfg("vilt-mini", steps=10, hard_frac=1.0, hard_start=0.3),
                              corpus, val, run_dir=tmp_path / "w", **kw)
    assert other.model is not None and other.record["params_hash"] != whole.record["params_hash"]
    with pytest.raises(ValueError, match="hard_start"):
        toy_cfg(hard_start=1.5)


def test_export_two_tower_loads_identically(tmp_path):
    backbone = build("xvlm-mini", seed=3, **TINY["xvlm-mini"])
    with torch.no_grad():
        backbone.unit("F0").cross_attn.q.weight.add_(0.5)  # "trained"
    P.export_final(backbone, tmp_path, 7, {"steps": 7})
    loaded = build("xvlm-mini", weights=tmp_path / "final", **TINY["xvlm-mini"])
    x = backbone.dummy_inputs(2)
    torch.testing.assert_close(loaded(**x).pooled, backbone(**x).pooled, rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_image(image_feats=x["image_feats"]),
                               backbone.encode_image(image_feats=x["image_feats"]), rtol=0, atol=0)
    # re-export replaces the folder atomically (no leftovers)
    P.export_final(backbone, tmp_path, 8, {"steps": 8})
    assert P.read_final(tmp_path / "final")["steps"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_write_results(tmp_path):
    hist = [{"step": s, "loss": 3.0 - s, "itm": 0.7, "mlm": 2.3 - s, "lr": 1e-3, "grad_norm": 1.0} for s in (1, 2)]
    rec = {"preset": "vilt-mini", "objectives": ["itm", "mlm"], "steps": 2, "examples_seen": 16,
           "corpus": [["toy", 48]], "history": hist, "final_train": {"loss": 1.0}, "val_before": {},
           "val_after": {"val_itm_acc": 0.75}}
    P.write_results([rec], tmp_path)
    import pandas as pd

    curves = pd.read_csv(tmp_path / "curves.csv")
    assert list(curves["step"]) == [1, 2] and list(curves["mlm"]) == [1.3, 0.3]
    assert "0.75" in (tmp_path / "summary.md").read_text()


def test_train_negatives_random_by_default_val_half_hard():
    """ViLT / METER sample ITM negatives at random (the default ``hard_frac=0``); validation
    batches keep half their negatives hard (``val_hard_frac``) to measure one-word matching."""
    corpus = P.Corpus([toy_source()])
    cfg = toy_cfg()
    items = [corpus[k] for k in range(16)]
    tokens = {**TOKENS, "vocab": TOY_VOCAB}
    train = P.collator_for(corpus, cfg, V, tokens, generator=torch.Generator().manual_seed(0))(items)
    val = P.collator_for(corpus, cfg, V, tokens, generator=torch.Generator().manual_seed(0), val=True)(items)
    assert cfg.hard_frac == 0.0 and int((train["itm_kind"] == P.HARD_NEG).sum()) == 0
    assert int((val["itm_kind"] == P.HARD_NEG).sum()) == 4 and int((val["itm_labels"] == 0).sum()) == 8
    with pytest.raises(ValueError, match="val_hard_frac"):
        toy_cfg(val_hard_frac=1.5)
