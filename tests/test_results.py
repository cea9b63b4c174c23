"""Result files: atomic writes and deterministic tables."""

import json
import os

import pandas as pd
import pytest

from vlkit import results


def test_write_table_writes_csv_and_markdown(tmp_path):
    df = pd.DataFrame({"method": ["a", "b"], "acc": [0.5, 0.25], "params": [None, 3]})
    csv, md = results.write_table(df, "sub/t", tmp_path, note="measured")
    assert pd.read_csv(csv).equals(df.astype({"params": float}))
    text = md.read_text()
    assert "| method" in text and "0.25" in text and text.rstrip().endswith("measured")
    assert "nan" not in text.lower() and "–" in text
    # same table twice -> byte-identical files
    first = csv.read_bytes()
    results.write_table(df, "sub/t", tmp_path)
    assert csv.read_bytes() == first


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    results.write_json({"a": 1}, "x", tmp_path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        results.write_json({"a": 2}, "x", tmp_path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_stage_timer_records_wall_time(tmp_path):
    with results.stage_timer("tour", "ci", tmp_path):
        pass
    rec = json.loads((tmp_path / "timings" / "tour.ci.json").read_text())
    assert rec["stage"] == "tour" and rec["profile"] == "ci" and rec["wall_s"] >= 0


def test_ci_profile_never_writes_into_committed_results():
    from vlkit.paths import RESULTS_DIR

    assert results.results_dir("default") == RESULTS_DIR
    assert RESULTS_DIR not in results.results_dir("ci").parents and results.results_dir("ci") != RESULTS_DIR
