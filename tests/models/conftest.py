"""Shared protocol checks for the backbone tests (text, ViLT, T5).

``protocol_checks`` is a fixture returning :class:`ProtocolChecks`; each preset's test file
calls its methods from separate tests on a tiny configuration of that preset.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

ATOL = 1e-5


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def assert_outputs_equal(o1, o2, atol: float = ATOL) -> None:
    """Same pooled vector and same final sequences."""
    assert_close(o1.pooled, o2.pooled, atol)
    assert set(o1.sequences) == set(o2.sequences)
    for k in o1.sequences:
        assert_close(o1.sequences[k], o2.sequences[k], atol)


class Skip(nn.Module):
    """An identity unit (what a DAS skip without adapter would be)."""

    def forward(self, x, ctx=None):
        return x


class ProtocolChecks:
    """Generic checks of :class:`vlkit.models.protocol.Backbone` behaviour."""

    @staticmethod
    @torch.no_grad()
    def slice_whole_equals_forward(model, inputs):
        n = len(model.units)
        out = model.finalize(model.run_units(model.embed(**inputs), 0, n))
        assert_outputs_equal(out, model(**inputs))

    @staticmethod
    @torch.no_grad()
    def split_equals_whole(model, inputs):
        names, n = model.unit_names, len(model.units)
        state = model.embed(**inputs)
        whole = model.finalize(model.run_units(state, 0, n))
        for k in sorted({1, n // 2, n - 1}):
            first = model.run_units(state, 0, k)
            by_int = model.finalize(model.run_units(first, k, n))
            by_name = model.finalize(model.run_units(model.run_units(state, names[0], names[k]), names[k], None))
            assert_outputs_equal(by_int, whole)
            assert_outputs_equal(by_name, whole)
        # run_units works on a copy: the embedded state is unchanged afterwards
        again = model.finalize(model.run_units(state, 0, n))
        assert_outputs_equal(again, whole)

    @staticmethod
    @torch.no_grad()
    def unit_outputs(model, inputs):
        out = model(output_units=True, **inputs)
        assert list(out.unit_outputs) == model.unit_names
        state = model.embed(**inputs)
        for i, name in enumerate(model.unit_names):
            rec = {}
            model.run_units(state, 0, i + 1, record=rec)
            assert_close(out.unit_outputs[name], rec[name])
            stream = model.spec(name).stream
            assert out.unit_outputs[name].shape[:2] == state.streams[stream].shape[:2]
        # consecutive units really compute something different
        outs = list(out.unit_outputs.values())
        for a, b in zip(outs, outs[1:]):
            if a.shape == b.shape:
                assert not torch.allclose(a, b)
        return out

    @staticmethod
    @torch.no_grad()
    def attentions(model, inputs):
        plain = model(**inputs)
        out = model(output_attentions=True, **inputs)
        assert_outputs_equal(out, plain)  # explicit softmax path == fused SDPA path
        assert list(out.attentions) == model.unit_names
        state = model.embed(**inputs)
        for name, maps in out.attentions.items():
            spec = model.spec(name)
            x = state.streams[spec.stream]
            b, n = x.shape[:2]
            heads = maps[0].shape[1]
            assert heads >= 1 and maps[0].shape == (b, heads, n, n), (name, maps[0].shape)
            for m in maps:
                assert_close(m.sum(-1), torch.ones_like(m.sum(-1)))
                assert (m >= 0).all()
            mask = state.masks.get(spec.stream)
            if mask is not None:  # padded keys get (numerically) no attention
                dropped = maps[0].masked_select((mask == 0)[:, None, None, :].expand_as(maps[0]))
                assert dropped.numel() == 0 or dropped.max() < 1e-6
        return out

    @staticmethod
    @torch.no_grad()
    def replace_roundtrip(model, inputs, name):
        before = model(**inputs)
        original = model.unit(name)
        old = model.replace_unit(name, Skip())
        assert old is original
        assert isinstance(model.unit(name), Skip)
        skipped = model(**inputs)
        assert not torch.allclose(skipped.pooled, before.pooled, atol=1e-4)
        back = model.replace_unit(name, old)
        assert isinstance(back, Skip) and model.unit(name) is original
        after = model(**inputs)
        assert torch.equal(after.pooled, before.pooled)
        for k in before.sequences:
            assert torch.equal(after.sequences[k], before.sequences[k])
        return skipped

    @staticmethod
    def unknown_unit(model):
        from vlkit.models.protocol import UnknownNameError

        for call in (lambda: model.unit("Nope7"), lambda: model.replace_unit("Nope7", Skip()),
                     lambda: model.run_units(model.embed(**model.dummy_inputs()), "Nope7")):
            with pytest.raises(UnknownNameError) as err:
                call()
            msg = str(err.value)
            assert "'Nope7'" in msg
            for valid in model.unit_names:
                assert valid in msg


@pytest.fixture
def protocol_checks() -> type[ProtocolChecks]:
    return ProtocolChecks
