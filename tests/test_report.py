"""The results report (vlkit.report): tables assembled from small synthetic result folders
written with the real writers, checked against hand-worked values."""

import math

import pandas as pd
import pytest

from vlkit import report as rp
from vlkit.bench_io import NOT_MEASURED, write_bench
from vlkit.models.protocol import UnknownNameError
from vlkit.results import write_json, write_table

NaN = math.nan
PAPER = {  # a small stand-in for paper_numbers.yaml (the real file is tested below)
    "das_lavin_k0_avg": {"value": 90.0, "k": 0, "kind": "paper"},
    "das_lavin_k0_time": {"value": 4.0, "k": 0, "kind": "paper"},
    "das_lavin_k2_avg": {"value": 89.0, "k": 2, "kind": "paper"},
    "das_lavin_k2_time": {"value": 3.0, "k": 2, "kind": "paper"},
}


def _table_a(tmp_path):
    df = pd.DataFrame([
        # task, backbone, method, scope, k, skipped, test, test_se, add_gmacs, gmacs, trainable, n_val
        ("easyvqa", "vilt-mini", "das", "global", 0, None, 80.0, 1.8, 0.02, 0.2, 1000, 96),
        ("easyvqa", "vilt-mini", "full", None, 0, None, 82.0, 1.7, 0.0, 0.2, 9000, 96),
        ("easyvqa", "vilt-mini", "das", "global", 1, "En3", 77.0, 1.9, -0.03, 0.2, 990, 96),
        ("easyvqa", "vilt-mini", "das", "global", 2, "En1 En2", 70.0, 2.0, -0.07, 0.2, 980, 96),
        ("easyvqa", "meter-mini", "das", "fusion", 0, None, 60.0, 2.1, 0.01, 0.5, 2000, 96),
        ("easyvqa", "meter-mini", "das", "fusion", 1, "FL0", 65.0, 2.1, -0.04, 0.5, 1990, 96),
    ], columns=["task", "backbone", "method", "scope", "k", "skipped", "test", "test_se", "add_gmacs", "gmacs",
                "trainable", "n_val"])
    write_table(df, "das/table_a", tmp_path)


# ------------------------------------------------------------------------------ missing
def test_missing_tables_say_which_stage_to_run(tmp_path):
    for fn, stage in ((rp.das_table_a, "das"), (rp.das_table_b, "das"), (rp.evlm_table3, "evlm"),
                      (rp.evlm_sweep, "evlm"), (rp.evlm_table2, "evlm"), (rp.sherl_cnn, "sherl"),
                      (rp.sherl_fig7, "sherl")):
        df = fn(tmp_path)
        assert rp.is_missing(df), fn.__name__
        assert df.status.tolist() == [f"not produced: run `dvc repro {stage}`"], fn.__name__
    assert rp.sherl_tab1(tmp_path, "vl").table.tolist() == ["sherl/tab1_vl"]
    assert rp.stage_of("pretrain/helps") == "helps" and rp.stage_of("baselines") == "baselines"
    assert rp.bench_summary(tmp_path / "bench").status[0] == "not produced: run `dvc repro bench`"
    with pytest.raises(UnknownNameError, match="text, vl"):
        rp.sherl_tab1(tmp_path, "audio")


def test_a_missing_table_still_writes_a_not_produced_line(tmp_path):
    df = rp.evlm_table3(tmp_path)
    _, md = write_table(df, "report/evlm_table3", tmp_path)
    assert "not produced: run `dvc repro evlm`" in md.read_text()


# ------------------------------------------------------------------------------ DAS
def test_das_table_a_picks_columns_and_scores_against_k0(tmp_path):
    _table_a(tmp_path)
    a = rp.das_table_a(tmp_path)
    assert "n_val" not in a and list(a.columns[:5]) == ["task", "backbone", "method", "scope", "k"]
    vilt = a[a.backbone == "vilt-mini"].set_index(["method", "k"])
    assert vilt.loc[("das", 0), "score_vs_k0"] == 0
    assert vilt.loc[("das", 1), "score_vs_k0"] == -3.0
    assert vilt.loc[("das", 2), "score_vs_k0"] == -10.0
    assert math.isnan(vilt.loc[("full", 0), "score_vs_k0"])  # full fine-tuning is no DAS cell
    assert vilt.gmacs_change_pct.tolist() == [10.0, 0.0, -15.0, -35.0]  # 100 add_gmacs / gmacs
    meter = a[a.backbone == "meter-mini"]
    assert meter.score_vs_k0.tolist() == [0.0, 5.0]  # against meter's own k = 0, not vilt's


def test_das_skip_effect_puts_ours_beside_the_paper(tmp_path):
    _table_a(tmp_path)
    t = rp.das_skip_effect(tmp_path, PAPER, "default")
    ours = t[(t.source == "ours (default)") & (t.model == "vilt-mini (global)")].set_index("k")
    # cost against the k = 0 model's GMACs: 0.2 + 0.02 = 0.22
    assert ours.loc[1, "cost_change_pct"] == pytest.approx(100 * (-0.03 - 0.02) / 0.22, abs=0.01)  # -22.73
    assert ours.loc[2, "cost_change_pct"] == pytest.approx(-40.91, abs=0.01)
    assert ours.loc[2, "score_change"] == -10.0
    pap = t[t.source.str.startswith("paper")].set_index("k")
    assert pap.loc[2, "score_change"] == -1.0 and pap.loc[2, "cost_change_pct"] == -25.0
    assert pap.loc[2, "cost"] == "inference time"


def test_das_skip_effect_without_our_table_says_so(tmp_path):
    t = rp.das_skip_effect(tmp_path, PAPER)
    assert t.loc[t.source == "ours", "model"].tolist() == ["not produced: run `dvc repro das`"]
    assert (t.source == "paper (official repo)").sum() == 2


def test_das_paper_gmacs_anchors(tmp_path):
    pg = pd.DataFrame([("vilt-b32", "global", 0, None, 22.0, 0.85), ("vilt-b32", "global", 1, "En11", 22.0, -0.95),
                       ("meter-clip16-roberta", "fusion", 0, None, 100.0, 1.6),
                       ("meter-clip16-roberta", "fusion", 2, "FL5 FV5", 100.0, -5.0)],
                      columns=["preset", "scope", "k", "skipped", "gmacs", "add_gmacs"])
    write_table(pg, "das/paper_gmacs", tmp_path)
    paper = rp.load_paper_numbers()
    t = rp.das_paper_gmacs(tmp_path, paper).set_index("quantity")
    assert t.loc["GMACs of one ViLT-B/32 layer", "ours"] == pytest.approx(1.8)  # 0.85 - (-0.95)
    assert t.loc["GMACs of one ViLT-B/32 layer", "paper"] == 1.76
    assert t.loc["net GMACs of skipping one ViLT-B/32 layer", "ours"] == pytest.approx(-0.95)
    assert t.loc["GMACs of the adapters beside one skipped layer", "ours"] == pytest.approx(0.85)  # -0.95 + 1.8
    meter = t[t.index.str.startswith("METER")]
    assert meter.ours.tolist() == [-5.0] and meter.paper.tolist() == [-11.97]  # k = 0 is no skip row


def test_das_table_b_difference(tmp_path):
    write_table(pd.DataFrame([{"backbone": "vilt-mini", "task": "easyvqa", "scope": "global", "k": 2,
                               "DAS mean": 76.5, "DAS sd": 3.0, "random mean": 70.25, "random sd": 9.0,
                               "verdict": "tie"}]), "das/table_b", tmp_path)
    b = rp.das_table_b(tmp_path)
    assert b["diff"].tolist() == [6.25] and b.verdict.tolist() == ["tie"]


# ------------------------------------------------------------------------------ EfficientVLM
def test_evlm_table3_ratios_against_the_same_tasks_teacher(tmp_path):
    t3 = pd.DataFrame([
        ("easyvqa", "teacher", None, 80.0, 50.0, 0.4), ("easyvqa", "EfficientVLM modal-adaptive", "global", 76.0,
                                                         20.0, 0.1),
        ("nlvr", "teacher", None, 50.0, 40.0, 0.8), ("nlvr", "EfficientVLM modal-adaptive", "global", 50.0, 20.0, 0.2),
    ], columns=["task", "method", "scope", "test", "params_M", "gmacs"])
    write_table(t3, "evlm/table3", tmp_path)
    t = rp.evlm_table3(tmp_path).set_index(["task", "method"])
    e = t.loc[("easyvqa", "EfficientVLM modal-adaptive")]
    assert (e.score_vs_teacher_pct, e.params_vs_teacher_pct, e.macs_ratio_vs_teacher) == (95.0, 40.0, 4.0)
    n = t.loc[("nlvr", "EfficientVLM modal-adaptive")]
    assert (n.score_vs_teacher_pct, n.params_vs_teacher_pct, n.macs_ratio_vs_teacher) == (100.0, 50.0, 4.0)
    o = rp.evlm_orientation(tmp_path, rp.load_paper_numbers())
    easy = o[o.task == "easyvqa"].set_index("quantity")
    assert easy.loc["parameters / teacher (%)", "ours"] == 40.0
    assert easy.loc["parameters / teacher (%)", "paper"] == 44.3
    assert easy.loc["score / teacher (%)", "paper"] == 98.4 and easy.loc["teacher / student cost (x)", "paper"] == 2.2


def test_evlm_sweep_names_the_budgets(tmp_path):
    write_table(pd.DataFrame({"task": ["easyvqa"] * 2, "target": [0.5, 0.5], "scope": ["global", "per_group"],
                              "sparsity": [0.5, 0.49], "test": [70.0, 72.0], "seed": [0, 0]}), "evlm/sweep", tmp_path)
    s = rp.evlm_sweep(tmp_path)
    assert s.budget.tolist() == ["modal-adaptive", "uniform"] and "seed" not in s


def test_evlm_table2_always_has_a_gpu_column(tmp_path):
    base = {"kind": ["mini"], "model": ["xvlm-mini"], "module": ["total"], "params_M": [48.0], "gmacs": [0.4]}
    write_table(pd.DataFrame({**base, "latency_ms cpu-2t": [12.5]}), "evlm/table2", tmp_path)
    t = rp.evlm_table2(tmp_path)
    assert t["latency_ms gpu"].tolist() == [NOT_MEASURED] and t["latency_ms cpu-2t"].tolist() == [12.5]
    write_table(pd.DataFrame({**base, "latency_ms cpu-2t": [12.5], "latency_ms h100": [1.5]}), "evlm/table2", tmp_path)
    assert "latency_ms gpu" not in rp.evlm_table2(tmp_path)


# ------------------------------------------------------------------------------ SHERL
def test_sherl_tab1_memory_ratios_against_full_of_the_same_task(tmp_path):
    tab = pd.DataFrame([
        ("movie_reviews", "minilm", "full", "defaults", 100.0, 800.0, 80.0),
        ("movie_reviews", "minilm", "adapter", "defaults", 2.0, 400.0, 77.0),
        ("movie_reviews", "minilm", "sherl", "defaults", 0.6, 200.0, 73.0),
        ("bbc_news", "minilm", "full", "defaults", 100.0, 1000.0, 90.0),
        ("bbc_news", "minilm", "sherl", "defaults", 0.6, 100.0, 85.0),
    ], columns=["task", "backbone", "method", "options", "params_pct", "est_mib", "test"])
    write_table(tab, "sherl/tab1_text", tmp_path)
    mem = pd.DataFrame([("movie_reviews", "minilm", "full", "defaults", 1000.0),
                        ("movie_reviews", "minilm", "sherl", "defaults", 250.0),
                        ("movie_reviews", "minilm", "sherl", "late_unit=False", 99.0)],  # another config: not joined
                       columns=["task", "backbone", "method", "options", "peak_mib"])
    write_table(mem, "sherl/memory", tmp_path)
    t = rp.sherl_tab1(tmp_path, "text")
    mr = t[t.task == "movie_reviews"].set_index("method")
    assert mr.est_vs_full.tolist() == [1.0, 0.5, 0.25]
    assert mr.loc["sherl", "peak_mib"] == 250.0 and mr.loc["sherl", "peak_vs_full"] == 0.25
    assert math.isnan(mr.loc["adapter", "peak_vs_full"])  # not measured
    bbc = t[t.task == "bbc_news"].set_index("method")
    assert bbc.loc["sherl", "est_vs_full"] == 0.1  # 100 / bbc's own full 1000, not movie reviews' 800
    assert math.isnan(bbc.loc["sherl", "peak_vs_full"])


def test_sherl_orientation_reads_the_bench_ratio_and_the_paper_ratio(tmp_path):
    write_bench("memory", "cpu-2t", {"rows": [{"preset": "t5-base", "method": "full", "mem_vs_full": 1.0},
                                              {"preset": "t5-base", "method": "sherl", "mem_vs_full": 0.2}]}, tmp_path)
    o = rp.sherl_orientation(tmp_path, tmp_path, rp.load_paper_numbers())
    t5 = o[o.quantity.str.endswith("t5-base")].set_index("device")
    assert t5.loc["cpu-2t", "ours"] == 0.2 and t5.loc["gpu", "ours"] == NOT_MEASURED
    assert t5.loc["cpu-2t", "paper"] == round(2.9 / 17.6, 3)  # 0.165
    bert = o[o.quantity.str.endswith("bert-base")].set_index("device")
    assert bert.loc["cpu-2t", "ours"] is None and math.isnan(bert.loc["cpu-2t", "paper"])  # no such row / no paper


# ------------------------------------------------------------------------------ benchmarks
def test_bench_summary_one_column_per_device(tmp_path):
    write_bench("prune_bert", "cpu-2t", {"batch_size": 1, "rows": [{"sparsity": 0.0, "speedup": 1.0},
                                                                   {"sparsity": 0.5, "speedup": 2.05}]}, tmp_path)
    s = rp.bench_summary(tmp_path, rp.load_paper_numbers())
    assert list(s.columns) == ["bench", "quantity", "cpu-2t", "gpu", "reference"]
    row = s.set_index("quantity").loc["speed-up at sparsity 0.5, bert-base batch 1 (x)"]
    assert row["cpu-2t"] == 2.05 and row["gpu"] == NOT_MEASURED and row["reference"] == "1.8 (issue5_prune50_bar)"
    assert "speed-up at sparsity 0, bert-base batch 1 (x)" not in set(s.quantity)  # the dense row is the baseline
    write_bench("memory", "h100", {"rows": [{"preset": "bert-base", "method": "sherl", "mem_vs_full": 0.2}]}, tmp_path)
    s = rp.bench_summary(tmp_path).set_index("quantity")
    assert list(s.columns) == ["bench", "cpu-2t", "h100", "reference"]  # a real GPU replaces the placeholder
    assert s.loc["sherl / full FT peak memory, bert-base", "cpu-2t"] == NOT_MEASURED
    assert s.loc["sherl / full FT peak memory, bert-base", "h100"] == 0.2
    assert s.loc["speed-up at sparsity 0.5, bert-base batch 1 (x)", "h100"] == NOT_MEASURED


# ------------------------------------------------------------------------------ stage times
def test_stage_times_against_budgets(tmp_path):
    t = tmp_path / "timings"
    write_json({"wall_s": 600.0}, "timings/20_das.default", tmp_path)
    write_json({"wall_s": 3000.0}, "timings/pretrain.default", tmp_path)
    write_json({"seconds": {"tab1": 60.0, "fig7": 120.0}}, "timings/sherl.default", tmp_path)  # no 30_sherl
    write_json({"wall_s": 60.0}, "timings/data.default", tmp_path)  # features missing: not timed
    write_json({"wall_s": 1.0}, "timings/01_data.ci", tmp_path)  # another profile: ignored
    st = rp.stage_times([t, tmp_path], "default").set_index("stage")
    assert st.loc["das", "measured_min"] == 10.0 and st.loc["das", "within_budget"] == "yes"
    assert st.loc["pretrain", "measured_min"] == 50.0 and st.loc["pretrain", "within_budget"] == "no"
    assert st.loc["sherl", "measured_min"] == 3.0 and "sum of sections" in st.loc["sherl", "source"]
    assert st.loc["data + features", "source"] == "not timed"
    assert st.loc["baselines", "source"] == "not timed" and st.loc["baselines", "within_budget"] == "–"
    assert st.budget_min.drop(["helps", "tour"]).tolist() == [15, 45, 10, 25, 30, 20, 5, 150]
    assert math.isnan(st.loc["helps", "budget_min"])  # no budget of its own
    # the total: every stage summed, judged only once nothing is missing
    assert st.loc["total", "measured_min"] == 10.0 + 50.0 + 3.0 and st.loc["total", "within_budget"] == "–"
    assert st.loc["total", "source"] == "sum; not timed: data + features, helps, baselines, evlm, report, tour"
    for name in ("features", "pretrain-helps", "01_data", "21_evlm", "90_report", "00_tour"):
        write_json({"wall_s": 60.0}, f"timings/{name}.default", tmp_path)
    st = rp.stage_times([t], "default").set_index("stage")
    assert st.loc["total", "measured_min"] == 63.0 + 2.0 + 5 * 1.0  # + data & features, five 1-minute stages
    assert st.loc["total", "within_budget"] == "yes" and st.loc["total", "source"] == "sum of the stages above"


# ------------------------------------------------------------------------------ paper numbers
def test_every_paper_number_has_a_source():
    paper = rp.load_paper_numbers()
    assert paper and all(str(e["source"]).strip() for e in paper.values())
    assert {e["kind"] for e in paper.values()} <= set(rp.PAPER_KINDS)
    assert paper["das_vilt_layer_gmacs"]["value"] == 1.76
    assert rp.paper_value(paper, "sherl_t5_full_gb") == 17.6
    with pytest.raises(UnknownNameError, match="das_vilt_layer_gmacs"):
        rp.paper_value(paper, "das_vilt_layer_gmac")
    assert list(rp.paper_numbers_table(paper).columns) == list(rp.PAPER_KEYS)


@pytest.mark.parametrize("text, match", [
    ("- {id: a, paper: P, quantity: q, value: 1, unit: x, kind: paper}\n", "'a' lacks source"),
    ("- {id: a, paper: P, quantity: q, value: 1, unit: x, kind: paper, source: ''}\n", "'a' lacks source"),
    ("- {id: a, paper: P, quantity: q, value: high, unit: x, kind: paper, source: s}\n", "non-numeric"),
    ("- {id: a, paper: P, quantity: q, value: 1, unit: x, kind: paper, source: s}\n" * 2, "duplicate"),
    ("- {id: a, paper: P, quantity: q, value: 1, unit: x, kind: memory, source: s}\n", "derived, issue"),
])
def test_bad_paper_numbers_are_rejected(tmp_path, text, match):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises((ValueError, UnknownNameError), match=match):
        rp.load_paper_numbers(f)


def test_write_index_collects_the_written_tables(tmp_path):
    write_table(pd.DataFrame({"a": [1]}), "x", tmp_path, note="note x")
    idx = rp.write_index(tmp_path, [("Table X", "x"), ("Table Y", "y")], intro="# Report")
    text = idx.read_text()
    assert text.startswith("# Report") and "## Table X" in text and "note x" in text
    assert "(y.md not written)" in text
