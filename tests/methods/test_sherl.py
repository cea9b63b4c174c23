"""SHERL wrapper: the frozen prefix builds no graph, the late route equals a hand-assembled
reference (BERT, multi-layer insertion, T5 with the regulated encoder), gradients reach only the
MTSA through the frozen last unit, the ablation aggregators, and bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vlkit.methods.petl import apply
from vlkit.methods.sherl import SHERL, apply_sherl
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError
from vlkit.nn.mtsa import AGGREGATORS, mtsa_num_parameters

BERT = dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=101,
            max_position_embeddings=32)
T5 = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48, head_dim=8,
          vocab_size=101, relative_attention_num_buckets=8, relative_attention_max_distance=16)


@pytest.fixture(scope="module")
def bert():
    return build("bert-base", **BERT)


@pytest.fixture(scope="module")
def t5():
    return build("t5-base", **T5)


def bert_inputs(batch=3, n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def t5_inputs(batch=2, n=9, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, dec = torch.randint(0, 101, (batch, n), generator=g), torch.randint(0, 101, (batch, m), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
            "decoder_attention_mask": torch.ones(batch, m, dtype=torch.long)}


class SavedCounter:
    """Counts the tensors autograd saves for backward (``saved_tensors_hooks``)."""

    def __init__(self):
        self.count, self.bytes = 0, 0

    def __enter__(self):
        def pack(t):
            self.count += 1
            self.bytes += t.numel() * t.element_size()
            return t
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_frozen_prefix_builds_no_graph_even_with_trainable_backbone_params(bert):
    model = apply_sherl(copy.deepcopy(bert))
    # Enforced by the code (no_grad around embed + run_units), not by the frozen flags: make
    # every backbone parameter require grad again and the prefix still saves nothing.
    model.backbone.requires_grad_(True)
    with torch.enable_grad(), SavedCounter() as saved:
        state, record = model.prefix(**bert_inputs())
    assert saved.count == 0
    assert set(record) == {"En0", "En1", "En2"}
    for t in [*record.values(), *state.streams.values()]:
        assert not t.requires_grad and t.grad_fn is None
    # the late route does save tensors (one unit + the MTSA), so the counter works
    with SavedCounter() as late:
        model.from_prefix(state, record)
    assert late.count > 0


def test_saved_tensors_do_not_grow_with_the_frozen_depth():
    """Autograd memory of a SHERL step = MTSA tiers + one unit: adding frozen units adds only
    the tiers of their features, whereas full fine-tuning adds whole units."""
    def saved_bytes(layers, method):
        bb = build("bert-base", **{**BERT, "num_hidden_layers": layers})
        model = apply(method, bb)
        with SavedCounter() as s:
            model(**bert_inputs())
        return s.bytes

    sherl = saved_bytes(6, "sherl") - saved_bytes(3, "sherl")
    full = saved_bytes(6, "full") - saved_bytes(3, "full")
    assert 0 < sherl < 0.5 * full


def test_output_equals_hand_assembled_reference_and_gate_starts_at_zero(bert):
    model = apply_sherl(copy.deepcopy(bert), reduction=4)
    bb, x = model.backbone, bert_inputs()
    assert model.mtsa[0].gate().item() == 0.0  # tanh(alpha / T), alpha = 0
    with torch.no_grad():
        rec = {}
        st = bb.run_units(bb.embed(**x), 0, 3, record=rec)
        merged = model.mtsa[0]([rec["En0"], rec["En1"], rec["En2"]], st.streams["text"])
        # gate 0: the last unit's usual input does not enter at all
        torch.testing.assert_close(merged, model.mtsa[0]([rec["En0"], rec["En1"], rec["En2"]],
                                                         torch.randn_like(merged)))
        st.streams["text"] = merged
        ref = bb.finalize(bb.run_units(st, 3, 4))
        out = model(**x)
    torch.testing.assert_close(out.pooled, ref.pooled)
    torch.testing.assert_close(out.sequences["text"], ref.sequences["text"])


def test_only_mtsa_trains_and_gradients_cross_the_frozen_last_unit(bert):
    model = apply_sherl(copy.deepcopy(bert).double(), reduction=4)
    assert set(model.trainable) == {f"mtsa.0.{k}" for k, _ in model.mtsa[0].named_parameters()}
    assert sum(p.numel() for p in model.trainable.values()) == mtsa_num_parameters(32, 3, 4)
    x = bert_inputs()

    def loss():
        out = model(**x)
        return (out.pooled ** 2).sum() + out.sequences["text"][:, 1].sum()

    loss().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    w = model.mtsa[0].tiers[1].down.weight
    v = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(0))
    analytic = (w.grad * v).sum()
    eps = 1e-6
    with torch.no_grad():
        w += eps * v
        up = loss()
        w -= 2 * eps * v
        down = loss()
        w += eps * v
    torch.testing.assert_close(analytic, (up - down) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_backbone_stays_in_eval_mode_and_late_dropout(bert):
    model = apply_sherl(copy.deepcopy(bert)).train()
    assert model.training and model.mtsa.training
    assert not any(m.training for m in model.backbone.modules())
    with_dropout = apply_sherl(copy.deepcopy(bert), late_dropout=True).train()
    assert with_dropout.backbone.unit("En3").training and not with_dropout.backbone.unit("En2").training
    with_dropout.eval()
    assert not with_dropout.backbone.unit("En3").training


def test_multi_layer_insertion_merges_everything_below_each_late_unit(bert):
    model = apply_sherl(copy.deepcopy(bert), reduction=4, insert_last=2)
    assert model.stop == 2 and model.late_names == ["En2", "En3"]
    assert [m.num_layers for m in model.mtsa] == [2, 3]
    bb, x = model.backbone, bert_inputs()
    with torch.no_grad():
        rec = {}
        st = bb.run_units(bb.embed(**x), 0, 2, record=rec)
        feats = [rec["En0"], rec["En1"]]
        st.streams["text"] = model.mtsa[0](feats, st.streams["text"])
        r2 = {}
        st = bb.run_units(st, 2, 3, record=r2)
        st.streams["text"] = model.mtsa[1](feats + [r2["En2"]], st.streams["text"])
        ref = bb.finalize(bb.run_units(st, 3, 4))
        torch.testing.assert_close(model(**x).pooled, ref.pooled)


def test_embed_features_registry_and_seeding(bert):
    rng = torch.get_rng_state()
    model = apply("sherl", copy.deepcopy(bert), features="embed+units", reduction=4)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded locally, global RNG untouched
    assert isinstance(model, SHERL)
    assert model.feature_keys == ["embed:text", "En0", "En1", "En2"]
    same = apply("sherl", copy.deepcopy(bert), features="embed+units", reduction=4)
    other = apply("sherl", copy.deepcopy(bert), features="embed+units", reduction=4, seed=1)
    w = model.mtsa[0].up.weight
    assert torch.equal(w, same.mtsa[0].up.weight) and not torch.equal(w, other.mtsa[0].up.weight)


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_ablation_aggregators(bert, aggregator):
    model = apply_sherl(copy.deepcopy(bert), aggregator=aggregator)  # d = 32 / 8 = 4: 4 MHSA heads fit
    assert sum(p.numel() for p in model.trainable.values()) == mtsa_num_parameters(32, 3, 8, aggregator=aggregator)
    out = model(**bert_inputs())
    F.mse_loss(out.pooled, torch.zeros_like(out.pooled)).backward()
    assert all(p.grad is not None for p in model.trainable.values())


def test_t5_regulates_encoder_and_last_decoder_unit(t5):
    model = apply_sherl(copy.deepcopy(t5), reduction=4)
    assert model.stream == "dec" and model.late_names == ["Dec2"] and model.stop == 5
    assert model.feature_keys == ["Dec0", "Dec1"] and model.context_keys == ["Enc0", "Enc1", "Enc2"]
    assert set(model.trainable) == ({f"mtsa.{n}" for n, _ in model.mtsa.named_parameters()}
                                    | {f"context_mtsa.{n}" for n, _ in model.context_mtsa.named_parameters()})
    assert any(n.startswith("context_mtsa.norm") for n in model.trainable)
    bb, x = model.backbone, t5_inputs()
    with torch.no_grad():
        rec = {}
        st = bb.run_units(bb.embed(**x), 0, 5, record=rec)  # all Enc + Dec0, Dec1
        st.streams["enc"] = model.context_mtsa([rec["Enc0"], rec["Enc1"], rec["Enc2"]], st.streams["enc"])
        st.streams["dec"] = model.mtsa[0]([rec["Dec0"], rec["Dec1"]], st.streams["dec"])
        ref = bb.finalize(bb.run_units(st, 5, 6))
        out = model(**x)
    torch.testing.assert_close(out.pooled, ref.pooled)
    torch.testing.assert_close(out.sequences["enc"], ref.sequences["enc"])  # the regulated encoder
    frozen = apply_sherl(copy.deepcopy(t5), reduction=4, regulate_context=False)
    assert frozen.context_mtsa is None and not any(n.startswith("context") for n in frozen.trainable)
    assert frozen.keep == ("Dec0", "Dec1")  # the encoder's unit outputs are not even kept
    with torch.no_grad():
        torch.testing.assert_close(frozen(**x).sequences["enc"], bb(**x).sequences["enc"])  # encoder untouched


def test_bad_input_errors_and_backbone_left_untouched(bert):
    bb = copy.deepcopy(bert).requires_grad_(True)
    with pytest.raises(ValueError, match="reduction factor 7 does not divide the width 32"):
        apply_sherl(bb, reduction=7)
    with pytest.raises(UnknownNameError, match="unknown aggregator 'sum'.*mtsa.*maxpool"):
        apply_sherl(bb, aggregator="sum")
    with pytest.raises(UnknownNameError, match="feature set"):
        apply_sherl(bb, features="all")
    with pytest.raises(ValueError, match=r"insert_last must be an int in \[1, 3\]"):
        apply_sherl(bb, insert_last=4)
    assert all(p.requires_grad for p in bb.parameters())  # nothing frozen by a failed call
    one = build("bert-base", **{**BERT, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="at least 2 units.*got 1: En0"):
        apply_sherl(one)
    two = build("bert-base", **{**BERT, "num_hidden_layers": 2})
    with pytest.raises(ValueError, match="at least 2 shallow features.*embed\\+units"):
        apply_sherl(two)
    assert apply_sherl(two, features="embed+units").feature_keys == ["embed:text", "En0"]
    with pytest.raises(ValueError, match="reads no other stream"):
        apply_sherl(copy.deepcopy(bert), regulate_context=True)
    with pytest.raises(TypeError, match="vlkit Backbone"):
        apply_sherl(torch.nn.Linear(2, 2))
