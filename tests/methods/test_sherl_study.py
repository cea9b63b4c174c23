"""The SHERL study: option canonicalisation (one run per distinct model), the seed summary and
its tie rule by hand, the memory batch, the autograd-saved accounting on a hand-worked example,
the memory orderings the figures assert (r sweep, late units, SHERL vs full), the no-late-unit
variant of ``apply_sherl`` against a hand-assembled reference, the config's checks, and on the
ci profile's tiny ``vilt-mini`` that the tables share their runs."""

import copy
import dataclasses

import pandas as pd
import pytest
import torch
from torch import nn

from vlkit import config
from vlkit.efficiency import params
from vlkit.methods.petl import apply
from vlkit.methods.sherl import apply_sherl
from vlkit.efficiency import autograd_saved_bytes
from vlkit.methods.sherl_study import (canonical_options, late_options, memory_accounting, memory_batch, seed_summary,
                                       split_measured, study_aggregators, study_late, study_reduction, study_tab1,
                                       train_step_memory, with_measured)
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError
from vlkit.tasks.runner import TaskModel, get_task

TINY = dict(pretrained_text=False, dim=32, heads=4, ffn_dim=64, layers=4)


@pytest.fixture(scope="module")
def vilt():
    return build("vilt-mini", **TINY).eval()


def batch_of(bb, n=3, seed=0):
    x = bb.dummy_inputs(n, text_len=9, seed=seed)
    x["attention_mask"][1, 6:] = 0
    return {**x, "labels": torch.arange(n) % 2}


# ------------------------------------------------------------------------- options
def test_canonical_options_drop_defaults_and_seed_merge_left_to_right():
    merged = canonical_options("sherl", {"reduction": 8, "aggregator": "lineara"}, {"aggregator": "mtsa", "seed": 3})
    assert merged == {}
    assert canonical_options("sherl", None, {"reduction": 4, "late_unit": False}) == {"late_unit": False,
                                                                                       "reduction": 4}
    assert list(canonical_options("sherl", {"reduction": 4, "aggregator": "mhsa"})) == ["aggregator", "reduction"]
    assert canonical_options("full") == {}
    with pytest.raises(UnknownNameError, match="'reductio'"):
        canonical_options("sherl", {"reductio": 4})


def test_late_options():
    assert late_options(0) == {"late_unit": False}
    assert late_options(1) == {"insert_last": 1} and late_options(3) == {"insert_last": 3}
    assert canonical_options("sherl", late_options(1)) == {}  # the paper's design is the default run
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="int >= 0"):
            late_options(bad)


# ------------------------------------------------------------------------- seed summary
def _runs(full, sherl, se=2.0):
    rows = [{"task": "t", "backbone": "b", "method": m, "seed": s, "test": v, "test_se": se, "n_test": 500}
            for m, vals in (("full", full), ("sherl", sherl)) for s, v in enumerate(vals)]
    return pd.DataFrame(rows)


def test_seed_summary_hand_worked():
    s = seed_summary(_runs([80, 82, 84], [78, 79, 80])).set_index("method")
    assert s.loc["full", "mean"] == 82.0 and s.loc["full", "sd"] == 2.0 and s.loc["sherl", "sd"] == 1.0
    assert s.loc["full", "runs"] == 3 and s.loc["sherl", "seeds"] == "0 1 2"
    # |79 - 82| = 3 > max(hypot(2, 1) = 2.24, SE 2): full fine-tuning wins
    assert s.loc["sherl", "sherl - full"] == -3.0 and set(s.verdict) == {"full"}
    # within the spreads: a tie; SHERL ahead by more than the noise: SHERL
    assert set(seed_summary(_runs([80, 82, 84], [80, 81, 82])).verdict) == {"tie"}
    assert set(seed_summary(_runs([80, 80.5, 81], [84, 84.5, 85], se=1.0)).verdict) == {"sherl"}
    one = seed_summary(_runs([80], [83], se=2.5)).set_index("method")  # one seed: the SE is the noise
    assert one.loc["full", "sd"] == 0.0 and set(one.verdict) == {"sherl"}


# ------------------------------------------------------------------------- memory
def test_autograd_saved_bytes_hand_worked():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 4)
    # Linear saves its input (5 x 4 fp32 = 80 B) for the weight's gradient (the weight itself is
    # excluded); ReLU saves its output (5 x 3 = 60 B); sum saves nothing
    assert autograd_saved_bytes(lambda: lin(x).relu().sum(), lin) == 140
    with torch.no_grad():
        assert autograd_saved_bytes(lambda: lin(x).relu().sum(), lin) == 0


def test_memory_batch_pads_to_the_full_length():
    from vlkit.tasks.data import Collate, TaskData

    examples = [{"ids": [101, 7, 102], "label": 0}, {"ids": [101, 5, 6, 9, 102], "label": 1},
                {"ids": [101, 102], "label": 0}]
    data = TaskData("movie_reviews", "train", examples, Collate(None), [0, 1, 2], 3)
    b = memory_batch(data, get_task("movie_reviews"), 2, 8)
    assert b["input_ids"].tolist() == [[101, 7, 102, 0, 0, 0, 0, 0], [101, 5, 6, 9, 102, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert memory_batch(data, get_task("movie_reviews"), 10, 8)["labels"].tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="exceed text_len 4"):
        memory_batch(data, get_task("movie_reviews"), 3, 4)


def _accounted(bb, method, batch, **opts):
    spec = get_task("easyvqa")
    torch.manual_seed(0)
    model = TaskModel(apply(method, copy.deepcopy(bb), **opts), spec.make_head({"dim": 32}), method)
    return memory_accounting(spec, model, batch), model


def test_memory_accounting_identity_and_orderings(vilt):
    batch = batch_of(vilt)
    full, fm = _accounted(vilt, "full", batch)
    sherl, sm = _accounted(vilt, "sherl", batch, reduction=4)
    for acc, model in ((full, fm), (sherl, sm)):
        w = sum(p.numel() * 4 for p in model.parameters()) / 2**20
        assert acc["weights_mib"] == round(w, 2)
        assert acc["states_mib"] == round(3 * 4 * params(model, trainable_only=True) / 2**20, 2)
        assert abs(acc["est_mib"] - (acc["weights_mib"] + acc["states_mib"] + acc["saved_mib"])) <= 0.02
    assert sherl["saved_mib"] < full["saved_mib"] / 2 and sherl["est_mib"] < full["est_mib"]


def _saved(bb, batch, **opts):
    spec = get_task("easyvqa")
    torch.manual_seed(0)
    model = TaskModel(apply_sherl(copy.deepcopy(bb), **opts), spec.make_head({"dim": 32}), "sherl").train()
    return autograd_saved_bytes(lambda: spec.loss(model, batch)["loss"], model), params(model.backbone, True)


def test_fig7_and_late_memory_orderings(vilt):
    # the figures assert these: a wider MTSA (smaller r) keeps more activations and has more
    # parameters; each late pre-trained unit adds its activations
    batch = batch_of(vilt)
    by_r = [_saved(vilt, batch, reduction=r) for r in (8, 4, 2)]
    assert by_r[0][0] < by_r[1][0] < by_r[2][0] and by_r[0][1] < by_r[1][1] < by_r[2][1]
    late = [_saved(vilt, batch, reduction=4, **late_options(k)) for k in (0, 1, 2)]
    assert late[0][0] < late[1][0] < late[2][0]
    assert late[0][1] == late[1][1]  # same MTSA: only the late route differs


# ------------------------------------------------------------------------- no late unit
def test_no_late_unit_equals_hand_assembled_reference(vilt):
    x = vilt.dummy_inputs(2, text_len=7, seed=1)
    model = apply_sherl(copy.deepcopy(vilt), reduction=4, late_unit=False, seed=3)
    ref = apply_sherl(copy.deepcopy(vilt), reduction=4, seed=3)
    assert model.stop == ref.stop == 3 and model.feature_keys == ref.feature_keys == ["En0", "En1", "En2"]
    assert model.options["late_unit"] is False and ref.options["late_unit"] is True
    with torch.no_grad():
        model.mtsa[0].alpha.fill_(0.05)  # blend x_last back in: the gate path is covered too
    calls = []
    model.backbone.unit("En3").register_forward_hook(lambda *a: calls.append(1))
    out = model(**x)
    assert calls == []  # the last pre-trained unit never runs
    state, record = model.prefix(**x)
    merged = model.mtsa[0]([record[k] for k in model.feature_keys], state.streams["joint"])
    state.streams["joint"] = merged
    torch.testing.assert_close(out.pooled, model.backbone.finalize(state).pooled, rtol=0, atol=0)
    out.pooled.sum().backward()
    assert all(p.grad is not None for p in model.mtsa.parameters())
    assert params(model, True) == params(ref, True)


def test_no_late_unit_bad_input(vilt):
    with pytest.raises(ValueError, match="needs insert_last=1, got 2"):
        apply_sherl(copy.deepcopy(vilt), late_unit=False, insert_last=2)
    with pytest.raises(ValueError, match="regulate_context must be None or False"):
        apply_sherl(copy.deepcopy(vilt), late_unit=False, regulate_context=True)
    with pytest.raises(ValueError, match="late_unit must be True or False"):
        apply_sherl(copy.deepcopy(vilt), late_unit=0)


def test_train_step_memory_trains_what_the_accounting_counts(vilt, tmp_path):
    from safetensors.torch import save_file

    batch = batch_of(vilt, n=4)
    path = tmp_path / "b.safetensors"
    save_file(batch, str(path))
    out = train_step_memory(preset="vilt-mini", overrides=TINY, task="easyvqa", method="sherl",
                            options={"reduction": 4}, batch_path=str(path), steps=2)
    _, model = _accounted(vilt, "sherl", batch, reduction=4)
    assert out["trainable"] == params(model, trainable_only=True) and out["step_s"] > 0


# ------------------------------------------------------------------------- tables
def test_split_and_join_measured_round_trip():
    t = pd.DataFrame({"task": ["t", "t"], "backbone": ["b", "b"], "method": ["full", "sherl"],
                      "options": ["defaults", "defaults"], "test": [80.0, 79.0], "est_mib": [400.0, 100.0],
                      "saved_mib": [48.0, 7.0], "mem_batch": [8, 8], "mem_len": [32, 32],
                      "peak_mib": [396.0, None], "step_s": [0.2, None], "load_avg": [2.0, None],
                      "peak_reset_after_build": [True, None]})
    scores, measured = split_measured(t)
    assert not {"peak_mib", "step_s", "load_avg", "peak_reset_after_build"} & set(scores)
    assert measured.method.tolist() == ["full"]  # never-measured rows are left out
    back = with_measured(scores, measured)
    assert back.peak_mib.iloc[0] == 396.0 and pd.isna(back.peak_mib.iloc[1])
    assert back.drop(columns=["peak_mib", "step_s", "load_avg"]).equals(scores)
    assert split_measured(scores)[1].empty  # nothing measured: no memory rows


@pytest.fixture(scope="module")
def ci_cfg():
    return config.resolve("sherl", "ci")


def test_config_errors_name_the_bad_value(ci_cfg):
    with pytest.raises(UnknownNameError, match="'das'"):
        dataclasses.replace(ci_cfg, text_methods=["das"])
    with pytest.raises(UnknownNameError, match="'reductio'"):
        dataclasses.replace(ci_cfg, method_options={"sherl": {"reductio": 4}})
    with pytest.raises(ValueError, match="not a \\[backbone, task\\]"):
        dataclasses.replace(ci_cfg, headline=[["minilm", "easyvqa"]])
    with pytest.raises(UnknownNameError, match="'sumpool'"):
        dataclasses.replace(ci_cfg, aggregators=["sumpool"])
    with pytest.raises(ValueError, match="int >= 1, got 0"):
        dataclasses.replace(ci_cfg, reductions=[0])
    with pytest.raises(ValueError, match="int >= 0"):
        dataclasses.replace(ci_cfg, late_units=[-1])
    with pytest.raises(UnknownNameError, match="'gpu'"):
        dataclasses.replace(ci_cfg, memory="gpu")
    with pytest.raises(ValueError, match="method_lr.full must be a positive number"):
        dataclasses.replace(ci_cfg, method_lr={"full": 0})
    with pytest.raises(ValueError, match="headline_methods must be two methods"):
        dataclasses.replace(ci_cfg, headline_methods=["sherl"])


def test_tables_share_runs_on_the_tiny_backbone(ci_cfg):
    cfg = dataclasses.replace(ci_cfg, text_backbones=[], text_tasks=[], vl_methods=["full", "sherl"],
                              headline=[["vilt-mini", "shapes_nlvr"]], aggregators=["mtsa", "avepool"],
                              reductions=[8, 4], late_units=[0, 1], memory="off")
    cache: dict = {}
    log = lambda m: None  # noqa: E731
    tab = study_tab1(cfg, "ci", cache=cache, log=log)
    agg = study_aggregators(cfg, "ci", cache=cache, log=log)
    red = study_reduction(cfg, "ci", cache=cache, log=log)
    late = study_late(cfg, "ci", cache=cache, log=log)
    runs = [k for k in cache if k[0] == "run"]
    # full, SHERL (= mtsa bar = r 8 point = 1 late unit), avepool, r 4, no late unit
    assert len(runs) == 5, runs
    sherl = tab.set_index("method").loc["sherl"]
    for t, col, val in ((agg, "aggregator", "mtsa"), (red, "r", 8), (late, "late_units", 1)):
        row = t[t[col] == val].iloc[0]
        assert row.test == sherl.test and row.est_mib == sherl.est_mib and row.options == "defaults"
    assert red[red.method == "full"].iloc[0].test == tab.set_index("method").loc["full"].test
    assert (tab.peak_mib.isna().all() if "peak_mib" in tab else True)  # memory: off measures nothing
    assert sherl.params_pct < 2.0 and tab.set_index("method").loc["full"].params_pct == 100.0
