"""SHERL beyond Transformers (Sec. 3.3, Fig. 3b) on the ImageNet effnet-lite0: the stages become
shallow features with their own widths (parameter count by hand), the frozen prefix builds no
graph, the output equals a hand-assembled reference (pooling by hand, gate 0: the merged map
replaces the last stage's input), the pooled-token reshaping round-trips, BatchNorm statistics
stay frozen, the prefix cache works, unsupported options fail; and the CNN table's pieces
(settings checks, image data, memory orderings by hand, the peak target, a tiny study run)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlkit import config
from vlkit.efficiency import params
from vlkit.methods.feature_cache import PrefixCache
from vlkit.methods.sherl import apply_sherl, from_tokens, pool_tokens, to_tokens
from vlkit.methods.sherl_study import (CNN_DEFAULTS, _cnn_model, cnn_settings, cnn_train_step_memory, image_task,
                                       image_task_data, memory_accounting, study_cnn)
from vlkit.models import build
from vlkit.models.protocol import State, UnknownNameError
from vlkit.nn.mtsa import mtsa_num_parameters

WIDTHS = (16, 24, 40, 80, 112, 192)  # Stage0..Stage5 output channels (Tan & Le Table 1, stages 2-7)
MIB = 2**20


@pytest.fixture(scope="module")
def cnn():
    return build("effnet-lite0")


def pixels(batch=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randint(0, 256, (batch, 3, size, size), generator=g).float()}


class SavedCounter:
    """Counts the tensors autograd saves for backward."""

    def __enter__(self):
        self.count = 0

        def pack(t):
            self.count += 1
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ------------------------------------------------------------------------- tokens and pooling
def test_tokens_round_trip_in_row_major_order():
    x = torch.randn(2, 5, 3, 4)
    t = to_tokens(x)
    assert t.shape == (2, 12, 5)
    assert torch.equal(t[1, 2 * 4 + 3], x[1, :, 2, 3])  # token i*W + j is position (i, j)
    assert torch.equal(from_tokens(t, (3, 4)), x)
    assert torch.equal(to_tokens(from_tokens(t, (3, 4))), t)
    with pytest.raises(ValueError, match=r"\(B, 6, C\) tokens for a 2x3 map, got shape \(2, 12, 5\)"):
        from_tokens(t, (2, 3))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) maps, got shape \(2, 12, 5\)"):
        to_tokens(t)


def test_pool_tokens_by_hand():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    # 2x2 blocks: mean of {0,1,4,5} = 2.5, {2,3,6,7} = 4.5, {8,9,12,13} = 10.5, {10,11,14,15} = 12.5
    assert pool_tokens(x, (2, 2)).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    # 5 -> 2 (adaptive windows [0, 3) and [2, 5), overlapping): top-left = mean of rows/cols 0..2
    y = torch.arange(25.0).reshape(1, 1, 5, 5)
    assert pool_tokens(y, (2, 2))[0, 0, 0].item() == pytest.approx(np.arange(25.0).reshape(5, 5)[:3, :3].mean())
    z = torch.randn(2, 3, 2, 2)
    assert torch.equal(pool_tokens(z, (2, 2)), to_tokens(z))  # already at the size: untouched


# ------------------------------------------------------------------------- the wrapper
def test_stages_are_the_shallow_features_with_their_own_widths(cnn):
    model = apply_sherl(copy.deepcopy(cnn))
    assert model.spatial and model.stop == 6 and model.late_names == ["Stage6"]
    assert model.feature_keys == [f"Stage{i}" for i in range(6)]
    m = model.mtsa[0]
    assert m.in_dims == WIDTHS and m.dim == 192 and m.hidden == 24
    assert [t.down.in_features for t in m.tiers] == list(WIDTHS)
    # by hand, d = 192 / 8 = 24: tiers sum_i (D_i*24 + 24 + 2*24² + 2*24) = 24*464 + 6*1224 = 18,480;
    # up 24*192 + 192 = 4,800; gate 1
    assert sum(p.numel() for p in model.trainable.values()) == 23_281 == mtsa_num_parameters(192, 6, 8,
                                                                                          in_dims=WIDTHS)
    stem = apply_sherl(copy.deepcopy(cnn), features="embed+units")
    assert stem.feature_keys[0] == "embed:vision" and stem.mtsa[0].in_dims == (32, *WIDTHS)
    assert sum(p.numel() for p in stem.trainable.values()) == 23_281 + 32 * 24 + 1224


def test_prefix_builds_no_graph_and_gradients_reach_only_the_mtsa(cnn):
    model = apply_sherl(copy.deepcopy(cnn))
    model.backbone.requires_grad_(True)  # enforced by no_grad, not by the frozen flags
    with torch.enable_grad(), SavedCounter() as saved:
        state, record = model.prefix(**pixels())
    assert saved.count == 0 and set(record) == {f"Stage{i}" for i in range(6)}
    for t in [*record.values(), *state.streams.values()]:
        assert not t.requires_grad and t.grad_fn is None
    model.backbone.requires_grad_(False)
    with SavedCounter() as late:
        out = model.from_prefix(state, record)
    assert late.count > 0  # the MTSA, Stage6 and the head conv keep activations
    out.pooled.square().sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mtsa.parameters())


@pytest.mark.parametrize("size,grid", [(64, 2), (128, 4)])
def test_output_equals_hand_assembled_reference_gate_zero_then_open(cnn, size, grid):
    model = apply_sherl(copy.deepcopy(cnn))
    bb, x, m = model.backbone, pixels(size=size), model.mtsa[0]
    assert m.gate().item() == 0.0

    def reference(gate):
        with torch.no_grad():
            rec = {}
            st = bb.run_units(bb.embed(**x), 0, 6, record=rec)
            x_last = st.streams["vision"]
            assert x_last.shape == (2, 192, grid, grid)  # the resolution of Stage6's input
            feats = [F.adaptive_avg_pool2d(rec[f"Stage{i}"], (grid, grid)).flatten(2).transpose(1, 2)
                     for i in range(6)]
            merged = m.up(m.aggregate(*m.project(feats)))  # (B, grid², 192), no x_last at all
            maps = merged.transpose(1, 2).reshape(2, 192, grid, grid) + gate * x_last
            return bb.finalize(bb.run_units(State(streams={"vision": maps}, masks={"vision": None}), 6, 7))

    with torch.no_grad():
        out = model(**x)
    assert out.pooled.shape == (2, 1280)
    torch.testing.assert_close(out.pooled, reference(0.0).pooled)
    # gate 0: the usual input of Stage6 does not enter -- any map there gives the same output
    with torch.no_grad():
        state, record = model.prefix(**x)
        noisy = state.copy()
        noisy.streams["vision"] = torch.randn_like(state.streams["vision"])
        torch.testing.assert_close(model.from_prefix(noisy, record).pooled, out.pooled)
        m.alpha.fill_(0.05)  # gate tanh(0.5)
        opened = model(**x).pooled
        assert not torch.allclose(model.from_prefix(noisy, record).pooled, opened)
    torch.testing.assert_close(opened, reference(torch.tanh(torch.tensor(0.5))).pooled)


def test_batchnorm_statistics_stay_frozen_through_training(cnn):
    model = apply_sherl(copy.deepcopy(cnn)).train()
    assert model.training and not any(mod.training for mod in model.backbone.modules())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable.values(), lr=1e-2)
    model(**pixels(4)).pooled.sum().backward()
    opt.step()
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running statistics


def test_prefix_cache_serves_the_cnn(cnn, tmp_path):
    model = apply_sherl(copy.deepcopy(cnn))
    x = pixels(5)
    cache = PrefixCache(model, tmp_path / "c").build(x, batch_size=2)
    idx = [4, 1]
    with torch.no_grad():
        from_cache = model.from_prefix(*cache.batch(idx)).pooled
        direct = model(pixel_values=x["pixel_values"][idx]).pooled
    torch.testing.assert_close(from_cache, direct)


def test_unsupported_options_on_a_cnn(cnn):
    for kw, what in (({"insert_last": 2}, "insert_last > 1"), ({"late_unit": False}, "late_unit=False"),
                     ({"late_dropout": True}, "late_dropout=True"),
                     ({"regulate_context": True}, "regulate_context=True")):
        with pytest.raises(ValueError, match=f"map stream 'vision'.*{what}"):
            apply_sherl(copy.deepcopy(cnn), **kw)
    with pytest.raises(ValueError, match="reduction factor 7 does not divide the width 192"):
        apply_sherl(copy.deepcopy(cnn), reduction=7)


# ------------------------------------------------------------------------- the CNN table
def test_cnn_settings_defaults_and_errors():
    s = cnn_settings(None)
    assert s == CNN_DEFAULTS and s is not CNN_DEFAULTS
    assert cnn_settings({"epochs": None, "steps": 5})["steps"] == 5
    bad = [({"epoch": 3}, UnknownNameError, "'epoch'.*epochs, steps"),
           ({"methods": ["full", "lora"]}, UnknownNameError, "'lora'.*full, linear_probe, sherl"),
           ({"methods": []}, ValueError, "list of methods"),
           ({"memory_methods": ["prompt"]}, UnknownNameError, "'prompt'"),
           ({"backbone": "vilt-mini"}, UnknownNameError, "'vilt-mini'.*effnet-lite0"),
           ({"dataset": "shapes_nlvr"}, UnknownNameError, "'shapes_nlvr'.*shapes_count"),
           ({"data": {"n_trian": 5}}, UnknownNameError, "shapes_count knob 'n_trian'"),
           ({"data": {"counts": [3, 3]}}, ValueError, r"counts=\[3, 3\]"),
           ({"sherl_options": {"reductio": 4}}, UnknownNameError, "'reductio'.*reduction"),
           ({"sherl_options": {"seed": 4}}, UnknownNameError, "'seed'"),
           ({"steps": 5}, ValueError, "exactly one of epochs and steps"),
           ({"lr": 0}, ValueError, "sherl.cnn.lr must be a positive number, got 0"),
           ({"batch_size": 2.5}, ValueError, "sherl.cnn.batch_size must be a positive int"),
           ({"warmup": 1.0}, ValueError, r"warmup must be a fraction in \[0, 1\)")]
    for cnn, err, match in bad:
        with pytest.raises(err, match=match):
            cnn_settings(cnn)
    with pytest.raises(UnknownNameError, match="'bogus'"):
        config.resolve("sherl", "ci", cnn={"bogus": 1})
    for profile in ("ci", "default"):  # params.yaml's blocks resolve
        s = config.resolve("sherl", profile).cnn_settings()
        assert s["methods"] == ["full", "linear_probe", "sherl"] and s["data"]["n_train"] >= 32


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    import os

    old = os.environ.get("VLKIT_DATA_DIR")
    os.environ["VLKIT_DATA_DIR"] = str(tmp_path_factory.mktemp("vlkit-data"))
    try:
        knobs = {"n_train": 12, "n_val": 2, "n_test": 8}
        yield knobs, {s: image_task_data("shapes_count", s, seed=3, knobs=knobs) for s in ("train", "test")}
    finally:
        if old is None:
            os.environ.pop("VLKIT_DATA_DIR")
        else:
            os.environ["VLKIT_DATA_DIR"] = old


def test_image_task_data_and_collate(tiny_data):
    from vlkit.data import load

    knobs, data = tiny_data
    train = data["train"]
    ds = load("shapes_count", "train", seed=3, **knobs)
    assert len(train) == 12 and train.meta["classes"] == ["1", "2", "3", "4"]
    assert train.labels().tolist() == [c - 1 for c in ds["count"]]
    assert torch.equal(train[5]["pixels"], torch.from_numpy(np.array(ds[5]["image"])).permute(2, 0, 1))
    batch = train.collate(train.examples[:3])
    assert batch["pixel_values"].shape == (3, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].max() <= 255 and batch["labels"].tolist() == train.labels()[:3].tolist()


def test_cnn_memory_accounting_by_hand_and_orderings(cnn):
    spec = image_task(4)
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randint(0, 256, (4, 3, 64, 64), generator=g).float(),
             "labels": torch.tensor([0, 1, 2, 3])}
    acc = {m: memory_accounting(spec, _cnn_model(copy.deepcopy(cnn), m, {}, 4), batch)
           for m in ("full", "linear_probe", "sherl")}
    backbone, head, mtsa = params(cnn), 1280 * 4 + 4, 23_281
    assert backbone == 3_371_008
    trained = {"full": backbone + head, "linear_probe": head, "sherl": mtsa + head}
    total = {"full": backbone + head, "linear_probe": backbone + head, "sherl": backbone + head + mtsa}
    for m, a in acc.items():
        assert a["weights_mib"] == round(total[m] * 4 / MIB, 2), m
        assert a["states_mib"] == round(3 * trained[m] * 4 / MIB, 2), m  # gradients + two AdamW moments
    assert acc["linear_probe"]["saved_mib"] == round(4 * 1280 * 4 / MIB, 2)  # the head's input only
    assert acc["linear_probe"]["saved_mib"] < acc["sherl"]["saved_mib"] < acc["full"]["saved_mib"] / 5
    assert acc["linear_probe"]["est_mib"] < acc["sherl"]["est_mib"] < acc["full"]["est_mib"]


def test_cnn_train_step_memory_trains_what_the_accounting_counts(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "b.safetensors")
    save_file({"pixel_values": torch.full((2, 3, 64, 64), 100.0), "labels": torch.tensor([0, 3])}, path)
    expected = {"full": 3_371_008 + 5124, "linear_probe": 5124, "sherl": 23_281 + 5124}
    for method, n in expected.items():
        r = cnn_train_step_memory(preset="effnet-lite0", method=method, options={"seed": 0} if method == "sherl"
                                  else {}, batch_path=path, num_classes=4, steps=1)
        assert r["trainable"] == n and r["step_s"] > 0, method


def test_study_cnn_tiny_run_and_shared_cache(tiny_data):
    knobs, _ = tiny_data
    cfg = config.resolve("sherl", "ci", memory="off",
                         cnn={"data": knobs, "epochs": 1, "batch_size": 4, "probe_epochs": 1})
    cache, logged = {}, []
    t = study_cnn(cfg, None, cache=cache, log=logged.append).set_index("method")
    assert list(t.index) == ["full", "linear_probe", "sherl"] and len(logged) == 3
    assert (t.n_test == 8).all() and (t.n_train == 12).all() and (t.backbone == "effnet-lite0").all()
    assert t.loc["full", "params_pct"] == 100.0 and t.loc["linear_probe", "params_pct"] == 0.0
    assert t.loc["sherl", "params_pct"] == round(100 * 23_281 / 3_371_008, 3) == 0.691
    assert t.loc["sherl", "steps"] == 3 and t.loc["linear_probe", "steps"] == 3  # 12 rows / batch 4
    for _, r in t.iterrows():  # accuracy on 8 rows: a multiple of 12.5 %, its binomial SE
        p = r.test / 100
        assert r.test % 12.5 == 0 and r.test_se == round(100 * np.sqrt(p * (1 - p) / 8), 2)
    assert set(t.mem_batch) == {4}
    again = study_cnn(cfg, None, cache=cache, log=logged.append).set_index("method")
    assert len(logged) == 3  # every run came from the cache
    assert again.fillna(-1).equals(t.fillna(-1))
