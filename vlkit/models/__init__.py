"""Backbones behind one protocol (:mod:`vlkit.models.protocol`) and the preset registry.

``build(preset, **overrides)`` returns a :class:`~vlkit.models.protocol.Backbone`. Presets
are looked up lazily ("module:function"), so importing vlkit does not import every
architecture. Overrides go to the preset's builder (e.g. ``num_layers=2`` for tests).
"""

from __future__ import annotations

import importlib

from .protocol import Backbone, BackboneOutput, State, Unit, UnitContext, UnitSpec, UnknownNameError

# preset name -> "module:function"; the function takes **overrides and returns a Backbone.
PRESETS: dict[str, str] = {
    # paper architectures (random weights unless a local checkpoint folder is given)
    "vilt-b32": "vlkit.models.vilt:build_vilt_b32",
    "meter-clip16-roberta": "vlkit.models.meter:build_meter_clip16_roberta",
    "xvlm-clip": "vlkit.models.xvlm:build_xvlm_clip",
    "xvlm-clip-small": "vlkit.models.xvlm:build_xvlm_clip_small",
    "bert-base": "vlkit.models.text:build_bert_base",
    "t5-base": "vlkit.models.t5:build_t5_base",
    # real pre-trained weights shipped in packages
    "minilm": "vlkit.models.text:build_minilm",
    "effnet-lite0": "vlkit.models.cnn:build_effnet_lite0",
    # mini vision-language backbones from MiniLM + EfficientNet-Lite0 cells (vlkit.models.mini)
    "vilt-mini": "vlkit.models.mini:build_vilt_mini",
    "meter-mini": "vlkit.models.mini:build_meter_mini",
    "xvlm-mini": "vlkit.models.mini:build_xvlm_mini",
    "xvlm-mini-half": "vlkit.models.mini:build_xvlm_mini_half",
}


def build(preset: str, **overrides) -> Backbone:
    """Build the backbone named ``preset``; unknown names raise with the valid list."""
    if preset not in PRESETS:
        raise UnknownNameError("preset", preset, sorted(PRESETS))
    module, fn = PRESETS[preset].split(":")
    backbone = getattr(importlib.import_module(module), fn)(**overrides)
    backbone.preset = preset
    return backbone


__all__ = ["PRESETS", "build", "Backbone", "BackboneOutput", "State", "Unit", "UnitContext", "UnitSpec",
           "UnknownNameError"]
