"""BERT-style text backbones (``bert-base``, ``minilm``) against HF ``BertModel``."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, BertModel

from vlkit.models import PRESETS, build
from vlkit.models.convert import bert_layer_state, config_overrides
from vlkit.models.protocol import UnknownNameError
from vlkit.models.text import TextBackbone, bert_config, masked_mean, minilm_path, minilm_tokenizer


def assert_close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


TINY = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=101,
            max_position_embeddings=64)


def _inputs(batch=3, n=13, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, 9:] = 0  # padding on two rows
    mask[2, 4:] = 0
    types = torch.zeros(batch, n, dtype=torch.long)
    types[:, n // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def tiny():
    return build("bert-base", **TINY)


@pytest.fixture(scope="module")
def tiny_hf_pair(tmp_path_factory):
    """A random HF BertModel saved to disk and our backbone loaded from that folder."""
    torch.manual_seed(1)
    hf = BertModel(bert_config(**TINY)).eval()
    folder = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(folder)
    return hf, build("bert-base", weights=folder)


@torch.no_grad()
def test_equals_hf_bert_with_padding(tiny_hf_pair):
    hf, ours = tiny_hf_pair
    x = _inputs()
    ref, out = hf(**x), ours(**x)
    assert_close(out.sequences["text"], ref.last_hidden_state)
    assert_close(out.pooled, ref.pooler_output)
    # the pooled vector is BERT's tanh(W h_CLS + b)
    w, b = hf.pooler.dense.weight, hf.pooler.dense.bias
    assert_close(out.pooled, torch.tanh(ref.last_hidden_state[:, 0] @ w.T + b))


@torch.no_grad()
def test_from_hf_copies_and_leaves_hf_alone():
    torch.manual_seed(2)
    hf = BertModel(bert_config(**TINY)).eval()
    ours = TextBackbone.from_hf(hf)
    x = _inputs()
    assert_close(ours(**x).sequences["text"], hf(**x).last_hidden_state)
    ours.unit("En0").attn.q.weight.zero_()  # copies, not shared tensors
    assert hf.encoder.layer[0].attention.self.query.weight.abs().sum() > 0


def test_bert_layer_converter_names():
    torch.manual_seed(0)
    sd = BertModel(bert_config(**TINY)).state_dict()
    st = bert_layer_state(sd, "encoder.layer.1.")
    assert torch.equal(st["attn.q.weight"], sd["encoder.layer.1.attention.self.query.weight"])
    assert torch.equal(st["ffn_norm.bias"], sd["encoder.layer.1.output.LayerNorm.bias"])
    assert torch.equal(st["ffn.fc1.weight"], sd["encoder.layer.1.intermediate.dense.weight"])
    assert len(st) == 16
    with pytest.raises(KeyError, match="attention.self.query.weight"):
        bert_layer_state({}, "")


@pytest.mark.slow
def test_bert_base_parameter_count():
    model = build("bert-base")
    assert sum(p.numel() for p in model.parameters()) == 109_482_240
    assert model.unit_names == [f"En{i}" for i in range(12)]
    assert {u.modality for u in model.units} == {"text"}
    x = model.dummy_inputs(2)
    assert x["input_ids"].shape == (2, 128)


def test_bert_config_defaults_and_bad_override():
    c = bert_config()
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size, c.vocab_size) == (
        12, 768, 12, 3072, 30522)
    with pytest.raises(UnknownNameError, match="num_layer.*num_hidden_layers"):
        build("bert-base", num_layer=2)
    assert config_overrides(type(c), {"hidden_size": 8}) == {"hidden_size": 8}


def test_unknown_preset_lists_presets():
    with pytest.raises(UnknownNameError) as err:
        build("nope")
    for name in PRESETS:
        assert name in str(err.value)


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build("bert-base", weights=tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build("bert-base", weights=tmp_path)


# ---------------------------------------------------------------------- protocol
def test_slice_equals_forward(tiny, protocol_checks):
    protocol_checks.slice_whole_equals_forward(tiny, _inputs())


def test_split_slices(tiny, protocol_checks):
    protocol_checks.split_equals_whole(tiny, _inputs())


def test_unit_outputs(tiny, protocol_checks):
    out = protocol_checks.unit_outputs(tiny, _inputs())
    # BERT has no final norm: the last unit's output is the final sequence
    assert torch.equal(out.unit_outputs["En2"], out.sequences["text"])


def test_attention_maps(tiny, protocol_checks):
    out = protocol_checks.attentions(tiny, _inputs())
    assert out.attentions["En0"][0].shape == (3, 4, 13, 13)


def test_replace_unit(tiny, protocol_checks):
    protocol_checks.replace_roundtrip(tiny, _inputs(), "En1")


def test_unknown_unit(tiny, protocol_checks):
    protocol_checks.unknown_unit(tiny)


def test_mean_pooling_is_masked_mean():
    torch.manual_seed(0)
    m = build("bert-base", pooling="mean", **TINY)
    x = _inputs()
    with torch.no_grad():
        out = m(**x)
    row2 = out.sequences["text"][2, :4].mean(0)  # row 2 has 4 real tokens
    assert_close(out.pooled[2], row2)
    assert_close(masked_mean(torch.ones(1, 3, 2), torch.tensor([[1, 0, 0]])), torch.ones(1, 2))
    with pytest.raises(UnknownNameError, match="cls, mean"):
        build("bert-base", pooling="max", **TINY)


# ---------------------------------------------------------------------- MiniLM (real weights)
@pytest.fixture(scope="module")
def minilm():
    return build("minilm")


@torch.no_grad()
def test_minilm_equals_hf_automodel(minilm):
    hf = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    tok = minilm_tokenizer()
    batch = tok(["a red circle above a blue square", "is there a green triangle?"], padding=True,
                return_tensors="pt")
    ref, out = hf(**batch), minilm(**batch)
    assert_close(out.sequences["text"], ref.last_hidden_state)
    # sentence-transformers' mean pooling over real tokens
    assert_close(out.pooled, masked_mean(ref.last_hidden_state, batch["attention_mask"]))
    assert minilm.pooling == "mean" and minilm.unit_names == [f"En{i}" for i in range(6)]
    assert sum(p.numel() for p in minilm.parameters()) == sum(p.numel() for p in hf.parameters()) == 22_713_216
    assert minilm_tokenizer() is tok  # cached


@torch.no_grad()
def test_minilm_sentence_similarity_is_meaningful(minilm):
    """Real weights: paraphrases are closer than unrelated sentences (cosine of mean pools)."""
    tok = minilm_tokenizer()
    s = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    e = torch.nn.functional.normalize(minilm(**tok(s, padding=True, return_tensors="pt")).pooled, dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_direct_construction_matches_hf_shapes():
    """``TextBackbone(config)`` (fresh init) has exactly BertModel's parameter shapes."""
    cfg = bert_config(**TINY)
    ours = TextBackbone(cfg)
    hf = BertModel(cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    loaded = TextBackbone.from_hf(hf)
    assert [tuple(p.shape) for p in loaded.parameters()] == [tuple(p.shape) for p in ours.parameters()]


def test_checkpoint_that_does_not_fit_is_refused(tiny_hf_pair, tmp_path):
    hf, _ = tiny_hf_pair
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"missing \['encoder.layer.3"):
        build("bert-base", weights=tmp_path, num_hidden_layers=4)  # the checkpoint has 3 layers
