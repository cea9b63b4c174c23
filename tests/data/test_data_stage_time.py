"""The data and features stages record their wall time like every other stage."""

import json

import vlkit.results as results
from vlkit.data.stage import stage_time


def test_stage_time_writes_the_timing_file_for_a_profile(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "results_dir", lambda profile=None: tmp_path)
    with stage_time("features", "ci"):
        pass
    rec = json.loads((tmp_path / "timings" / "features.ci.json").read_text())
    assert rec["stage"] == "features" and rec["profile"] == "ci" and rec["wall_s"] >= 0


def test_stage_time_without_a_profile_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "results_dir", lambda profile=None: tmp_path)
    with stage_time("data", None):
        pass
    assert not (tmp_path / "timings").exists()
