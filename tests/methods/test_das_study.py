"""The DAS study (Tables A-C): the tie rule by hand, the config's checks, and on the ci
profile's tiny ViLT-style backbone the properties the tables rest on -- the searched set is
made of candidates, a skip lowers the GMACs column by one unit minus its adapters, DAS trains
far fewer parameters than full fine-tuning, random sets are distinct, runs are seeded. On
retrieval: the search's val pairs (seeded, built like the training pairs, no test-gallery
image), its rounds scoring fresh batches of them, and rows that report mean R@1."""

import dataclasses
import math

import pytest
import torch
from datasets import Image

from vlkit import config
from vlkit.data import load as load_dataset
from vlkit.data.stage import data_config
from vlkit.efficiency import macs, unit_macs
from vlkit.methods.das import apply_das, candidates, study
from vlkit.methods.das.study import (DASConfig, paper_gmacs, run_search, study_table_a, study_table_b, task_data,
                                     verdict)
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError
from vlkit.tasks.baselines import task_spec
from vlkit.tasks.data import tokenize
from vlkit.tasks.runner import ClassifyTask, subset_rows

RET = "shapes_retrieval"


def test_verdict_hand_worked():
    # noise = max(hypot(1.5, 2.0) = 2.5, se)
    assert verdict(80.0, 1.5, 77.6, 2.0) == "tie"
    assert verdict(80.0, 1.5, 77.4, 2.0) == "DAS"
    assert verdict(70.0, 1.5, 72.6, 2.0) == "random"
    assert verdict(80.0, 0.0, 78.0, 0.0, se=2.5) == "tie"  # single runs: the test SE is the noise floor
    assert verdict(80.0, 0.0, 78.0, 0.0, se=1.0) == "DAS"


@pytest.fixture(scope="module")
def ci_cfg():
    return config.resolve("das", "ci")


def test_config_errors_name_the_bad_value(ci_cfg):
    with pytest.raises(UnknownNameError, match="'everyy'"):
        dataclasses.replace(ci_cfg, search={"everyy": 2})
    with pytest.raises(UnknownNameError, match="'local'"):
        dataclasses.replace(ci_cfg, scopes={"vilt-mini": ["local"]})
    with pytest.raises(ValueError, match="not in the Tab. A grid"):
        dataclasses.replace(ci_cfg, headline=[["vilt-mini", "shapes_nlvr", "global", 5]])
    with pytest.raises(UnknownNameError, match="'nlvr2'.*easyvqa, shapes_nlvr, shapes_retrieval"):
        dataclasses.replace(ci_cfg, tasks=["nlvr2"])
    with pytest.raises(UnknownNameError, match="'das'"):
        dataclasses.replace(ci_cfg, text_methods=["das"])


def test_config_accepts_retrieval_and_names_the_searchable_tasks(ci_cfg, monkeypatch):
    cfg = dataclasses.replace(ci_cfg, tasks=[RET], headline=[["vilt-mini", RET, "global", 1]])
    assert cfg.tasks == [RET] and cfg.settings(RET)["train"] == 4
    monkeypatch.setattr(study, "SEARCHABLE", (ClassifyTask,))  # a task kind the search could not score
    with pytest.raises(UnknownNameError, match=f"'{RET}'; valid .*: easyvqa, shapes_nlvr$"):
        dataclasses.replace(ci_cfg, tasks=[RET], headline=[])


@pytest.fixture(scope="module")
def table_a(ci_cfg):
    cache: dict = {}
    table, policy, searches = study_table_a(ci_cfg, "ci", cache=cache, log=lambda m: None)
    return table, policy, searches, cache


@pytest.mark.parametrize("task", ["shapes_nlvr", RET])
def test_table_a_rows_and_columns(table_a, ci_cfg, task):
    table, policy, searches, cache = table_a
    base, _ = cache[("backbone", "vilt-mini")]
    cands = candidates(base, "global")
    table, policy = table[table.task == task], policy[policy.task == task]
    das = table[(table.method == "das") & (table.k == 1)]
    assert len(das) == 1 and das.skipped.iloc[0] in cands
    k0 = table[(table.method == "das") & (table.k == 0)].iloc[0]
    full = table[table.method == "full"].iloc[0]
    # the skip saves one unit's MACs minus its two parallel adapters, plus the skip adapter
    # (which costs what those adapters cost): exactly the unit's own MACs on the test example
    assert das.add_gmacs.iloc[0] < k0.add_gmacs < 0.1 and full.add_gmacs == 0.0
    assert das.trainable.iloc[0] < k0.trainable < full.trainable / 10
    # policy: one row per round (before + after each) per candidate, probabilities in (0, 1)
    assert len(policy) == (ci_cfg.search_options()["rounds"] + 1) * len(cands)
    assert policy.p.between(0, 1).all()
    assert set(searches) == {("vilt-mini", t, "global", 1, 0) for t in ci_cfg.tasks}


def test_retrieval_rows_report_mean_r1_on_the_test_gallery(table_a, ci_cfg):
    table, _, searches, cache = table_a
    rows = table[table.task == RET]
    assert len(rows) == 3 and set(rows.metric) == {"R@1 (mean of i2t, t2i)"}
    g = ci_cfg.gallery["images_single"]  # single-stream vilt-mini: every pair of the first g images
    assert set(rows.gallery) == {f"{g} img x {g * ci_cfg.gallery['captions_per_image']} cap"}
    assert (rows.n_test == g).all()
    for _, r in rows.iterrows():
        assert r.test == pytest.approx((r["i2t_R@1"] + r["t2i_R@1"]) / 2, abs=0.01)
    # GMACs: one (image, caption) pass; skipping unit u saves exactly u's MACs on that pair
    base, _ = cache[("backbone", "vilt-mini")]
    data = cache[("data", RET)]
    batch = data["test"].collate(data["test"].examples[:1])
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
         "image_feats": batch["image_feats"]}
    assert rows.gmacs.iloc[0] == pytest.approx(macs(base, x) / 1e9, abs=1e-4)
    k0, k1 = rows[(rows.method == "das") & (rows.k == 0)].iloc[0], rows[rows.k == 1].iloc[0]
    assert k0.add_gmacs - k1.add_gmacs == pytest.approx(unit_macs(base, x)[k1.skipped] / 1e9, abs=2e-4)


def _raw_images(split: str) -> list[bytes]:
    knobs = data_config("ci").knobs_for(RET)
    ds = load_dataset(RET, split, seed=config.seed(), **knobs).cast_column("image", Image(decode=False))
    return [x["bytes"] for x in ds["image"]]


def test_val_pairs_are_seeded_training_pairs_without_test_images(table_a, ci_cfg):
    _, _, _, cache = table_a
    data = task_data(RET, ci_cfg, "ci", cache)
    pairs, gallery = data["val_pairs"], data["test"]
    spec, n_img = task_spec(RET, ci_cfg), ci_cfg.settings(RET)["val"]
    cpi = ci_cfg.gallery["captions_per_image"]
    again = spec.load("val", limit=n_img, profile="ci", features="compute", as_pairs=True)
    assert again.examples == pairs.examples and again.rows == pairs.rows
    assert torch.equal(again.collate(again.examples)["image_feats"], pairs.collate(pairs.examples)["image_feats"])
    # the rows: the train split's draw (subset_rows under the data seed), salted with "val"
    n_val = data_config("ci").knobs_for(RET)["n_val"]
    assert pairs.rows == subset_rows(n_val, n_img, config.seed(), RET, "val") != list(range(n_img))
    # built like the training pairs: caption j of image r and the hard negative made from it
    ds = load_dataset(RET, "val", seed=config.seed(), **data_config("ci").knobs_for(RET))
    assert len(pairs) == n_img * cpi
    for i, r in enumerate(pairs.rows):
        caps, negs, of = ds[r]["captions"], ds[r]["negatives"], ds[r]["negative_of"]
        for j in range(cpi):
            e = pairs.examples[i * cpi + j]
            assert e["image"] == r
            assert e["ids"] == tokenize([caps[j]], spec.text_len)[0]
            assert e["neg_ids"] == tokenize([negs[of.index(j)]], spec.text_len)[0]
    # no val-pair image is a test-gallery image (pixels, and the cells the model sees)
    val_png, test_png = _raw_images("val"), _raw_images("test")
    assert not {val_png[r] for r in pairs.rows} & {test_png[r] for r in gallery.rows}
    vc = pairs.collate.cells[[e["row"] for e in pairs.examples]]
    tc = gallery.collate.cells[gallery.meta["image_rows"]]
    assert not any(torch.equal(a, b) for a in vc for b in tc)
    with pytest.raises(ValueError, match="as_pairs=True .*'test'"):
        spec.load("test", limit=2, profile="ci", features="compute", as_pairs=True)


@pytest.mark.parametrize("task", ["shapes_nlvr", RET])
def test_search_rounds_score_fresh_batches_of_the_val_split(table_a, ci_cfg, task, monkeypatch):
    """Each policy round scores its S sets on one batch of the validation examples (retrieval:
    the val pairs) collated with the *val* split's images, a different batch each round; the
    rewards are exp(-loss) of that batch."""
    _, _, _, cache = table_a
    base, _ = cache[("backbone", "vilt-mini")]
    spec, data = task_spec(task, ci_cfg), task_data(task, ci_cfg, "ci", cache)
    val = data["val_pairs" if task == RET else "val"]
    scored = []
    plain = study._task_loss

    def spy(spec_):
        f = plain(spec_)

        def loss(m, batch):
            if not torch.is_grad_enabled():
                scored.append(batch)
            return f(m, batch)

        return loss

    monkeypatch.setattr(study, "_task_loss", spy)
    opts = {**ci_cfg.search_options(), "rounds": 3, "S": 2, "every": 1, "val_batch_size": 4}
    res = run_search(spec, base, data, k=1, scope="global", settings=ci_cfg.settings(task), options=opts, seed=0)
    vb = res.val_batches
    assert len(vb) == 3 and all(len(b) == 4 for b in vb)
    assert all(set(vb[r]).isdisjoint(vb[r + 1]) for r in range(2))  # successive rounds differ
    assert len(scored) == 3 * 2
    img = "image_feats" if task == RET else "image_feats_left"
    for r in range(3):
        want = val.collate([val[i] for i in vb[r]])
        for batch in scored[2 * r:2 * r + 2]:  # both sets of round r see that batch
            assert torch.equal(batch["input_ids"], want["input_ids"]) and torch.equal(batch[img], want[img])
        assert res.rounds[r]["rewards"] == pytest.approx([math.exp(-v) for v in res.rounds[r]["losses"]])
    if task == RET:  # training-format pairs, with the image ids that mask an in-batch image negative
        first = val.collate([val[i] for i in vb[0]])
        assert torch.equal(scored[0]["neg_input_ids"], first["neg_input_ids"])
        assert scored[0]["images"].tolist() == [val[i]["image"] for i in vb[0]]
        gallery_only = {k: v for k, v in data.items() if k != "val_pairs"}
        with pytest.raises(ValueError, match="val_pairs"):
            run_search(spec, base, gallery_only, k=1, scope="global", settings=ci_cfg.settings(task), options=opts,
                       seed=0)


def test_skip_gmacs_identity_on_the_tiny_backbone(table_a):
    _, _, searches, cache = table_a
    base, _ = cache[("backbone", "vilt-mini")]
    x = base.dummy_inputs(1)
    k0 = apply_das(build_copy(base), skip=[], scope="global")
    k1 = apply_das(build_copy(base), skip=["En1"], scope="global")
    # the skip adapter costs what the unit's two parallel adapters cost: a skip saves exactly
    # the plain unit's MACs (DAS issue; apply.py docstring)
    assert macs(k0, x) - macs(k1, x) == unit_macs(base, x)["En1"]


def build_copy(m):
    import copy

    return copy.deepcopy(m)


def test_table_b_random_sets_distinct_and_seeded(table_a, ci_cfg):
    _, _, searches, cache = table_a
    summary, runs = study_table_b(ci_cfg, "ci", dict(searches), cache=cache, log=lambda m: None)
    rnd = runs[runs.kind == "random"]
    assert len(rnd) == ci_cfg.random_sets and rnd.skipped.is_unique
    assert len(runs[runs.kind == "DAS"]) == len(ci_cfg.seeds)
    again, runs2 = study_table_b(ci_cfg, "ci", dict(searches), cache=cache, log=lambda m: None)
    assert runs.equals(runs2)
    assert summary.verdict.iloc[0] in ("tie", "DAS", "random")


def test_paper_gmacs_k_skips_save_the_units(ci_cfg):
    cfg = dataclasses.replace(ci_cfg, paper_presets=["vilt-b32"], paper_ks=[1, 2])
    t = paper_gmacs(cfg)
    base = build("vilt-b32", **cfg.overrides["vilt-b32"])
    per_unit = unit_macs(base)["En0"] / 1e9  # every ViLT unit costs the same
    k = t.set_index("k")["add_gmacs"]
    assert k[1] - k[0] == pytest.approx(-per_unit, abs=2e-3)
    assert k[2] - k[0] == pytest.approx(-2 * per_unit, abs=2e-3)
