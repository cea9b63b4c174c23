"""The pre-training-helps comparison (vlkit.tasks.helps) and the baselines table's reuse of its
runs (vlkit.tasks.baselines: fingerprints)."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import torch

from vlkit.tasks import baselines as B
from vlkit.tasks.helps import helps_table


def test_helps_table_pairs_rows_and_differences():
    def table(test, se, val):
        return pd.DataFrame([{"task": "shapes_nlvr", "backbone": "vilt-mini", "method": "full", "metric": "accuracy",
                              "n_train": 2048, "steps": 64, "n_val": 500, "n_test": 1000, "val": val, "val_se": 2.0,
                              "test": test, "test_se": se},
                             {"task": "shapes_nlvr", "backbone": "vilt-mini", "method": "linear_probe",
                              "metric": "accuracy", "n_train": 2048, "steps": 64, "n_val": 500, "n_test": 1000,
                              "val": 0.0, "val_se": 0.0, "test": 0.0, "test_se": 0.0}])

    out = helps_table(table(80.0, 1.2, 79.0), table(70.0, 1.6, 71.0))
    assert len(out) == 1  # full fine-tuning rows only
    row = out.iloc[0]
    assert row["test pre"] == 80.0 and row["test none"] == 70.0 and row["test diff"] == 10.0
    assert row["diff_se"] == 2.0 and row["val diff"] == 8.0 and row["helps"] == "yes"
    assert helps_table(table(71.0, 1.2, 0), table(70.0, 1.6, 0)).iloc[0]["helps"] == "yes (< 2 SE)"
    assert helps_table(table(69.0, 1.2, 0), table(70.0, 1.6, 0)).iloc[0]["helps"] == "no"


def _weights(tmp_path, name, content):
    d = tmp_path / name
    d.mkdir()
    (d / "meta.json").write_text(json.dumps(content))
    return str(d)


def test_fingerprint_same_run_same_hash_any_input_changed_new_hash(tmp_path):
    """The helps stage's configuration of a pre-trained preset (other backbones / tasks /
    methods lists, its own weights path, threads unset) fingerprints a row exactly as the
    baselines table's does -- what lets the table reuse it; each input that decides the
    numbers (settings, gallery, weights' content, overrides, seed, profile) changes it."""
    w = _weights(tmp_path, "a", {"params_hash": "x", "steps": 500})
    table = B.BaselinesConfig(weights={"vilt-mini": w, "xvlm-mini": w},
                              task_settings={"shapes_nlvr": {"train": 2000, "epochs": 3, "lr": 1e-4}})
    helps_cfg = dataclasses.replace(table, backbones=["vilt-mini"], tasks=["shapes_nlvr"], text_backbones=[],
                                    text_tasks=[], methods=["full"], threads=None,
                                    weights={"vilt-mini": _weights(tmp_path, "copy", {"params_hash": "x", "steps": 500})})
    fp = B.run_fingerprint(table, "shapes_nlvr", "vilt-mini", "full", 0, "default")
    assert B.run_fingerprint(helps_cfg, "shapes_nlvr", "vilt-mini", "full", 0, "default") == fp
    changed = [
        dataclasses.replace(table, task_settings={"shapes_nlvr": {"train": 2000, "epochs": 3, "lr": 2e-4}}),
        dataclasses.replace(table, gallery={"rerank_k": 8}),
        dataclasses.replace(table, overrides={"vilt-mini": {"layers": 1}}),
        dataclasses.replace(table, weights={"vilt-mini": _weights(tmp_path, "b", {"params_hash": "x", "steps": 501})}),
        dataclasses.replace(table, weights={}),
    ]
    fps = {B.run_fingerprint(c, "shapes_nlvr", "vilt-mini", "full", 0, "default") for c in changed}
    fps |= {B.run_fingerprint(table, "shapes_nlvr", "vilt-mini", "full", 1, "default"),
            B.run_fingerprint(table, "shapes_nlvr", "vilt-mini", "full", 0, "ci"),
            B.run_fingerprint(table, "shapes_nlvr", "vilt-mini", "linear_probe", 0, "default"),
            B.run_fingerprint(table, "easyvqa", "vilt-mini", "full", 0, "default")}
    assert fp not in fps and len(fps) == len(changed) + 4
    # the derived student is identified by its teacher's weights
    half = B.run_fingerprint(table, "shapes_nlvr", "xvlm-mini-half", "full", 0, "default")
    other_teacher = dataclasses.replace(table, weights={"xvlm-mini": _weights(tmp_path, "t", {"steps": 1})})
    assert B.run_fingerprint(other_teacher, "shapes_nlvr", "xvlm-mini-half", "full", 0, "default") != half


def test_run_baselines_copies_fingerprinted_rows_instead_of_training(monkeypatch):
    """A second table given the first one's rows trains nothing and is identical; one
    changed setting trains its rows again."""
    from vlkit.tasks.data import TaskData

    texts = [[101, 7 if i % 2 else 8, 102] for i in range(20)]
    examples = [{"ids": t, "label": i % 2} for i, t in enumerate(texts)]
    data = {s: TaskData("movie_reviews", s, examples, None, list(range(20)), 20) for s in ("train", "val", "test")}
    calls = []

    def fake_finetune(spec, model, method, *, data, train_config, seed, eval_splits, head_lr_mult):
        calls.append(method)
        score = {"score": 90.0 if method == "full" else 60.0, "se": 1.5, "n": 20}
        return {"test": score, "val": score, "n_train": 20, "steps": 3, "trainable": {"backbone": 5, "head": 2},
                "train_seconds": 0.0, "eval_seconds": 0.0}

    monkeypatch.setattr(B, "finetune", fake_finetune)
    monkeypatch.setattr(B, "load_task_data", lambda task, cfg, profile: data)
    monkeypatch.setattr(B, "load_backbone", lambda name, cfg, built=None: (torch.nn.Linear(1, 1), "yes"))
    cfg = B.BaselinesConfig(backbones=[], tasks=[], text_backbones=["minilm"], text_tasks=["movie_reviews"])
    first, _ = B.run_baselines(cfg, "default", log=None)
    assert calls == ["full", "linear_probe"]
    again, timings = B.run_baselines(cfg, "default", log=None, reuse=pd.read_csv(pd.io.common.StringIO(
        first.to_csv(index=False))))  # as the stage reads it: through a CSV file
    assert calls == ["full", "linear_probe"]  # nothing trained
    assert [r.get("reused") for r in timings["rows"]] == list(first["fingerprint"].dropna())
    pd.testing.assert_frame_equal(again, first, check_dtype=False)
    B.run_baselines(dataclasses.replace(cfg, train={"lr": 5e-4}), "default", log=None, reuse=first)
    assert calls == ["full", "linear_probe"] * 2
