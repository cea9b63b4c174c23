"""The efficiency meter: hand-worked MACs, unit accounting that sums to the whole, the
reference library (HF BERT) against the analytic formula, latency statistics and the
subprocess peak-memory measurement."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlkit import efficiency as eff
from vlkit.models.layers import TransformerLayer
from vlkit.models.protocol import Backbone, BackboneOutput, State, UnitContext, UnitSpec


# ----------------------------------------------------------------------------- hand-worked MACs
def test_linear_macs_is_b_n_in_out():
    B, N, i, o = 2, 5, 7, 3
    assert eff.macs(nn.Linear(i, o), (torch.randn(B, N, i),)) == B * N * i * o  # bias adds are not MACs


def test_bmm_macs_and_kwargs_inputs():
    a, b = torch.randn(4, 3, 6), torch.randn(4, 6, 5)
    assert eff.macs(torch.bmm, (a, b)) == 4 * 3 * 6 * 5
    assert eff.macs(lambda x, y: x @ y, {"x": a, "y": b}) == 4 * 3 * 6 * 5


class TinySDPA(nn.Module):
    """Attention through F.scaled_dot_product_attention, no projections: only QK^T and PV."""

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_attention_counts_qk_and_pv(masked):
    B, H, N, M, hd = 2, 3, 5, 7, 4
    q, k, v = torch.randn(B, H, N, hd), torch.randn(B, H, M, hd), torch.randn(B, H, M, hd)
    mask = torch.zeros(B, 1, 1, M) if masked else None
    expected = B * H * N * M * hd + B * H * N * hd * M  # q @ k^T  +  p @ v
    assert eff.macs(TinySDPA(), (q, k, v, mask)) == expected
    # Why macs() forces the math backend: the bare counter sees nothing of the CPU flash
    # kernel (if torch ever counts it, this line fails and the workaround can go).
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        TinySDPA()(q, k, v, mask)
    assert counter.get_total_flops() == 0


def test_transformer_layer_matches_analytic_formula_self_and_cross():
    torch.manual_seed(0)
    B, N, M, D, Dc, Fd = 2, 6, 4, 16, 8, 40
    x, c = torch.randn(B, N, D), torch.randn(B, M, Dc)
    layer = TransformerLayer(D, 4, Fd, norm="pre")
    assert eff.macs(layer, (x, UnitContext(mask=torch.ones(B, N)))) == eff.transformer_layer_macs(
        N, D, Fd, batch_size=B) == B * (4 * N * D**2 + 2 * N**2 * D + 2 * N * D * Fd)
    fusion = TransformerLayer(D, 4, Fd, cross=True, context_dim=Dc)
    got = eff.macs(fusion, (x, UnitContext(context=c, context_mask=torch.ones(B, M))))
    assert got == eff.transformer_layer_macs(N, D, Fd, context_tokens=M, context_dim=Dc, batch_size=B)
    assert got == B * (4 * N * D**2 + 2 * N**2 * D + 2 * N * D * Fd + 2 * N * D**2 + 2 * M * Dc * D + 2 * N * M * D)


def test_anchor_vilt_layer_is_1795_gmacs():
    n, d = 241, 768
    assert eff.transformer_layer_macs(n, d) == 12 * n * d**2 + 2 * n**2 * d == 1_794_983_424
    assert eff.gmacs(eff.transformer_layer_macs(n, d)) == 1.795
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        eff.transformer_layer_macs(0, d)


def test_hf_bert_equals_analytic_count():
    """Reference library: a (random, tiny) transformers BertModel under its default SDPA
    attention costs L * (12ND^2 + 2N^2D) + the pooler's D^2 per sequence, nothing more."""
    from transformers import BertConfig, BertModel

    L, D, H, B, N = 2, 32, 4, 2, 9
    cfg = BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                     intermediate_size=4 * D, max_position_embeddings=16)
    torch.manual_seed(0)
    model = BertModel(cfg)
    inputs = {"input_ids": torch.randint(0, 50, (B, N)), "attention_mask": torch.ones(B, N, dtype=torch.long)}
    assert eff.macs(model, inputs) == B * (L * (12 * N * D**2 + 2 * N**2 * D) + D * D)
    assert eff.params(model) == sum(p.numel() for p in model.parameters())


def test_macs_restores_each_modules_training_flag():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 3))
    model.train()
    model[2].eval()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    eff.macs(model, (torch.randn(1, 3),))
    assert seen == [False]  # counted in eval mode (dropout off)
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_macs_rejects_bad_inputs():
    with pytest.raises(TypeError, match="dict of kwargs, a tuple of args"):
        eff.macs(nn.Linear(2, 2), torch.randn(1, 2))


# ----------------------------------------------------------------------------- params
def test_params_counts_trainable_and_tied_once():
    lin = nn.Linear(3, 4)  # 12 + 4
    assert eff.params(lin) == 16
    lin.weight.requires_grad_(False)
    assert eff.params(lin, trainable_only=True) == 4
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    assert eff.params(nn.ModuleList([emb, head])) == 40
    with pytest.raises(TypeError, match="nn.Module"):
        eff.params(lambda x: x)


# ----------------------------------------------------------------------------- unit accounting
class StubBackbone(Backbone):
    """A tiny single-stream protocol backbone: embedding + projection, 3 units, pooler."""

    preset = "stub"

    def __init__(self, vocab=20, d=16, layers=3, ffn=24):
        super().__init__()
        self.d, self.ffn = d, ffn
        self.tok = nn.Embedding(vocab, 8)
        self.proj = nn.Linear(8, d)  # 8*d MACs per token in embed
        self.norm = nn.LayerNorm(d)
        self.pool = nn.Linear(d, d)  # d^2 MACs per sequence in finalize
        self._register_units([UnitSpec(f"En{i}", "joint", "joint") for i in range(layers)],
                             [TransformerLayer(d, 2, ffn, norm="pre") for _ in range(layers)])

    def embed(self, input_ids, attention_mask=None):
        return State(streams={"joint": self.proj(self.tok(input_ids))}, masks={"joint": attention_mask})

    def finalize(self, state):
        x = self.norm(state.streams["joint"])
        return BackboneOutput(pooled=torch.tanh(self.pool(x[:, 0])), sequences={"joint": x}, masks=state.masks)

    def dummy_inputs(self, batch_size=1):
        g = torch.Generator().manual_seed(0)
        return {"input_ids": torch.randint(0, 20, (batch_size, 7), generator=g),
                "attention_mask": torch.ones(batch_size, 7, dtype=torch.long)}


def test_unit_macs_hand_worked_and_sums_to_whole_forward():
    torch.manual_seed(0)
    bb = StubBackbone()
    inputs = bb.dummy_inputs(batch_size=2)
    per = eff.unit_macs(bb, inputs)
    B, N, d = 2, 7, 16
    assert list(per) == ["embed", "En0", "En1", "En2", "finalize"]
    assert per["embed"] == B * N * 8 * d
    assert all(per[f"En{i}"] == eff.transformer_layer_macs(N, d, 24, batch_size=B) for i in range(3))
    assert per["finalize"] == B * d * d
    assert sum(per.values()) == eff.macs(bb, inputs)
    assert eff.unit_macs(bb) == eff.unit_macs(bb, bb.dummy_inputs())  # None -> dummy_inputs()


class SkipToZero(nn.Module):
    def forward(self, x, ctx=None):
        return x * 0.5


def test_unit_macs_follows_replaced_units():
    bb = StubBackbone()
    bb.replace_unit("En1", SkipToZero())
    per = eff.unit_macs(bb)
    assert per["En1"] == 0 and per["En0"] > 0
    assert sum(per.values()) == eff.macs(bb)


def test_unit_macs_needs_a_backbone():
    with pytest.raises(TypeError, match="protocol Backbone"):
        eff.unit_macs(nn.Linear(2, 2), {})


def test_efficiency_table_rows():
    bb = StubBackbone()
    rows = eff.efficiency_table(bb)
    assert [r["unit"] for r in rows] == ["embed", "En0", "En1", "En2", "finalize"]
    en0 = rows[1]
    assert en0["modality"] == "joint" and en0["params"] == eff.params(bb.unit("En0"))
    assert en0["gmacs"] == en0["macs"] / 1e9
    assert sum(r["macs"] for r in rows) == eff.macs(bb)
    assert eff.efficiency_table(bb, digits=3)[1]["gmacs"] == round(en0["macs"] / 1e9, 3)


def test_docstring_examples():
    assert doctest.testmod(eff).failed == 0


def test_gmacs_is_decimal():
    assert eff.gmacs(2_000_000_000) == 2.0
    assert eff.gmacs(1_234_567_890, digits=None) == 1.23456789


# ----------------------------------------------------------------------------- devices, latency
@pytest.mark.parametrize("name,tag", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                      ("NVIDIA A100-SXM4-80GB", "a100"), ("Tesla T4", "t4"),
                                      ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("NVIDIA A10G", "a10g")])
def test_gpu_tags(name, tag):
    assert eff._gpu_tag(name) == tag


def test_cpu_device_tag_names_threads():
    assert eff.device_tag("cpu") == f"cpu-{torch.get_num_threads()}t"
    with pytest.raises(ValueError, match="'tpu'"):
        eff.device_tag("tpu")


def test_latency_statistics_and_report():
    calls = []
    sizes = iter([1, 20_000, 200, 5_000, 50, 2_000, 800] * 3)

    def fn():
        calls.append(1)
        torch.randn(next(sizes)).sum()

    r = eff.latency(fn, warmup=2, repeats=5, dtype=torch.float32, batch_size=4)
    assert len(calls) == 7 and len(r["times_s"]) == 5
    assert r["min_s"] <= r["p10_s"] <= r["median_s"] <= r["p90_s"] <= r["max_s"]
    assert r["min_s"] == min(r["times_s"]) and r["max_s"] == max(r["times_s"])
    assert r["median_s"] == sorted(r["times_s"])[2]
    assert r["threads"] == torch.get_num_threads() and r["device"] == f"cpu-{torch.get_num_threads()}t"
    assert (r["dtype"], r["batch_size"]) == ("float32", 4)
    with pytest.raises(ValueError, match="repeats=0"):
        eff.latency(fn, repeats=0)


# ----------------------------------------------------------------------------- peak memory (subprocess)
MIB = 2**20


def alloc_target(mib: int) -> float:
    """peak_memory target: hold a known, touched float32 tensor of ``mib`` MiB."""
    t = torch.ones(mib * MIB // 4, dtype=torch.float32)
    return float(t[:10].sum())


def failing_target(code: int):
    raise ValueError(f"boom {code}")


def test_peak_memory_cpu_reports_the_allocation_not_torch_or_the_parent():
    # The parent holds 1 GiB: a child measured with getrusage's ru_maxrss would inherit it.
    ballast = torch.ones(2**30 // 4)
    r = eff.peak_memory(f"{__name__}:alloc_target", mib=256)
    del ballast
    assert 0.2 <= r["gib"] <= 0.35, r
    assert r["torch_import_bytes"] > 50 * MIB  # torch's import is real memory, and excluded
    assert r["baseline_bytes"] > r["torch_import_bytes"]
    assert r["result"] == 10.0 and r["device"].startswith("cpu-") and "VmHWM" in r["method"]


def test_peak_memory_reraises_target_errors():
    with pytest.raises(eff.PeakMemoryError, match="ValueError: boom 7"):
        eff.peak_memory(f"{__name__}:failing_target", code=7)
    with pytest.raises(ValueError, match="'module:function'"):
        eff.peak_memory("no_colon_here")
    with pytest.raises(TypeError, match="JSON"):
        eff.peak_memory(f"{__name__}:alloc_target", mib=object())


# ----------------------------------------------------------------------------- presets
# Paper-size presets are built once per module. The counter counts matmuls only (LayerNorm,
# GELU, softmax, biases and residual adds are free), so a unit costs the analytic
# 12*N*D^2 + 2*N^2*D (module docstring) -- exactly, not just within the brief's 0.5%.
from vlkit import models  # noqa: E402


@pytest.fixture(scope="module")
def vilt_b32():
    return models.build("vilt-b32")


@pytest.fixture(scope="module")
def bert_base():
    return models.build("bert-base")


def test_vilt_b32_units_cost_12nd2_plus_2n2d(vilt_b32):
    inputs = vilt_b32.dummy_inputs()
    (_, _, h, w), text = inputs["pixel_values"].shape, inputs["input_ids"].shape[1]
    N = text + 1 + (h // 32) * (w // 32)  # 40 text tokens + image CLS + 10*20 patches
    D = vilt_b32.unit("En0").dim
    assert (N, D) == (241, 768)
    expected = 12 * N * D**2 + 2 * N**2 * D
    per = eff.unit_macs(vilt_b32, inputs)
    units = [k for k in per if k.startswith("En")]
    assert len(units) == 12
    for name in units:
        assert abs(per[name] - expected) <= 0.005 * expected, (name, per[name], expected)
        assert per[name] == expected  # matmuls only: exact
    assert eff.gmacs(per["En0"]) == 1.795
    assert sum(per.values()) == eff.macs(vilt_b32, inputs)


def test_bert_base_unit_exact_and_params(bert_base):
    assert eff.params(bert_base) == 109_482_240  # HF bert-base-uncased BertModel, pooler included
    inputs = bert_base.dummy_inputs()
    N, D = inputs["input_ids"].shape[1], bert_base.unit("En0").dim
    assert (N, D) == (128, 768)
    state = bert_base.embed(**inputs)
    assert eff.macs(lambda: bert_base.run_units(state, "En3", "En4")) == 12 * N * D**2 + 2 * N**2 * D


@pytest.mark.parametrize("preset,overrides,dummy", [
    ("vilt-b32", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
     dict(batch_size=2, text_len=5, image_size=(64, 96))),
    ("bert-base", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48),
     dict(batch_size=2, seq_len=9)),
])
def test_tiny_preset_unit_macs_sum_to_whole(preset, overrides, dummy):
    bb = models.build(preset, **overrides)
    inputs = bb.dummy_inputs(**dummy)
    per = eff.unit_macs(bb, inputs)
    assert list(per) == ["embed", *bb.unit_names, "finalize"]
    assert sum(per.values()) == eff.macs(bb, inputs)
    rows = eff.efficiency_table(bb, inputs)
    assert [r["params"] for r in rows[1:-1]] == [eff.params(u.module) for u in bb.units]
    assert abs(sum(r["gmacs"] for r in rows) * 1e9 - eff.macs(bb, inputs)) <= 1e-9 * eff.macs(bb, inputs)
