"""Bottleneck adapters (DAS, Wu et al. 2023): identity at init, hand-worked values, parameter
counts, gradient isolation, and parallel vs sequential wiring inside a TransformerLayer."""

import copy
import math

import pytest
import torch
from torch import nn

from vlkit.models.layers import TransformerLayer
from vlkit.models.protocol import Backbone, State, UnitContext, UnitSpec, UnknownNameError
from vlkit.nn.adapters import (
    BottleneckAdapter,
    ParallelAdapter,
    SequentialAdapter,
    SkipAdapter,
    add_adapters,
    bottleneck_params,
    count_adapter_params,
    trainable_adapter_params,
)

D, H, F = 16, 2, 32


def make_layer(norm="pre", cross=False, seed=0):
    torch.manual_seed(seed)
    return TransformerLayer(D, H, F, norm=norm, cross=cross, eps=1e-6).eval()


def inputs(seed=1, b=2, n=5, m=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, D, generator=g)
    mask = torch.ones(b, n)
    mask[1, -2:] = 0
    ctx = UnitContext(mask=mask, context=torch.randn(b, m, D, generator=g), context_mask=torch.ones(b, m))
    return x, ctx


def randomise(module, seed=7, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------- identity at init
@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_zero_init_adapters_leave_layer_output_unchanged(norm, placement):
    layer = make_layer(norm, cross=True)
    x, ctx = inputs()
    before = layer(x, ctx)
    add_adapters(layer, placement, bottleneck=4, slots=("attn", "cross", "ffn"))
    after = layer(x, ctx)
    assert set(layer.adapters) == {"attn", "cross", "ffn"}
    assert torch.equal(before, after)  # up-projection is exactly zero: bitwise identical


def test_skip_adapter_is_identity_at_init_and_a_protocol_unit():
    x, ctx = inputs()
    skip = SkipAdapter(D, 8)
    assert torch.equal(skip(x, ctx), x)
    assert torch.equal(skip(x), x)

    class Tiny(Backbone):
        def __init__(self):
            super().__init__()
            specs = [UnitSpec(f"En{i}", "joint", "joint") for i in range(2)]
            self._register_units(specs, [make_layer(seed=i) for i in range(2)])

        def embed(self, x):
            return State(streams={"joint": x}, masks={"joint": None})

    bb = Tiny()
    ref = bb.run_units(bb.embed(x), 0, 1).streams["joint"]  # En0 only
    old = bb.replace_unit("En1", SkipAdapter(D, 8))
    assert isinstance(old, TransformerLayer)
    out = bb.run_units(bb.embed(x)).streams["joint"]
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- hand-worked values
def _set_small(adapter):
    """D=2, r=1: down w=[1,-1], b=0.5; up w=[2,3]^T, b=[0.1,-0.1]; LN gain 1, shift 0."""
    with torch.no_grad():
        adapter.down.weight.copy_(torch.tensor([[1.0, -1.0]]))
        adapter.down.bias.copy_(torch.tensor([0.5]))
        adapter.up.weight.copy_(torch.tensor([[2.0], [3.0]]))
        adapter.up.bias.copy_(torch.tensor([0.1, -0.1]))


def test_bottleneck_hand_computed():
    x = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    # No LN, ReLU: down = 3 - 1 + 0.5 = 2.5; relu -> 2.5; up = [2*2.5 + 0.1, 3*2.5 - 0.1] = [5.1, 7.4]
    a = BottleneckAdapter(2, 1, act="relu", layer_norm=False).double()
    _set_small(a)
    torch.testing.assert_close(a(x), torch.tensor([[5.1, 7.4]], dtype=torch.float64))
    # With LN: mean 2, var 1 -> LN x = [1, -1] / sqrt(1 + 1e-5); down = 2/sqrt(1+eps) + 0.5
    a = BottleneckAdapter(2, 1, act="relu", layer_norm=True).double()
    _set_small(a)
    z = 2 / math.sqrt(1 + 1e-5) + 0.5
    torch.testing.assert_close(a(x), torch.tensor([[2 * z + 0.1, 3 * z - 0.1]], dtype=torch.float64))
    # GELU (exact erf form): gelu(z) = z * Phi(z)
    a = BottleneckAdapter(2, 1, act="gelu", layer_norm=True).double()
    _set_small(a)
    gz = z * 0.5 * (1 + math.erf(z / math.sqrt(2)))
    torch.testing.assert_close(a(x), torch.tensor([[2 * gz + 0.1, 3 * gz - 0.1]], dtype=torch.float64))


def test_slot_and_unit_modules_hand_computed():
    x_in = torch.tensor([[3.0, 1.0]], dtype=torch.float64)
    h = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    par, seq, skip = (cls(2, 1, act="relu", layer_norm=False).double() for cls in
                      (ParallelAdapter, SequentialAdapter, SkipAdapter))
    for m in (par, seq, skip):
        _set_small(m)
    # parallel: h + delta(x_in) = [1, 2] + [5.1, 7.4]
    torch.testing.assert_close(par(x_in, h), torch.tensor([[6.1, 9.4]], dtype=torch.float64))
    # sequential: h + delta(h); down(h) = 1 - 2 + 0.5 = -0.5 -> relu 0 -> up = [0.1, -0.1]
    torch.testing.assert_close(seq(x_in, h), torch.tensor([[1.1, 1.9]], dtype=torch.float64))
    # skip: x + delta(x) = [3, 1] + [5.1, 7.4]
    torch.testing.assert_close(skip(x_in, None), torch.tensor([[8.1, 8.4]], dtype=torch.float64))


# ---------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("dim,r,expected", [(768, 96, 149_856), (768, 192, 297_408), (768, 288, 444_960)])
def test_parameter_counts_match_formula(dim, r, expected):
    # 2*D*r + r + D + 2*D (LayerNorm)
    assert bottleneck_params(dim, r) == 2 * dim * r + r + dim + 2 * dim == expected
    assert sum(p.numel() for p in SkipAdapter(dim, r).parameters()) == expected
    assert sum(p.numel() for p in BottleneckAdapter(dim, r, layer_norm=False).parameters()) == expected - 2 * dim
    assert bottleneck_params(dim, r, layer_norm=False) == expected - 2 * dim


def test_add_adapters_adds_official_kept_block_params():
    layer = make_layer()
    n0 = sum(p.numel() for p in layer.parameters())
    added = add_adapters(layer)  # parallel, r=96, attn + ffn
    assert set(added) == {"attn", "ffn"} and all(isinstance(m, ParallelAdapter) for m in added.values())
    n1 = sum(p.numel() for p in layer.parameters())
    assert n1 - n0 == 2 * bottleneck_params(D, 96) == count_adapter_params(layer)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("init", ["zero", "bert"])
def test_gradients_reach_only_adapters_of_a_frozen_layer(init):
    layer = make_layer(cross=True)
    layer.requires_grad_(False)
    add_adapters(layer, "parallel", bottleneck=4, slots=("attn", "cross", "ffn"), init=init)
    x, ctx = inputs()
    layer(x, ctx).pow(2).sum().backward()
    adapter = trainable_adapter_params(layer)
    assert len(adapter) == 3 * 6 and all(n.startswith("adapters.") for n in adapter)
    for name, p in layer.named_parameters():
        if name in adapter:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert p.grad is None, name
    for slot in ("attn", "cross", "ffn"):
        assert adapter[f"adapters.{slot}.up.weight"].grad.abs().sum() > 0
        # zero-init up => no signal reaches the down-projection on the first step
        down_grad = adapter[f"adapters.{slot}.down.weight"].grad.abs().sum()
        assert (down_grad == 0) if init == "zero" else (down_grad > 0)


# ---------------------------------------------------------------- parallel vs sequential
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_parallel_and_sequential_follow_their_formulas(norm):
    base = make_layer(norm)
    x, ctx = inputs()
    layers = {}
    for placement in ("parallel", "sequential"):
        layer = copy.deepcopy(base)
        add_adapters(layer, placement, bottleneck=4)
        randomise(layer.adapters, seed=3)  # same non-zero adapter weights for both placements
        layers[placement] = layer
    da, df = layers["parallel"].adapters["attn"].delta, layers["parallel"].adapters["ffn"].delta

    def expected(placement):
        def sub(x, norm_mod, fn, delta):
            h = fn(norm_mod(x) if norm == "pre" else x)
            h = h + (delta(x) if placement == "parallel" else delta(h))
            return x + h if norm == "pre" else norm_mod(x + h)
        with torch.no_grad():
            x1 = sub(x, base.attn_norm, lambda t: base.attn(t, ctx.mask), da)
            return sub(x1, base.ffn_norm, base.ffn, df)

    with torch.no_grad():
        out = {p: layers[p](x, ctx) for p in layers}
    for p in layers:
        torch.testing.assert_close(out[p], expected(p))
    assert not torch.allclose(out["parallel"], out["sequential"], atol=1e-3)
    assert not torch.allclose(out["parallel"], base(x, ctx), atol=1e-3)


# ---------------------------------------------------------------- placement details and errors
def test_adapters_follow_layer_dtype():
    layer = make_layer().double()
    add_adapters(layer, slots="ffn")
    assert layer.adapters["ffn"].up.weight.dtype == torch.float64
    x, ctx = inputs()
    assert layer(x.double(), ctx).dtype == torch.float64


def test_bert_init_matches_official_statistics():
    torch.manual_seed(0)
    a = BottleneckAdapter(768, 192, init="bert")
    assert abs(a.up.weight.std().item() - 0.02) < 1e-3 and abs(a.down.weight.std().item() - 0.02) < 1e-3
    assert a.up.bias.abs().sum() == 0 and a.down.bias.abs().sum() == 0
    z = BottleneckAdapter(768, 192)
    assert z.up.weight.abs().sum() == 0 and z.up.bias.abs().sum() == 0 and z.down.weight.abs().sum() > 0


def test_bad_input_raises_clear_errors():
    layer = make_layer(cross=False)
    with pytest.raises(UnknownNameError, match="'diagonal'.*parallel, sequential"):
        add_adapters(layer, "diagonal")
    with pytest.raises(UnknownNameError, match="'cross'.*attn, ffn"):
        add_adapters(layer, slots=("attn", "cross"))
    assert len(layer.adapters) == 0  # nothing half-added
    add_adapters(layer, slots=("ffn",))
    with pytest.raises(ValueError, match="'ffn'.*already holds"):
        add_adapters(layer, slots=("ffn",))
    with pytest.raises(UnknownNameError, match="'swish'.*gelu"):
        BottleneckAdapter(D, 4, act="swish")
    with pytest.raises(UnknownNameError, match="'xavier'.*zero, bert"):
        BottleneckAdapter(D, 4, init="xavier")
    with pytest.raises(ValueError, match="bottleneck must be a positive int, got 0"):
        BottleneckAdapter(D, 0)
    with pytest.raises(TypeError, match="Linear"):
        add_adapters(nn.Linear(3, 3))
