"""bench/bench_prune_xvlm.py on the ci profile's tiny X-VLMs: the models are Tab. 2's (keys,
student from teacher, half the heads and FFN units pruned), the per-module split follows the
modality tags and returns exactly ``backbone(**x)``, the time accounting by hand (a fake clock),
the written rows (every model x module, positive latency, params / GMACs as Tab. 2 counts them,
another device's file untouched, merge of ``--models`` subsets) and :func:`table_2` reading
them through ``latency_cell``. Tiny models, one timed call each: no wall-clock assertion."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch

from bench import bench_prune, bench_prune_xvlm as bx
from vlkit import config
from vlkit.bench_io import read_bench
from vlkit.methods.evlm import study as evlm_study
from vlkit.methods.evlm.study import ENCODERS, Study, latency_cell, table_2
from vlkit.models.protocol import Unit, UnknownNameError

MODULES = (*ENCODERS, "total")
PRUNED = "xvlm-clip-small pruned 50%"
NAMES = ["xvlm-mini", "xvlm-mini-half", "xvlm-clip", "xvlm-clip-small", PRUNED]


@pytest.fixture(scope="module")
def cfg():
    return config.resolve("evlm", "ci")


@pytest.fixture(scope="module")
def models(cfg):
    return bx.build_models(cfg)


@pytest.fixture(scope="module")
def acct(models):
    return {lb: bx.accounting(m) for lb, m in models.items()}


@pytest.fixture
def threads():
    """Restore torch's thread count after a test that runs the bench (it sets it)."""
    n = torch.get_num_threads()
    yield 1
    torch.set_num_threads(n)


def run(models, acct, tmp_path, **kw):
    args = dict(profile="ci", rounds=1, repeats=1, warmup=0, threads=1, results_dir=tmp_path, order=NAMES)
    return bx.run_device("cpu", models, acct, **{**args, **kw})


# ---------------------------------------------------------------------------- the models
def test_model_names_are_table_2_keys(cfg, models):
    assert bx.model_names(cfg) == NAMES == list(models)
    assert evlm_study.pruned_label("xvlm-clip-small", 0.5) == PRUNED
    with pytest.raises(UnknownNameError, match="'xvlm-clip-tiny'"):
        bx.build_models(cfg, ["xvlm-clip-tiny"])


def test_models_are_the_tab2_models(models):
    teacher, student = models["xvlm-mini"], models["xvlm-mini-half"]
    assert student.unit_names == ["VEn0", "LEn0", "F0"]  # the ci teacher is 2/2/2
    for s, t in (("VEn0", "VEn1"), ("LEn0", "LEn1"), ("F0", "F1")):  # student layer i = teacher layer 2i + 1
        sd, td = student.unit(s).state_dict(), teacher.unit(t).state_dict()
        assert all(torch.equal(sd[k], td[k]) for k in sd), (s, t)
    small, pruned = models["xvlm-clip-small"], models[PRUNED]
    assert pruned.unit_names == small.unit_names == ["VEn0", "LEn0", "F0"]
    for name in pruned.unit_names:  # ci widths: 4 heads, FFN 128 -> 2 heads, 64 units
        layer = pruned.unit(name)
        assert (layer.attn.num_heads, layer.ffn.fc1.out_features) == (2, 64)
    assert pruned.unit("F0").cross_attn.num_heads == 2
    assert small.unit("F0").cross_attn.num_heads == 4  # pruning copied, the source is intact


def test_one_uniform_masks(models):
    """bench_prune, the study and this bench share one uniform_masks (vlkit.methods.evlm.prune)."""
    assert bench_prune.uniform_masks is evlm_study.uniform_masks is bx.uniform_masks
    masks = bx.uniform_masks(models["xvlm-clip"], 0.5)
    assert masks["F1"]["cross_heads"].tolist() == [True, True, False, False]
    assert int(masks["VEn0"]["ffn"].sum()) == 64


# ---------------------------------------------------------------------------- the split pass
def test_segments_follow_the_modality_tags(models):
    assert bx.segments(models["xvlm-clip"]) == [("vision", 0, 2), ("text", 2, 4), ("fusion", 4, 6)]
    assert bx.segments(models[PRUNED]) == [("vision", 0, 1), ("text", 1, 2), ("fusion", 2, 3)]
    interleaved = SimpleNamespace(units=[Unit("a", "vision", None), Unit("b", "text", None),
                                         Unit("c", "text", None), Unit("d", "vision", None)])
    assert bx.segments(interleaved) == [("vision", 0, 1), ("text", 1, 3), ("vision", 3, 4)]
    with pytest.raises(UnknownNameError, match="'joint'"):
        bx.segments(SimpleNamespace(units=[Unit("En0", "joint", None)]))


@pytest.mark.parametrize("name", NAMES)
def test_split_forward_equals_the_plain_forward(models, name):
    m = models[name]
    x = m.dummy_inputs(2)
    with torch.inference_mode():
        out, wall, cpu = bx.split_forward(m, x)
        ref = m(**x)
    torch.testing.assert_close(out.pooled, ref.pooled, atol=1e-6, rtol=0)
    assert set(out.sequences) == set(ref.sequences) == {"vision", "text"}
    for k in ref.sequences:
        torch.testing.assert_close(out.sequences[k], ref.sequences[k], atol=1e-6, rtol=0)
    assert set(wall) == set(cpu) == set(ENCODERS) and all(wall[k] > 0 for k in ENCODERS)
    emb = m.text_embeddings  # the timing hooks are gone
    assert not emb._forward_hooks and not emb._forward_pre_hooks and not m.pooler._forward_hooks


@pytest.mark.parametrize("name", ["xvlm-mini", "xvlm-clip"])
def test_split_accounting_by_hand(models, name):
    """A clock that advances 1 s (10 s of CPU) per reading: readings 0 (embed starts), 1 / 2
    (the text embedding's hooks), 3 (embed ends), 4 / 5 / 6 (after the vision, text and
    fusion units), 7 (after finalize). vision = (3 - 0) - (2 - 1) + (4 - 3) = 3, text =
    (2 - 1) + (5 - 4) = 2, fusion = (6 - 5) + (7 - 6) = 2."""
    ticks = itertools.count()

    def now():
        t = next(ticks)
        return float(t), 10.0 * t

    with torch.inference_mode():
        _, wall, cpu = bx.split_forward(models[name], models[name].dummy_inputs(1), now)
    assert wall == {"vision": 3.0, "text": 2.0, "fusion": 2.0}
    assert cpu == {"vision": 30.0, "text": 20.0, "fusion": 20.0}
    assert next(ticks) == 8  # no other reading


# ---------------------------------------------------------------------------- the written rows
def test_rows_and_table_2_reads_them(models, acct, cfg, tmp_path, monkeypatch, threads):
    monkeypatch.setattr(bx, "device_tag", lambda device: "cpu-2t")  # the CPU tag Tab. 2 reads
    other = tmp_path / "prune_xvlm.h100.json"
    other.write_text(json.dumps({"rows": []}) + "\n")
    before = other.read_bytes()
    payload = run(models, acct, tmp_path, threads=threads)
    assert other.read_bytes() == before  # another device's file is never touched
    saved = read_bench("prune_xvlm", "cpu-2t", tmp_path)
    assert saved["rows"] == payload["rows"] and (tmp_path / "prune_xvlm.cpu-2t.md").exists()
    rows = {(r["model"], r["module"]): r for r in saved["rows"]}
    assert [(r["model"], r["module"]) for r in saved["rows"]] == [(n, m) for n in NAMES for m in MODULES]
    for (name, module), r in rows.items():
        assert r["latency_ms"] > 0 and r["min_ms"] > 0 and r["calls"] == 1, (name, module)
        assert (r["params_M"], r["gmacs"]) == (acct[name][module]["params_M"], acct[name][module]["gmacs"])
    for name in NAMES:
        parts = sum(rows[(name, m)]["latency_ms"] for m in ENCODERS)
        assert rows[(name, "total")]["latency_ms"] == pytest.approx(parts, abs=4e-4)  # one call: total = sum
        assert rows[(name, "total")]["plain_ms"] > 0
        assert rows[(name, "vision")]["gmacs"] > 0 and rows[(name, "text")]["params_M"] > 0
    for module in MODULES:
        assert latency_cell("prune_xvlm", "cpu-2t", PRUNED, module, tmp_path) == rows[(PRUNED, module)]["latency_ms"]

    # Tab. 2 of the ci study finds every row, and counts the same params and GMACs
    t2 = table_2(Study(cfg, "ci", log=lambda m: None), results_dir=tmp_path).to_dict("records")
    assert {r["model"] for r in t2} == {*NAMES[:4], f"{PRUNED} (uniform)"}
    for r in t2:
        bench = rows[(r["model"].removesuffix(" (uniform)"), r["module"])]
        assert r["latency_ms cpu-2t"] == bench["latency_ms"], r
        assert (r["params_M"], r["gmacs"]) == (bench["params_M"], bench["gmacs"]), r
        assert r["latency_ms h100"] == "not measured"


def test_models_subset_merges_with_the_devices_file(models, acct, tmp_path, threads):
    first = run({k: models[k] for k in NAMES[:2]}, acct, tmp_path, threads=threads)
    old = {(r["model"], r["module"]): r for r in first["rows"]}
    second = run({"xvlm-clip": models["xvlm-clip"]}, acct, tmp_path, threads=threads)
    assert [(r["model"], r["module"]) for r in second["rows"]] == [(n, m) for n in NAMES[:3] for m in MODULES]
    assert all(r == old[(r["model"], r["module"])] for r in second["rows"] if r["model"] != "xvlm-clip")
    assert set(second["per_model"]) == set(NAMES[:3])
    # another profile's rows are not merged (same names, other models); --no-merge drops them too
    other = run({"xvlm-clip": models["xvlm-clip"]}, acct, tmp_path, threads=threads, profile="default")
    assert {r["model"] for r in other["rows"]} == {"xvlm-clip"}
    alone = run({"xvlm-mini": models["xvlm-mini"]}, acct, tmp_path, threads=threads, profile="default", merge=False)
    assert {r["model"] for r in alone["rows"]} == {"xvlm-mini"}


def test_cli_smoke_and_errors(tmp_path, threads, capsys):
    args = ["--profile", "ci", "--device", "cpu", "--threads", "1", "--rounds", "1", "--repeats", "1",
            "--warmup", "0", "--results-dir", str(tmp_path)]
    assert bx.main([*args, "--models", "xvlm-mini-half"]) == 0
    saved = read_bench("prune_xvlm", "cpu-1t", tmp_path)
    assert saved["profile"] == "ci" and saved["threads"] == 1 and saved["batch_size"] == 1
    assert [(r["model"], r["module"]) for r in saved["rows"]] == [("xvlm-mini-half", m) for m in MODULES]
    assert saved["per_model"]["xvlm-mini-half"]["text_tokens"] == 40
    with pytest.raises(SystemExit):
        bx.main([*args, "--models", "xvlm-clip-tiny"])
    assert "xvlm-clip-tiny" in capsys.readouterr().err
