"""DAS search (Wu et al. 2023, Sec. 3.1; official vilt_module_search.py): it finds truly
redundant units, is deterministic for a seed, scores the S sets of a round on one shared
validation batch, uses a fresh batch each round, leaves the pre-trained model untouched, and
rejects bad input before training."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vlkit.methods.das import ValBatches, search
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError
from vlkit.models.towers import init_bert_style
from vlkit.nn.adapters import SkipAdapter
from vlkit.train import TrainConfig

TINY = dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=101)
REDUNDANT = ("En1", "En3")


@pytest.fixture(scope="module")
def backbone():
    """Tiny ViLT with strong random layers, except En1 and En3, which are exact identities
    (attention output and FFN output projections zeroed: pre-norm x + 0 + 0)."""
    b = build("vilt-b32", **TINY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init_bert_style(b, std=0.3)
    with torch.no_grad():
        for name in REDUNDANT:
            for lin in (b.unit(name).attn.o, b.unit(name).ffn.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    return b.eval()


@pytest.fixture(scope="module")
def data(backbone):
    """(train, val): examples whose target is the pre-trained model's own pooled output."""
    g = torch.Generator().manual_seed(0)

    def make(n, offset):
        ids = torch.randint(0, 101, (n, 6), generator=g)
        pix = torch.randn(n, 3, 64, 64, generator=g)
        with torch.no_grad():
            target = backbone(input_ids=ids, pixel_values=pix).pooled
        return [{"input_ids": ids[i], "pixel_values": pix[i], "target": target[i], "idx": offset + i}
                for i in range(n)]

    return make(32, 0), make(20, 1000)


def loss_fn(model, batch):
    out = model.backbone(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).pooled
    return F.mse_loss(out, batch["target"], reduction="sum") / out.shape[0]


def run(backbone, data, loss=loss_fn, **kw):
    opts = dict(k=2, scope="fusion", rounds=7, S=3, every=2, policy_lr=5.0, val_batch_size=4, seed=0, init="zero",
                train_config=TrainConfig(steps=1, batch_size=8, lr=1e-4, seed=0, progress=False))
    opts.update(kw)
    return search(backbone, loss, data[0], data[1], **opts)


def test_search_finds_the_redundant_units(backbone, data):
    """Skipping the two identity units costs nothing; every other set costs a lot: the policy
    must end on exactly those two, with rising probabilities."""
    res = run(backbone, data, rounds=12)
    assert res.best == REDUNDANT
    p = res.probs()
    assert min(p[n] for n in REDUNDANT) > 0.8 > 0.2 > max(p[n] for n in ("En0", "En2"))
    hist = torch.tensor(res.policy_history)
    assert hist.shape == (13, 4) and torch.all(hist[0] == 0.5)
    # the redundant set, whenever scored, has the best reward of its round
    for r in res.rounds:
        if list(REDUNDANT) in r["sets"]:
            assert r["rewards"][r["sets"].index(list(REDUNDANT))] == max(r["rewards"])
    assert res.lr == 5.0 and res.k == 2 and res.candidates == ("En0", "En1", "En2", "En3")


def test_search_is_deterministic_for_a_seed(backbone, data):
    a, b = run(backbone, data), run(backbone, data)
    assert a.to_dict() == b.to_dict()  # best, history, rewards, validation indices, training losses
    c = run(backbone, data, seed=1)
    assert c.val_batches != a.val_batches and c.policy_history != a.policy_history


def test_rounds_use_fresh_validation_batches_shared_by_their_sets(backbone, data):
    calls = []

    def spy(model, batch):
        calls.append((torch.is_grad_enabled(), model.training, batch["idx"].tolist()))
        return loss_fn(model, batch)

    res = run(backbone, data, loss=spy, rounds=7, S=3, every=2)
    vb = res.val_batches
    assert len(vb) == 7 and all(len(b) == 4 for b in vb)
    assert all(set(vb[r]).isdisjoint(vb[r + 1]) for r in range(6))  # successive rounds differ
    first_pass = [i for b in vb[:5] for i in b]  # 20 examples / 4 = 5 batches per pass
    assert sorted(first_pass) == list(range(20))  # no repeat until exhausted
    assert vb[5] + vb[6] != first_pass[:8]  # then a new permutation
    scoring = [c for c in calls if not c[0]]
    assert all(not training for _, training, _ in scoring)  # scored in eval mode
    assert len(scoring) == 7 * 3
    for r in range(7):  # the S sets of a round see the same, recorded batch
        assert [idx for _, _, idx in scoring[3 * r:3 * r + 3]] == [[1000 + i for i in vb[r]]] * 3
        assert len({tuple(s) for s in res.rounds[r]["sets"]}) == 3  # distinct sets
    training = [c for c in calls if c[0]]
    assert len(training) == res.total_steps == res.warmup_steps + 7 * 2
    assert res.warmup_steps == 32 // 8  # one epoch
    assert [r["step"] for r in res.rounds] == [res.warmup_steps + 2 * (r + 1) for r in range(7)]
    assert all(i < 1000 for _, _, idx in training for i in idx)


def test_val_batches_wrap_around():
    vb = ValBatches(10, 3, seed=4)  # 3 batches per pass, example 9 (or another) left out each pass
    rounds = [vb.indices(r) for r in range(30)]
    assert all(len(set(b)) == 3 for b in rounds)
    assert all(set(a).isdisjoint(b) for a, b in zip(rounds, rounds[1:]))  # across passes too
    for p in range(10):
        assert len(set(sum(rounds[3 * p:3 * p + 3], []))) == 9  # no repeat inside a pass
    assert len({tuple(sum(rounds[3 * p:3 * p + 3], [])) for p in range(10)}) == 10  # passes differ
    assert ValBatches(10, 3, seed=4).indices(17) == rounds[17]  # random access = sequential
    assert ValBatches(10, 3, seed=5).indices(0) != rounds[0]


def test_pretrained_backbone_untouched_and_result_applies(backbone, data):
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    res = run(backbone, data, rounds=2)
    after = backbone.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    final = res.apply_to(copy.deepcopy(backbone))
    assert [n for n in final.unit_names if isinstance(final.unit(n), SkipAdapter)] == list(res.best)
    assert all(final.unit(n).adapters for n in final.unit_names if n not in res.best)


def test_bad_input_fails_before_training(backbone, data):
    def never(model, batch):
        raise AssertionError("training started")

    with pytest.raises(ValueError, match=r"S=7 .*C\(4, 2\) = 6"):
        run(backbone, data, loss=never, S=7)
    with pytest.raises(ValueError, match="k=4 must be < the number of fusion-scope candidates"):
        run(backbone, data, loss=never, k=4)
    with pytest.raises(UnknownNameError, match="'vision'.*fusion, global"):
        run(backbone, data, loss=never, scope="vision")
    with pytest.raises(ValueError, match="val_batch_size=50 exceeds the 20"):
        run(backbone, data, loss=never, val_batch_size=50)
    with pytest.raises(ValueError, match="rounds"):
        run(backbone, data, loss=never, rounds=0)
