"""LST and UniPT: gates at init, the ladder's mixing rule at its limits, T5's side decoder stays
causal, UniPT's parallel interaction by hand and the module against an independent reference,
exact trainable counts, no graph through the backbone, bad input."""

import copy

import pytest
import torch

from vlkit.methods.feature_cache import embed_key
from vlkit.methods.petl import apply
from vlkit.methods.petl.lst import GATE_TEMPERATURE, LadderSideTuning, apply_lst
from vlkit.methods.petl.unipt import UniPT, UniPTAggregator, apply_unipt
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError

BERT = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=101,
            max_position_embeddings=32)
T5 = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48, head_dim=8,
          vocab_size=101, relative_attention_num_buckets=8, relative_attention_max_distance=16)


@pytest.fixture(scope="module")
def bert():
    return build("bert-base", **BERT)


@pytest.fixture(scope="module")
def t5():
    return build("t5-base", **T5)


def bert_inputs(batch=3, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[2, 6:] = 0
    return {"input_ids": torch.randint(1, 101, (batch, n), generator=g), "attention_mask": mask}


def count_saved(fn):
    n = [0]

    def pack(t):
        n[0] += 1
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return n[0]


# ------------------------------------------------------------------------------------- LST
def test_lst_gates_start_at_one_half_and_count(bert):
    model = apply("lst", copy.deepcopy(bert), reduction=4)
    assert isinstance(model, LadderSideTuning)
    for name in ("En0", "En1", "En2"):
        assert model.alpha[name].item() == 0.0
        assert model.gate(name).item() == 0.5  # sigmoid(0 / 0.1)
    assert GATE_TEMPERATURE == 0.1
    with torch.no_grad():
        model.alpha["En1"].fill_(0.2)
    torch.testing.assert_close(model.gate("En1"), torch.sigmoid(torch.tensor([2.0])))
    # D = 32, d = 8, f = 12, L = 3 (formula of the lst module docstring)
    D, d, f, L = 32, 8, 12, 3
    layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    assert sum(p.numel() for p in model.trainable.values()) == \
        (D * d + d) + L * (D * d + d) + L * layer + L + 2 * d + d * D + D


def test_lst_mixing_rule_at_its_limits(bert):
    model = apply_lst(copy.deepcopy(bert), reduction=4).eval()
    state, record = model.prefix(**bert_inputs())
    poked = dict(record)

    def run(rec):
        with torch.no_grad():
            return model.from_prefix(state, rec).sequences["text"]

    base = run(record)
    # gate 1 everywhere (alpha -> +inf): the ladder ignores every backbone unit output
    with torch.no_grad():
        for a in model.alpha.values():
            a.fill_(100.0)
    poked["En1"] = record["En1"] + 1.0
    torch.testing.assert_close(run(poked), run(record))
    # gate 0 everywhere: each side layer reads only its own unit's output, so En0 no longer matters
    with torch.no_grad():
        for a in model.alpha.values():
            a.fill_(-100.0)
    poked = {**record, "En0": record["En0"] + 1.0}
    torch.testing.assert_close(run(poked), run(record))
    poked = {**record, "En2": record["En2"] + 1.0}
    assert not torch.allclose(run(poked), run(record))
    assert not torch.allclose(base, run(record))


def test_lst_backbone_gets_no_graph_and_no_grad(bert):
    model = apply_lst(copy.deepcopy(bert), reduction=4)
    x = bert_inputs()
    assert count_saved(lambda: model.prefix(**x)) == 0
    model(**x).pooled.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.trainable.values())


def test_lst_t5_side_decoder_is_causal_and_reads_the_side_encoder(t5):
    model = apply_lst(copy.deepcopy(t5), reduction=4).eval()
    assert model.streams == ["enc", "dec"]
    assert model.side["Dec0"].cross_attn is not None and model.side["Enc0"].cross_attn is None
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(0, 101, (2, 7), generator=g),
         "decoder_input_ids": torch.randint(0, 101, (2, 5), generator=g)}
    y = {**x, "decoder_input_ids": x["decoder_input_ids"].clone()}
    y["decoder_input_ids"][:, -1] = (y["decoder_input_ids"][:, -1] + 1) % 101
    with torch.no_grad():
        a, b = model(**x).sequences["dec"], model(**y).sequences["dec"]
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # earlier positions never see the last token
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_lst_bad_input(bert):
    with pytest.raises(ValueError, match="reduction factor 5 does not divide the width of stream 'text' 32"):
        apply_lst(copy.deepcopy(bert), reduction=5)
    with pytest.raises(ValueError, match="not divisible by its 4 heads"):
        apply_lst(copy.deepcopy(bert), reduction=16)  # d = 2 < 4 heads
    with pytest.raises(ValueError, match="gate_temperature"):
        apply_lst(copy.deepcopy(bert), gate_temperature=0.0)


# ------------------------------------------------------------------------------------- UniPT
def test_parallel_interaction_by_hand():
    agg = UniPTAggregator([2, 2], 8, reduction=4)
    A = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    Fi = torch.tensor([[[2.0, 0.0], [1.0, 1.0]]])
    # A Fᵀ = [[2, 1], [0, 1]] -> l1 rows [[2/3, 1/3], [0, 1]] -> + I = [[5/3, 1/3], [0, 2]]
    # (W F) = [[5/3*2 + 1/3*1, 1/3], [2, 2]]
    torch.testing.assert_close(agg.interaction(A, Fi, None), torch.tensor([[[11 / 3, 1 / 3], [2.0, 2.0]]]))
    # key 1 masked: A Fᵀ ⊙ m = [[2, 0], [0, 0]] -> [[1, 0], [0, 0]] (all-zero row stays 0) + I
    torch.testing.assert_close(agg.interaction(A, Fi, torch.tensor([[1, 0]])), torch.tensor([[[4.0, 0.0], [1.0, 1.0]]]))


def reference_unipt(agg: UniPTAggregator, feats, anchor, mask):
    """UniPT by the paper's equations, token by token (float64)."""
    m = mask.double()
    mean = lambda x: (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # noqa: E731
    A = agg.down[-1](anchor)
    a = mean(A)
    B, N, _ = A.shape
    merged, logits = [], []
    for down, h in zip(agg.down, feats):
        Fi = down(h)
        Mi = torch.zeros_like(A)
        for b in range(B):
            for q in range(N):
                w = torch.relu(torch.stack([A[b, q] @ Fi[b, k] * m[b, k] for k in range(N)]))
                w = w / w.abs().sum().clamp_min(1e-6)
                Mi[b, q] = (w[:, None] * Fi[b]).sum(0) + Fi[b, q]
        merged.append(Mi)
        logits.append(agg.confidence(a * mean(Fi)))
    c = torch.softmax(torch.cat(logits, 1), 1)
    M = sum(c[:, i, None, None] * merged[i] for i in range(len(merged)))
    return agg.up(torch.relu(A + agg.proj(M)))


def test_unipt_matches_reference_and_replaces_the_final_feature(bert):
    model = apply_unipt(copy.deepcopy(bert).double(), reduction=4)
    assert isinstance(model, UniPT) and model.streams == ["text"]
    assert model.feature_keys["text"] == ["embed:text", "En0", "En1"]  # anchor: the final feature (En2)
    x = bert_inputs()
    state, record = model.prefix(**x)
    agg = model.unipt["text"]
    with torch.no_grad():
        ref = reference_unipt(agg, [record[k] for k in model.feature_keys["text"]], state.streams["text"],
                              state.masks["text"])
        out = model.from_prefix(state, record)
        torch.testing.assert_close(out.sequences["text"], ref)
        torch.testing.assert_close(out.pooled, model.backbone.pooler(ref))
        res = apply_unipt(copy.deepcopy(bert).double(), reduction=4, residual=True)
        res.unipt.load_state_dict(model.unipt.state_dict())
        torch.testing.assert_close(res(**x).sequences["text"], ref + state.streams["text"])
    # exact count: (L+1)(D d + 3d) + (d² + 3d) + (d D + D) + (d + 1), L = 3, D = 32, d = 8
    D, d = 32, 8
    assert sum(p.numel() for p in model.trainable.values()) == 4 * (D * d + 3 * d) + d * d + 3 * d + d * D + D + d + 1


def test_unipt_no_graph_t5_stream_and_bad_input(bert, t5):
    model = apply("unipt", copy.deepcopy(bert))
    x = bert_inputs()
    assert count_saved(lambda: model.prefix(**x)) == 0
    model(**x).pooled.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    m5 = apply_unipt(copy.deepcopy(t5))
    assert m5.streams == ["dec"] and m5.feature_keys["dec"] == [embed_key("dec"), "Dec0"]
    with pytest.raises(ValueError, match="reduction factor 3 does not divide the width 32"):
        apply_unipt(copy.deepcopy(bert), reduction=3)
    with pytest.raises(UnknownNameError, match="unknown stream 'vision'; valid streams: text"):
        apply_unipt(copy.deepcopy(bert), streams=["vision"])
