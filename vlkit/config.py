"""Profiles and stage settings from ``params.yaml``.

``params.yaml`` has a top-level ``profile`` (``ci`` | ``default`` | ``paper``), a ``seed``,
and one section per pipeline stage. A section holds ``defaults`` (the settings of every
profile) and, optionally, one block per profile that overrides some of them::

    tour:
      defaults: {preset: vilt-b32, batch_size: 1}
      ci:       {preset: bert-base}

Each stage declares its settings as a dataclass (the schema) registered in :data:`STAGES`
as ``"module:Class"``, so the schema sits beside the code that uses it. Resolution checks
every key and type against that schema: a typo in ``params.yaml`` is an error naming the
key and the valid ones, never a silent default.

The profiles:

* ``ci``: every code path in seconds to minutes, nothing stored needed (CI has no DVC remote);
* ``default``: the real mini-scale study on a 2-core CPU;
* ``paper``: the papers' presets on a GPU (efficiency figures; their weights are random).
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .models.protocol import UnknownNameError
from .paths import PARAMS_FILE

PROFILES = ("ci", "default", "paper")
TOP_LEVEL_KEYS = ("profile", "seed")

# stage name -> "module:DataclassName" (the schema of that section of params.yaml)
STAGES: dict[str, str] = {
    "tour": "vlkit.config:TourConfig",
    "data": "vlkit.data.stage:DataConfig",
    "pretrain": "vlkit.pretrain:PretrainConfig",
    "baselines": "vlkit.tasks.baselines:BaselinesConfig",
    "das": "vlkit.methods.das.study:DASConfig",
    "evlm": "vlkit.methods.evlm.study:EVLMConfig",
    "sherl": "vlkit.methods.sherl_study:SHERLConfig",
}


@dataclasses.dataclass(frozen=True)
class TourConfig:
    """Settings of the tour notebook (``notebooks/00_tour``)."""

    preset: str = "vilt-b32"
    batch_size: int = 1
    overrides: dict = dataclasses.field(default_factory=dict)  # builder overrides (tiny models in ci)


class ConfigError(ValueError):
    """A params.yaml value of the wrong type or out of range."""


def load_params(path: str | Path | None = None) -> dict:
    """Read ``params.yaml`` (default: the repository's) and check its top level."""
    path = Path(path) if path is not None else PARAMS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no params file at {path}")
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(params).__name__}")
    valid = list(TOP_LEVEL_KEYS) + sorted(STAGES)
    for key in params:
        if key not in valid:
            raise UnknownNameError("params.yaml top-level key", key, valid)
    check_profile(params.get("profile", "default"))
    return params


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise UnknownNameError("profile", profile, PROFILES)
    return profile


def schema(stage: str) -> type:
    """The dataclass that describes ``stage``'s settings."""
    if stage not in STAGES:
        raise UnknownNameError("stage", stage, sorted(STAGES))
    module, name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), name)


def _type_ok(value: Any, tp: Any) -> bool:
    """Loose runtime check of a YAML value against a dataclass field annotation."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        inner = args[0] if args else Any
        return all(_type_ok(v, inner) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _check(stage: str, cls: type, values: dict, where: str) -> None:
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key, value in values.items():
        if key not in fields:
            raise UnknownNameError(f"key in params.yaml {where}", key, fields)
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"params.yaml {where}.{key} = {value!r}: expected {hints[key]}, "
                              f"got {type(value).__name__}")


def resolve(stage: str, profile: str | None = None, params: dict | None = None, **overrides) -> Any:
    """Settings of ``stage`` for ``profile`` as the stage's dataclass.

    Order of precedence: keyword ``overrides`` > the profile's block > ``defaults`` > the
    dataclass defaults. ``profile=None`` uses params.yaml's top-level ``profile``.
    Every key and type is checked; the dataclass's ``__post_init__`` may check ranges.
    """
    params = load_params() if params is None else params
    profile = check_profile(profile or params.get("profile", "default"))
    cls = schema(stage)
    section = params.get(stage) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"params.yaml {stage}: expected a mapping, got {type(section).__name__}")
    for block in section:
        if block not in ("defaults",) + PROFILES:
            raise UnknownNameError(f"block in params.yaml {stage}", block, ("defaults",) + PROFILES)
    values: dict = {}
    for block in ("defaults", profile):
        part = section.get(block) or {}
        if not isinstance(part, dict):
            raise ConfigError(f"params.yaml {stage}.{block}: expected a mapping, got {type(part).__name__}")
        _check(stage, cls, part, f"{stage}.{block}")
        values.update(part)
    _check(stage, cls, overrides, f"{stage} (override)")
    values.update(overrides)
    return cls(**values)


def seed(params: dict | None = None) -> int:
    """The global seed from params.yaml (default 0)."""
    params = load_params() if params is None else params
    value = params.get("seed", 0)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"params.yaml seed = {value!r}: expected an int")
    return value
