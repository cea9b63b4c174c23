"""The DAS study (Tables A-C): the tie rule by hand, the config's checks, and on the ci
profile's tiny ViLT-style backbone the properties the tables rest on -- the searched set is
made of candidates, a skip lowers the GMACs column by one unit minus its adapters, DAS trains
far fewer parameters than full fine-tuning, random sets are distinct, runs are seeded."""

import dataclasses

import pytest

from vlkit import config
from vlkit.efficiency import macs, unit_macs
from vlkit.methods.das import apply_das, candidates
from vlkit.methods.das.study import (DASConfig, paper_gmacs, study_table_a, study_table_b, verdict)
from vlkit.models import build
from vlkit.models.protocol import UnknownNameError


def test_verdict_hand_worked():
    # noise = max(hypot(1.5, 2.0) = 2.5, se)
    assert verdict(80.0, 1.5, 77.6, 2.0) == "tie"
    assert verdict(80.0, 1.5, 77.4, 2.0) == "DAS"
    assert verdict(70.0, 1.5, 72.6, 2.0) == "random"
    assert verdict(80.0, 0.0, 78.0, 0.0, se=2.5) == "tie"  # single runs: the test SE is the noise floor
    assert verdict(80.0, 0.0, 78.0, 0.0, se=1.0) == "DAS"


@pytest.fixture(scope="module")
def ci_cfg():
    return config.resolve("das", "ci")


def test_config_errors_name_the_bad_value(ci_cfg):
    with pytest.raises(UnknownNameError, match="'everyy'"):
        dataclasses.replace(ci_cfg, search={"everyy": 2})
    with pytest.raises(UnknownNameError, match="'local'"):
        dataclasses.replace(ci_cfg, scopes={"vilt-mini": ["local"]})
    with pytest.raises(ValueError, match="not in the Tab. A grid"):
        dataclasses.replace(ci_cfg, headline=[["vilt-mini", "shapes_nlvr", "global", 5]])
    with pytest.raises(ValueError, match="classification tasks"):
        dataclasses.replace(ci_cfg, tasks=["shapes_retrieval"])
    with pytest.raises(UnknownNameError, match="'das'"):
        dataclasses.replace(ci_cfg, text_methods=["das"])


@pytest.fixture(scope="module")
def table_a(ci_cfg):
    cache: dict = {}
    table, policy, searches = study_table_a(ci_cfg, "ci", cache=cache, log=lambda m: None)
    return table, policy, searches, cache


def test_table_a_rows_and_columns(table_a, ci_cfg):
    table, policy, searches, cache = table_a
    base, _ = cache[("backbone", "vilt-mini")]
    cands = candidates(base, "global")
    das = table[(table.method == "das") & (table.k == 1)]
    assert len(das) == 1 and das.skipped.iloc[0] in cands
    k0 = table[(table.method == "das") & (table.k == 0)].iloc[0]
    full = table[table.method == "full"].iloc[0]
    # the skip saves one unit's MACs minus its two parallel adapters, plus the skip adapter
    # (which costs what those adapters cost): exactly the unit's own MACs on the test example
    assert das.add_gmacs.iloc[0] < k0.add_gmacs < 0.1 and full.add_gmacs == 0.0
    assert das.trainable.iloc[0] < k0.trainable < full.trainable / 10
    # policy: one row per round (before + after each) per candidate, probabilities in (0, 1)
    assert len(policy) == (ci_cfg.search_options()["rounds"] + 1) * len(cands)
    assert policy.p.between(0, 1).all()
    assert set(searches) == {("vilt-mini", "shapes_nlvr", "global", 1, 0)}


def test_skip_gmacs_identity_on_the_tiny_backbone(table_a):
    _, _, searches, cache = table_a
    base, _ = cache[("backbone", "vilt-mini")]
    x = base.dummy_inputs(1)
    k0 = apply_das(build_copy(base), skip=[], scope="global")
    k1 = apply_das(build_copy(base), skip=["En1"], scope="global")
    # the skip adapter costs what the unit's two parallel adapters cost: a skip saves exactly
    # the plain unit's MACs (DAS issue; apply.py docstring)
    assert macs(k0, x) - macs(k1, x) == unit_macs(base, x)["En1"]


def build_copy(m):
    import copy

    return copy.deepcopy(m)


def test_table_b_random_sets_distinct_and_seeded(table_a, ci_cfg):
    _, _, searches, cache = table_a
    summary, runs = study_table_b(ci_cfg, "ci", dict(searches), cache=cache, log=lambda m: None)
    rnd = runs[runs.kind == "random"]
    assert len(rnd) == ci_cfg.random_sets and rnd.skipped.is_unique
    assert len(runs[runs.kind == "DAS"]) == len(ci_cfg.seeds)
    again, runs2 = study_table_b(ci_cfg, "ci", dict(searches), cache=cache, log=lambda m: None)
    assert runs.equals(runs2)
    assert summary.verdict.iloc[0] in ("tie", "DAS", "random")


def test_paper_gmacs_k_skips_save_the_units(ci_cfg):
    cfg = dataclasses.replace(ci_cfg, paper_presets=["vilt-b32"], paper_ks=[1, 2])
    t = paper_gmacs(cfg)
    base = build("vilt-b32", **cfg.overrides["vilt-b32"])
    per_unit = unit_macs(base)["En0"] / 1e9  # every ViLT unit costs the same
    k = t.set_index("k")["add_gmacs"]
    assert k[1] - k[0] == pytest.approx(-per_unit, abs=2e-3)
    assert k[2] - k[0] == pytest.approx(-2 * per_unit, abs=2e-3)
