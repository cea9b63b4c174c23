"""The ``data`` section of params.yaml and the knobs every consumer reads from it.

Notebooks and stages never hard-code dataset sizes: they call :func:`data_knobs` (or
``load_for(profile, name, split)``), so the ``ci`` profile's small sets and the ``default``
profile's full ones come from one place and the DVC ``data`` stage materialises exactly
the sets the later stages load.
"""

from __future__ import annotations

import dataclasses

from vlkit.models.protocol import UnknownNameError

from .registry import DATASETS, load, spec


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``datasets``: the sets the ``data`` stage materialises; ``knobs``: {name: {knob: value}}
    overriding each set's defaults (see ``vlkit.data.default_knobs(name)``)."""

    datasets: list[str] = dataclasses.field(default_factory=lambda: list(DATASETS))
    knobs: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in list(self.datasets) + list(self.knobs):
            if name not in DATASETS:
                raise UnknownNameError("dataset in params.yaml data", name, DATASETS)
        for name, kn in self.knobs.items():
            spec(name, **(kn or {}))  # validates every knob name and value

    def knobs_for(self, name: str) -> dict:
        if name not in DATASETS:
            raise UnknownNameError("dataset", name, DATASETS)
        return dict(self.knobs.get(name) or {})


def data_config(profile: str | None = None) -> DataConfig:
    from vlkit import config

    return config.resolve("data", profile)


def load_for(profile: str | None, name: str, split: str, **extra):
    """``vlkit.data.load`` with the profile's knobs and params.yaml's seed."""
    from vlkit import config

    return load(name, split, seed=config.seed(), **{**data_config(profile).knobs_for(name), **extra})


def stage_time(stage: str, profile: str | None):
    """The DVC stage's wall time in ``results/timings/<stage>.<profile>.json`` when run for a
    profile (as ``dvc repro`` does); a no-op context otherwise."""
    import contextlib

    if not profile:
        return contextlib.nullcontext()
    from vlkit.results import results_dir, stage_timer

    return stage_timer(stage, profile, results_dir(profile))
