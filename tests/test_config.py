"""params.yaml resolution: profiles, precedence, and errors that name the bad key."""

import dataclasses

import pytest
from hypothesis import given, strategies as st

from vlkit import config
from vlkit.config import ConfigError, resolve
from vlkit.models.protocol import UnknownNameError


def params(**tour):
    return {"profile": "default", "seed": 3, "tour": tour}


def test_precedence_defaults_profile_override():
    p = params(defaults={"preset": "bert-base", "batch_size": 4}, ci={"batch_size": 2})
    assert resolve("tour", "default", p) == config.TourConfig(preset="bert-base", batch_size=4)
    assert resolve("tour", "ci", p).batch_size == 2
    assert resolve("tour", "ci", p, batch_size=7).batch_size == 7
    assert resolve("tour", None, p).batch_size == 4  # top-level profile


def test_repository_params_file_resolves_every_stage_and_profile():
    p = config.load_params()
    for stage in p:
        if stage in config.TOP_LEVEL_KEYS:
            continue
        for profile in config.PROFILES:
            assert dataclasses.is_dataclass(resolve(stage, profile, p))


def test_typo_in_key_is_named_with_valid_keys():
    with pytest.raises(UnknownNameError) as e:
        resolve("tour", "ci", params(defaults={"batch_sise": 2}))
    assert "batch_sise" in str(e.value) and "batch_size" in str(e.value)


def test_unknown_profile_stage_block_and_top_level_key():
    with pytest.raises(UnknownNameError, match="paper"):
        resolve("tour", "gpu", params())
    with pytest.raises(UnknownNameError, match="tour"):
        resolve("tuor", "ci", params())
    with pytest.raises(UnknownNameError, match="defaults"):
        resolve("tour", "ci", params(defualts={}))


def test_unknown_top_level_key(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("profile: ci\nsed: 1\n")
    with pytest.raises(UnknownNameError, match="sed"):
        config.load_params(f)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"tour.defaults.batch_size = 'two'"):
        resolve("tour", "ci", params(defaults={"batch_size": "two"}))
    with pytest.raises(ConfigError, match="batch_size"):
        resolve("tour", "ci", params(defaults={"batch_size": True}))  # bool is not an int
    with pytest.raises(ConfigError, match="seed"):
        config.seed({"seed": "0"})


@given(value=st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.booleans(),
                       st.none(), st.lists(st.integers(), max_size=3)))
def test_batch_size_accepts_exactly_ints(value):
    p = params(defaults={"batch_size": value})
    if isinstance(value, int) and not isinstance(value, bool):
        assert resolve("tour", "ci", p).batch_size == value
    else:
        with pytest.raises(ConfigError):
            resolve("tour", "ci", p)
