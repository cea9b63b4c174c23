"""Benchmark result files: per-device isolation, atomic writes, "not measured" cells."""

import json
import os

import pytest

from vlkit import bench_io
from vlkit.bench_io import NOT_MEASURED, bench_cell, bench_devices, read_bench, write_bench
from vlkit.models.protocol import UnknownNameError

PAYLOAD = {
    "bench": "speed",
    "rows": [{"model": "vilt-b32", "median_s": 0.0123, "gmacs": 21.6, "note": None},
             {"model": "bert-base", "median_s": 0.5, "gmacs": 11.2, "extra": "a|b"}],
    "meta": {"threads": 2, "nested": [1, 2.5, "x"]},
}


def test_json_round_trips_and_markdown_renders_rows(tmp_path):
    path = write_bench("speed", "cpu-2t", PAYLOAD, results_dir=tmp_path)
    assert path == tmp_path / "speed.cpu-2t.json"
    assert read_bench("speed", "cpu-2t", tmp_path) == PAYLOAD
    assert json.loads(path.read_text()) == PAYLOAD
    md = (tmp_path / "speed.cpu-2t.md").read_text().splitlines()
    assert md[0] == "# speed -- cpu-2t"
    assert md[2] == "| model | median_s | gmacs | note | extra |"
    assert md[4] == "| vilt-b32 | 0.0123 | 21.6 |  |  |"
    assert md[5] == "| bert-base | 0.5 | 11.2 |  | a\\|b |"
    assert sorted(os.listdir(tmp_path)) == ["speed.cpu-2t.json", "speed.cpu-2t.md"]  # no temp files left


def test_writing_one_device_never_touches_another(tmp_path):
    gpu = {"rows": [{"model": "vilt-b32", "median_s": 0.002}]}
    write_bench("speed", "h100", gpu, results_dir=tmp_path)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    write_bench("speed", "cpu-2t", PAYLOAD, results_dir=tmp_path)
    write_bench("speed", "cpu-2t", {"rows": []}, results_dir=tmp_path)  # overwrite own file
    for name, (data, mtime) in before.items():
        p = tmp_path / name
        assert (p.read_bytes(), p.stat().st_mtime_ns) == (data, mtime)
    assert read_bench("speed", "h100", tmp_path) == gpu
    assert read_bench("speed", "cpu-2t", tmp_path) == {"rows": []}
    assert bench_devices("speed", tmp_path) == ["cpu-2t", "h100"]


def test_absent_device_is_not_measured(tmp_path):
    write_bench("speed", "cpu-2t", PAYLOAD, results_dir=tmp_path)
    assert read_bench("speed", "h200", tmp_path) is None
    assert bench_cell("speed", "h200", "meta", tmp_path) == NOT_MEASURED == "not measured"
    assert bench_cell("speed", "cpu-2t", ("meta", "threads"), tmp_path) == 2
    assert bench_cell("speed", "cpu-2t", ("rows", 1, "gmacs"), tmp_path) == 11.2
    with pytest.raises(UnknownNameError, match="'thread'.*threads"):
        bench_cell("speed", "cpu-2t", ("meta", "thread"), tmp_path)  # a typo is not "not measured"


def test_stale_markdown_is_removed_when_rows_go(tmp_path):
    write_bench("mem", "cpu-2t", PAYLOAD, results_dir=tmp_path)
    write_bench("mem", "cpu-2t", {"gib": 0.25}, results_dir=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["mem.cpu-2t.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    write_bench("speed", "cpu-2t", PAYLOAD, results_dir=tmp_path)
    with pytest.raises(ValueError, match="non-finite"):
        write_bench("speed", "cpu-2t", {"median_s": float("nan")}, results_dir=tmp_path)
    with pytest.raises(TypeError):
        write_bench("speed", "cpu-2t", {"x": object()}, results_dir=tmp_path)
    assert read_bench("speed", "cpu-2t", tmp_path) == PAYLOAD
    assert sorted(os.listdir(tmp_path)) == ["speed.cpu-2t.json", "speed.cpu-2t.md"]


@pytest.mark.parametrize("bench,device", [("speed.v2", "cpu-2t"), ("speed", "cpu.2t"), ("../x", "h100"), ("", "h100")])
def test_bad_names_are_rejected(tmp_path, bench, device):
    with pytest.raises(ValueError, match="bad (bench|device) name"):
        write_bench(bench, device, {}, results_dir=tmp_path)


def test_default_folder_is_results_bench():
    assert bench_io.bench_path("speed", "h100") == bench_io.RESULTS_DIR / "bench" / "speed.h100.json"
