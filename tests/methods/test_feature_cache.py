"""The frozen-prefix cache: losses with the cache on and off agree (SHERL on BERT and T5, LST,
UniPT), the size per example is what the layout says, builds are atomic, reused only when the
fingerprint matches, and refused over the size limit."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from vlkit.methods.feature_cache import PrefixCache, frozen_prefix
from vlkit.methods.petl import apply
from vlkit.models import build

BERT = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=101,
            max_position_embeddings=32)
T5 = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=48, head_dim=8,
          vocab_size=101, relative_attention_num_buckets=8, relative_attention_max_distance=16)
N, L = 10, 12


@pytest.fixture(scope="module")
def bert():
    return build("bert-base", **BERT)


@pytest.fixture(scope="module")
def t5():
    return build("t5-base", **T5)


def dataset(t5=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(1, 101, (N, L), generator=g)}
    mask = torch.ones(N, L, dtype=torch.long)
    mask[::3, 8:] = 0  # padded rows
    x["attention_mask"] = mask
    if t5:
        x["decoder_input_ids"] = torch.randint(0, 101, (N, 5), generator=g)
    return x, torch.randint(0, 2, (N,), generator=g)


def loss_and_grads(model, head, out, y):
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    loss = F.cross_entropy(head(out.pooled), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.trainable.items()}


@pytest.mark.parametrize("method,preset", [("sherl", "bert"), ("sherl", "t5"), ("lst", "bert"), ("unipt", "bert")])
def test_losses_agree_with_cache_on_and_off(method, preset, bert, t5, tmp_path):
    backbone = copy.deepcopy(bert if preset == "bert" else t5)
    model = apply(method, backbone, reduction=4)
    head = torch.nn.Linear(32, 2)
    x, y = dataset(t5=preset == "t5")
    cache = PrefixCache(model, tmp_path / "c").build(x, batch_size=4, subset="train[:10]")  # last batch: 2
    assert len(cache) == N and cache.subset == "train[:10]"
    idx = torch.tensor([7, 2, 9, 0])
    direct = loss_and_grads(model, head, model(**{k: v[idx] for k, v in x.items()}), y[idx])
    cached = loss_and_grads(model, head, model.from_prefix(*cache.batch(idx)), y[idx])
    torch.testing.assert_close(cached[0], direct[0], rtol=1e-5, atol=0)
    for name in direct[1]:
        torch.testing.assert_close(cached[1][name], direct[1][name], rtol=1e-5, atol=1e-7)
    seen = torch.cat([i for i, _ in cache.batches(3, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == list(range(N))


def test_layout_and_bytes_per_example(bert, t5, tmp_path):
    model = apply("sherl", copy.deepcopy(bert), reduction=4)  # features En0, En1 (stop = 2)
    x, _ = dataset()
    cache = PrefixCache(model, tmp_path / "bert").build(x, batch_size=4)
    # two (L, 32) fp32 features + the int64 mask; the state's stream is En1's output, stored once
    assert cache.bytes_per_example == 2 * L * 32 * 4 + L * 8
    meta = json.loads((tmp_path / "bert" / "meta.json").read_text())
    kinds = {e["name"]: e["kind"] for e in meta["entries"]}
    assert kinds["streams/text"] == "alias" and kinds["record/En1"] == "example"
    assert cache.nbytes == N * cache.bytes_per_example
    # T5: the relative position biases do not depend on the example -> stored once
    m5 = apply("sherl", copy.deepcopy(t5), reduction=4)
    x5, _ = dataset(t5=True)
    c5 = PrefixCache(m5, tmp_path / "t5").build(x5, batch_size=4)
    kinds = {e["name"]: e["kind"] for e in c5.meta["entries"]}
    assert kinds["extra/bias:enc"] == "shared" and kinds["extra/bias:dec"] == "shared"
    assert kinds["masks/dec"] == "none"
    state, record = c5.batch([3, 1])
    with torch.no_grad():
        ref_state, ref_record = m5.prefix(**{k: v[[3, 1]] for k, v in x5.items()})
    for k in ref_record:
        torch.testing.assert_close(record[k], ref_record[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state.extra["bias:dec"], ref_state.extra["bias:dec"])


def test_reuse_fingerprint_atomicity_and_size_limit(bert, tmp_path):
    model = apply("sherl", copy.deepcopy(bert), reduction=4)
    x, _ = dataset()
    path = tmp_path / "cache"
    PrefixCache(model, path).build(x, batch_size=4)

    calls = []
    original = model.prefix
    model.prefix = lambda **kw: calls.append(1) or original(**kw)
    again = PrefixCache(model, path).build(x, batch_size=4)  # same fingerprint: nothing recomputed
    assert calls == [] and again.num_examples == N
    x2 = {k: v.clone() for k, v in x.items()}
    x2["input_ids"][0, 0] += 1
    with pytest.raises(ValueError, match="fingerprint"):
        PrefixCache(model, path).build(x2, batch_size=4)

    def failing(**kw):  # crash while writing the second batch
        if calls:
            raise RuntimeError("disk on fire")
        calls.append(1)
        return original(**kw)
    model.prefix = failing
    with pytest.raises(RuntimeError, match="disk on fire"):
        PrefixCache(model, tmp_path / "broken").build(x, batch_size=4)
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # no half-written cache, no temporary folder
    model.prefix = original

    with pytest.raises(ValueError, match="GiB.*named subset"):
        PrefixCache(model, tmp_path / "big", max_bytes=1000).build(x, batch_size=4)
    assert not (tmp_path / "big").exists()
    with pytest.raises(IndexError):
        PrefixCache(model, path).build(x, batch_size=4).batch([N])
    with pytest.raises(TypeError, match="FrozenPrefixModel"):
        PrefixCache(model.backbone, tmp_path / "x")


def test_frozen_prefix_requires_eval_mode(bert):
    bb = copy.deepcopy(bert).train()
    with pytest.raises(RuntimeError, match="eval mode"):
        frozen_prefix(bb, 2, dataset()[0])
