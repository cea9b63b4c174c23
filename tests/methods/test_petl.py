"""PETL baselines (vlkit.methods.petl): full, BitFit, Adapter, LoRA (PEFT), prompt tuning.

Checks: trainable-parameter counts against hand formulas, identity at initialisation
(adapter, LoRA), LoRA's ``W0 x + (alpha / r) B A x`` by hand, where prompt tokens go (CLS
kept at 0, masks extended, deep prompts written before each unit), that training steps move
exactly the trainable parameters, that the returned models still satisfy the backbone
protocol, and the errors for bad names and values. Tiny BERT / ViLT / T5 / METER configs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vlkit.efficiency import params
from vlkit.methods.petl import METHODS, apply, options, resolve, trainable_fraction, trainable_parameters
from vlkit.methods.petl.basic import lora_modules
from vlkit.methods.petl.prompt import PromptTuned
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError
from vlkit.nn.adapters import bottleneck_params

L, D, F = 3, 32, 48  # tiny BERT / ViLT: layers, width, FFN width
BERT = dict(num_hidden_layers=L, hidden_size=D, num_attention_heads=4, intermediate_size=F, vocab_size=101,
            max_position_embeddings=64)
VILT = dict(num_hidden_layers=L, hidden_size=D, num_attention_heads=4, intermediate_size=F, vocab_size=101)
T5 = dict(num_hidden_layers=2, hidden_size=D, num_attention_heads=4, intermediate_size=F, head_dim=8,
          vocab_size=101, relative_attention_num_buckets=8, relative_attention_max_distance=16)
METER = dict(image_size=32, patch_size=16, vision_dim=24, vision_heads=4, vision_ffn_dim=48, vision_layers=2,
             text_dim=40, text_heads=4, text_ffn_dim=80, text_layers=2, vocab_size=99, max_positions=20,
             hidden_dim=32, fusion_heads=4, fusion_ffn_dim=64, fusion_layers=2, text_len=7)
MINE = ("full", "bitfit", "adapter", "lora", "prompt")
ATOL = 1e-5


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def _same_output(o1, o2, atol=ATOL):
    _close(o1.pooled, o2.pooled, atol)
    assert set(o1.sequences) == set(o2.sequences)
    for k in o1.sequences:
        _close(o1.sequences[k], o2.sequences[k], atol)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bert():
    return build("bert-base", **BERT).eval()


@pytest.fixture(scope="module")
def vilt():
    return build("vilt-b32", **VILT).eval()


@pytest.fixture(scope="module")
def t5():
    return build("t5-base", **T5).eval()


@pytest.fixture(scope="module")
def meter():
    return build("meter-clip16-roberta", **METER).eval()


def bert_inputs(batch=3, n=9, seed=0, mask=True):
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(1, 101, (batch, n), generator=g)}
    if mask:
        x["attention_mask"] = torch.ones(batch, n, dtype=torch.long)
        x["attention_mask"][1, 6:] = 0  # padding in row 1
    return x


def vilt_inputs(batch=2, n=7, seed=0):
    x = bert_inputs(batch, n, seed)
    x["pixel_values"] = torch.randn(batch, 3, 64, 96, generator=torch.Generator().manual_seed(seed + 1))
    return x


def meter_inputs(model, batch=2):
    x = model.dummy_inputs(batch)
    x["input_ids"][1, -2:] = model.config.pad_token_id
    x["attention_mask"][1, -2:] = 0
    return x


@pytest.fixture(params=["bert", "vilt"])
def case(request, bert, vilt):
    """(backbone, inputs) for the two single-stream backbones."""
    return (bert, bert_inputs()) if request.param == "bert" else (vilt, vilt_inputs())


def fresh(backbone, method, **opts):
    return apply(method, copy.deepcopy(backbone), **opts)


# ---------------------------------------------------------------------------- registry and errors
def test_registry_names_and_lazy_entries():
    assert set(METHODS) == {"full", "bitfit", "adapter", "lora", "prompt", "lst", "unipt", "sherl", "das"}
    assert METHODS["das"] == "vlkit.methods.das.apply:apply_das"
    assert METHODS["lst"] == "vlkit.methods.petl.lst:apply_lst"
    assert METHODS["unipt"] == "vlkit.methods.petl.unipt:apply_unipt"
    assert METHODS["sherl"] == "vlkit.methods.sherl:apply_sherl"
    for name in MINE:
        assert callable(resolve(name)) and resolve(name).__doc__
    assert options("lora") == {"r": 8, "alpha": 16, "targets": ("q", "v"), "dropout": 0.0, "seed": 0}
    assert options("full") == {} and options("bitfit") == {}


def test_unknown_method_lists_methods(bert):
    with pytest.raises(UnknownNameError, match="unknown PETL method 'loraa'.*full, bitfit, adapter, lora, prompt"):
        apply("loraa", bert)


def test_unknown_option_lists_options(bert):
    with pytest.raises(UnknownNameError, match="'rank'.*r, alpha, targets, dropout, seed"):
        apply("lora", copy.deepcopy(bert), rank=4)
    with pytest.raises(UnknownNameError, match="'lr'"):
        apply("bitfit", copy.deepcopy(bert), lr=1.0)


@pytest.mark.parametrize("method, opts, error, match", [
    ("lora", {"r": 0}, ValueError, "r must be a positive int, got 0"),
    ("lora", {"alpha": -1}, ValueError, "alpha must be a positive number"),
    ("lora", {"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
    ("lora", {"targets": ["query"]}, UnknownNameError, "unknown LoRA target 'query'.*q.*v"),
    ("lora", {"targets": ["attn"]}, ValueError, "not Linear layers"),
    ("lora", {"targets": []}, ValueError, "non-empty"),
    ("adapter", {"bottleneck": 0}, ValueError, "bottleneck must be a positive int, got 0"),
    ("adapter", {"placement": "diagonal"}, UnknownNameError, "'diagonal'.*parallel, sequential"),
    ("adapter", {"slots": ("mlp",)}, UnknownNameError, "'mlp'.*attn, cross, ffn"),
    ("adapter", {"slots": ("cross",)}, ValueError, "no unit"),  # BERT units have no cross-attention
    ("adapter", {"act": "swishy"}, UnknownNameError, "swishy"),
    ("prompt", {"n_prompts": 0}, ValueError, "n_prompts must be a positive int, got 0"),
    ("prompt", {"position": "prepend"}, UnknownNameError, "'prepend'.*after_cls, append"),
    ("prompt", {"streams": ["vision"]}, UnknownNameError, "'vision'.*text"),
    ("prompt", {"init": "zeros"}, UnknownNameError, "'zeros'.*uniform, normal"),
    ("prompt", {"deep": "yes"}, ValueError, "deep must be True or False"),
])
def test_bad_option_values(bert, method, opts, error, match):
    with pytest.raises(error, match=match):
        apply(method, copy.deepcopy(bert), **opts)


def test_not_a_backbone_and_unsupported_backbones(t5):
    with pytest.raises(TypeError, match="vlkit Backbone.*Linear"):
        apply("full", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="BitFit needs bias terms.*T5Backbone"):
        fresh(t5, "bitfit")
    model = fresh(t5, "prompt", streams=["enc"], n_prompts=2)  # T5's relative bias is per length
    with pytest.raises(ValueError, match="relative position bias"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long))


# ---------------------------------------------------------------------------- trainable counts
def test_full_trains_everything(bert):
    model = fresh(bert, "full")
    assert model is not bert and trainable_parameters(model) == params(bert) > 0
    assert trainable_fraction(model) == 1.0


def test_bitfit_counts_biases_by_formula(bert, vilt):
    # per layer: q, k, v, o (4D) + fc1 (F) + fc2 (D) + two LayerNorm shifts (2D) = 7D + F
    per_layer = 7 * D + F
    # BERT: + embedding LayerNorm shift + pooler bias; ViLT: + text-embedding LN, patch conv,
    # final LN, pooler biases
    assert trainable_parameters(fresh(bert, "bitfit")) == L * per_layer + 2 * D == 880
    assert trainable_parameters(fresh(vilt, "bitfit")) == L * per_layer + 4 * D == 944
    model = fresh(bert, "bitfit")
    gains = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert gains and not any(p.requires_grad for p in gains)  # LayerNorm gains stay frozen


def test_adapter_counts_by_formula(bert, t5):
    norms = L * 2 * (2 * D) + 2 * D  # two LayerNorms per layer + the embedding LayerNorm
    r = D // 8
    assert trainable_parameters(fresh(bert, "adapter")) == L * 2 * bottleneck_params(D, r, False) + norms
    model = fresh(bert, "adapter", placement="parallel", bottleneck=6, layer_norm=True, train_norms=False)
    assert trainable_parameters(model) == L * 2 * bottleneck_params(D, 6, True)
    # T5 (no .dim on its units; decoder units have a "cross" slot): 2 encoder + 2 decoder units;
    # RMS norms: 2 per encoder unit, 3 per decoder unit, 2 final norms, each of width D
    t5_norms = (2 * 2 + 2 * 3 + 2) * D
    model = fresh(t5, "adapter", slots=("attn", "cross", "ffn"))
    assert trainable_parameters(model) == (2 * 2 + 2 * 3) * bottleneck_params(D, r, False) + t5_norms


def test_lora_counts_by_formula(bert, vilt, t5):
    r = 4
    for backbone in (bert, vilt):
        assert trainable_parameters(fresh(backbone, "lora", r=r)) == L * 2 * r * (D + D)
    # T5 (inner width 4 heads * 8 = D): encoder q, v; decoder self- and cross-attention q, v
    assert trainable_parameters(fresh(t5, "lora", r=r)) == (2 * 2 + 2 * 4) * r * (D + D)
    # self-attention only with the dotted targets
    assert trainable_parameters(fresh(t5, "lora", r=r, targets=["layer.0.SelfAttention.q"])) == 4 * r * (D + D)
    model = fresh(bert, "lora", r=r)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_A" in n or "lora_B" in n for n in names) and len(names) == L * 2 * 2


def test_prompt_counts_by_formula(bert, meter):
    assert trainable_parameters(fresh(bert, "prompt", n_prompts=5)) == 5 * D
    assert trainable_parameters(fresh(bert, "prompt", n_prompts=5, deep=True)) == 5 * D * L
    # METER: text units LEn0, LEn1 (40) then FL0, FL1 (fusion width 32); vision VEn* (24), FV* (32)
    assert trainable_parameters(fresh(meter, "prompt", n_prompts=3)) == 3 * (40 + 24)
    deep = fresh(meter, "prompt", n_prompts=3, deep=True)
    assert trainable_parameters(deep) == 3 * (2 * 40 + 2 * 32) + 3 * (2 * 24 + 2 * 32)
    total = params(meter) + trainable_parameters(deep)
    assert trainable_fraction(deep) == pytest.approx(trainable_parameters(deep) / total)


# ---------------------------------------------------------------------------- at initialisation
@pytest.mark.parametrize("method, opts", [
    ("adapter", {}), ("adapter", {"placement": "parallel", "layer_norm": True}), ("lora", {"r": 4}),
    ("bitfit", {}), ("full", {}),
])
@torch.no_grad()
def test_identity_at_init(case, method, opts):
    backbone, x = case
    _same_output(fresh(backbone, method, **opts)(**x), backbone(**x))


@torch.no_grad()
def test_identity_check_can_fail(case):
    """Adapters with BERT init (non-zero up-projection) do change the output."""
    backbone, x = case
    out = fresh(backbone, "adapter", init="bert")(**x)
    assert not torch.allclose(out.pooled, backbone(**x).pooled, atol=1e-7)


@torch.no_grad()
def test_lora_is_w0_plus_scaled_ba(bert):
    """Hu et al. Eq. 3 by hand: q(x) = W0 x + b + (alpha / r) B A x, here alpha / r = 3."""
    model = fresh(bert, "lora", r=4, alpha=12)
    q = model.unit("En1").attn.q
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    assert torch.count_nonzero(b) == 0  # B = 0 at init
    b.normal_(generator=torch.Generator().manual_seed(3))
    w0 = bert.unit("En1").attn.q
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))
    _close(q(x), x @ w0.weight.T + w0.bias + 3.0 * (x @ a.T @ b.T))
    assert model.unit("En1").attn.k.__class__ is nn.Linear  # k is not a target


def test_seeds_are_reproducible_and_local(bert):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    m1, m2 = fresh(bert, "lora", seed=5), fresh(bert, "lora", seed=5)
    assert torch.rand(1) == before  # the global RNG was not consumed
    a = lambda m: m.unit("En0").attn.q.lora_A["default"].weight  # noqa: E731
    assert torch.equal(a(m1), a(m2)) and not torch.equal(a(m1), a(fresh(bert, "lora", seed=6)))


# ---------------------------------------------------------------------------- prompt placement
@torch.no_grad()
def test_prompt_tokens_after_cls_and_mask_extended(case):
    backbone, x = case
    n = 4
    model = fresh(backbone, "prompt", n_prompts=n)
    assert isinstance(model, PromptTuned)
    stream = backbone.specs[0].stream
    ref, st = backbone.embed(**x), model.embed(**x)
    z, z0, p = st.streams[stream], ref.streams[stream], model.prompts[stream]
    assert z.shape[1] == z0.shape[1] + n
    _close(z[:, 0], z0[:, 0])  # CLS stays at position 0
    _close(z[:, 1:1 + n], p.expand(z.shape[0], -1, -1))
    _close(z[:, 1 + n:], z0[:, 1:])
    m, m0 = st.masks[stream], ref.masks[stream]
    assert torch.equal(m[:, 1:1 + n], torch.ones_like(m[:, 1:1 + n]))
    assert torch.equal(torch.cat([m[:, :1], m[:, 1 + n:]], 1), m0)  # padding is still padding
    assert st.extra["prompt_slices"] == {stream: (1, 1 + n)}
    if "num_text" in ref.extra:  # ViLT: the image tokens start n later
        assert st.extra["num_text"] == ref.extra["num_text"] + n
    out = model(**x)
    assert out.sequences[stream].shape[1] == z0.shape[1] + n
    assert not torch.allclose(out.pooled, backbone(**x).pooled, atol=1e-6)  # the prompts matter


@torch.no_grad()
def test_prompt_append_and_no_mask(bert):
    model = fresh(bert, "prompt", n_prompts=2, position="append")
    x = bert_inputs(mask=False)
    st, ref = model.embed(**x), bert.embed(**x)
    assert st.masks["text"] is None  # no mask in, no mask out
    _close(st.streams["text"][:, :-2], ref.streams["text"])
    _close(st.streams["text"][:, -2:], model.prompts["text"].expand(3, -1, -1))
    assert st.extra["prompt_slices"] == {"text": (9, 11)}


@torch.no_grad()
def test_deep_prompts_are_written_before_each_unit(vilt):
    n = 3
    model = fresh(vilt, "prompt", n_prompts=n, deep=True)
    assert sorted(model.deep_prompts) == ["En1", "En2"]
    seen = {}
    hooks = [u.module.register_forward_pre_hook(lambda mod, args, name=u.name: seen.__setitem__(name, args[0]))
             for u in model.units]
    try:
        out = model(**vilt_inputs())
    finally:
        for h in hooks:
            h.remove()
    _close(seen["En0"][:, 1:1 + n], model.prompts["joint"].expand(2, -1, -1))
    for name in ("En1", "En2"):
        _close(seen[name][:, 1:1 + n], model.deep_prompts[name].expand(2, -1, -1))
    shallow = fresh(vilt, "prompt", n_prompts=n)
    assert not torch.allclose(out.pooled, shallow(**vilt_inputs()).pooled, atol=1e-6)


# ---------------------------------------------------------------------------- protocol
def _protocol_checks(model, backbone, x):
    assert model.unit_names == backbone.unit_names
    n = len(model.units)
    state = model.embed(**x)
    whole = model.finalize(model.run_units(state, 0, n))
    _same_output(whole, model(**x))
    for k in (1, n - 1):
        _same_output(model.finalize(model.run_units(model.run_units(state, 0, k), k, n)), whole)


@pytest.mark.parametrize("method, opts", [
    ("full", {}), ("bitfit", {}), ("adapter", {"init": "bert"}), ("lora", {"r": 4}),
    ("prompt", {"n_prompts": 3}), ("prompt", {"n_prompts": 3, "deep": True}),
])
@torch.no_grad()
def test_protocol_still_holds(case, method, opts):
    backbone, x = case
    _protocol_checks(fresh(backbone, method, **opts), backbone, x)


@torch.no_grad()
def test_prompt_on_two_stream_meter(meter):
    """METER: prompts in both towers (their own widths), CLS of each stream at position 0,
    deep prompts across the tower -> fusion width change, protocol still holds."""
    x = meter_inputs(meter)
    model = fresh(meter, "prompt", n_prompts=2, deep=True)
    ref, st = meter.embed(**x), model.embed(**x)
    for s in ("text", "vision"):
        _close(st.streams[s][:, 0], ref.streams[s][:, 0])
        assert st.streams[s].shape[1] == ref.streams[s].shape[1] + 2
    assert st.masks["vision"] is None and st.masks["text"].shape[1] == ref.masks["text"].shape[1] + 2
    _protocol_checks(model, meter, x)


def test_prompt_wrapper_shares_the_backbone(bert):
    backbone = copy.deepcopy(bert)
    model = apply("prompt", backbone, n_prompts=2)
    assert model.unit("En1") is backbone.unit("En1") and model.config is backbone.config
    assert model.preset == "bert-base"
    keys = list(model.state_dict())
    assert all(k.startswith(("backbone.", "prompts.")) for k in keys)
    assert len(keys) == len(backbone.state_dict()) + 1  # the units are stored once
    new = nn.Identity()
    model.replace_unit("En1", new)  # acts on the wrapped backbone's units
    assert backbone.unit("En1") is new


def test_lora_keeps_units_and_in_place(bert):
    backbone = copy.deepcopy(bert)
    model = apply("lora", backbone)
    assert model is backbone and model.unit_names == ["En0", "En1", "En2"]
    assert type(model.unit("En0").attn.q).__module__.startswith("peft")
    assert sorted(n for n, _ in lora_modules(model)) == [f"blocks.En{i}.attn.{t}" for i in range(L) for t in "qv"]


# ---------------------------------------------------------------------------- training moves only trainable params
@pytest.mark.parametrize("method, opts", [
    ("full", {}), ("bitfit", {}), ("adapter", {}), ("lora", {"r": 2}), ("prompt", {"n_prompts": 2, "deep": True}),
])
def test_training_changes_exactly_the_trainable_parameters(bert, method, opts):
    torch.manual_seed(0)
    model = fresh(bert, method, **opts).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    x = bert_inputs()
    target = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    # every parameter goes to the optimiser: freezing alone must keep the others fixed. Adam
    # moves any parameter with a non-zero gradient by ~lr, however small the gradient.
    opt = torch.optim.Adam(list(model.parameters()), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = (model(**x).pooled - target).pow(2).mean()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= trainable
    if method == "full":  # word / position / type embeddings move only in the rows used
        assert len(changed) > 0.9 * len(trainable)
    else:
        assert changed == trainable
