"""Hugging Face -> vlkit converters shared by every preset.

vlkit backbones run their Transformer layers as :class:`vlkit.models.layers.TransformerLayer`
(one set of seams for adapters, gates and attention maps). The library models keep the same
weights under other names; the functions here rename one library layer's state dict into a
``TransformerLayer`` state dict, so a preset can load real checkpoints (or copy a freshly
initialised library model, which gives it the library's own initialisation).

Each ``*_layer_state`` function takes the state dict of **one** library layer, either with
keys relative to that layer (``"attention.self.query.weight"``) or a whole model's state
dict plus ``prefix`` (``"encoder.layer.3."``), and returns a dict for
``TransformerLayer.load_state_dict``. A missing bias (e.g. ``qkv_bias=False``) becomes zeros,
which is the same function; a missing weight raises :class:`KeyError` naming it.

Layouts (HF module names -> vlkit names):

=====================================  =========================  ==============================
vlkit (``TransformerLayer``)           BERT / RoBERTa (post-norm)  ViLT / HF ViT (pre-norm)
=====================================  =========================  ==============================
``attn.q|k|v``                         ``attention.self.query|    ``attention.attention.query|
                                       key|value``                key|value``
``attn.o``                             ``attention.output.dense``  ``attention.output.dense``
``attn_norm``                          ``attention.output.         ``layernorm_before``
                                       LayerNorm``
``cross_attn.*`` / ``cross_norm``      ``crossattention.*``        --
``ffn.fc1`` / ``ffn.fc2``              ``intermediate.dense`` /    same as BERT
                                       ``output.dense``
``ffn_norm``                           ``output.LayerNorm``        ``layernorm_after``
=====================================  =========================  ==============================

CLIP encoder layers (pre-norm): ``self_attn.{q,k,v,out}_proj``, ``layer_norm1``, ``mlp.fc1``,
``mlp.fc2``, ``layer_norm2``. timm ViT blocks (pre-norm): fused ``attn.qkv`` (split into
three), ``attn.proj``, ``norm1``, ``mlp.fc1``, ``mlp.fc2``, ``norm2``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .layers import ACTIVATIONS, TransformerLayer
from .protocol import UnknownNameError

__all__ = [
    "sub_state",
    "bert_layer_state",
    "vit_layer_state",
    "clip_layer_state",
    "timm_block_state",
    "load_layer",
    "layer_from_state",
    "hf_activation",
    "config_overrides",
    "hf_config",
    "pretrained_config",
    "checkpoint_dir",
    "load_pretrained",
]

# (library stem, vlkit stem, has bias)
_BERT = [
    ("attention.self.query", "attn.q"),
    ("attention.self.key", "attn.k"),
    ("attention.self.value", "attn.v"),
    ("attention.output.dense", "attn.o"),
    ("attention.output.LayerNorm", "attn_norm"),
    ("intermediate.dense", "ffn.fc1"),
    ("output.dense", "ffn.fc2"),
    ("output.LayerNorm", "ffn_norm"),
]
_BERT_CROSS = [
    ("crossattention.self.query", "cross_attn.q"),
    ("crossattention.self.key", "cross_attn.k"),
    ("crossattention.self.value", "cross_attn.v"),
    ("crossattention.output.dense", "cross_attn.o"),
    ("crossattention.output.LayerNorm", "cross_norm"),
]
_VIT = [
    ("attention.attention.query", "attn.q"),
    ("attention.attention.key", "attn.k"),
    ("attention.attention.value", "attn.v"),
    ("attention.output.dense", "attn.o"),
    ("layernorm_before", "attn_norm"),
    ("intermediate.dense", "ffn.fc1"),
    ("output.dense", "ffn.fc2"),
    ("layernorm_after", "ffn_norm"),
]
_CLIP = [
    ("self_attn.q_proj", "attn.q"),
    ("self_attn.k_proj", "attn.k"),
    ("self_attn.v_proj", "attn.v"),
    ("self_attn.out_proj", "attn.o"),
    ("layer_norm1", "attn_norm"),
    ("mlp.fc1", "ffn.fc1"),
    ("mlp.fc2", "ffn.fc2"),
    ("layer_norm2", "ffn_norm"),
]
_TIMM = [
    ("attn.proj", "attn.o"),
    ("norm1", "attn_norm"),
    ("mlp.fc1", "ffn.fc1"),
    ("mlp.fc2", "ffn.fc2"),
    ("norm2", "ffn_norm"),
]


def sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix stripped."""
    if prefix and not prefix.endswith("."):
        prefix += "."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _rename(state: Mapping[str, torch.Tensor], table, what: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for src, dst in table:
        w = state.get(f"{src}.weight")
        if w is None:
            raise KeyError(f"{what} layer state lacks {src}.weight; its keys: {', '.join(sorted(state))}")
        out[f"{dst}.weight"] = w
        b = state.get(f"{src}.bias")
        out[f"{dst}.bias"] = b if b is not None else w.new_zeros(w.shape[0])
    return out


def bert_layer_state(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """One post-norm BERT / RoBERTa ``BertLayer`` (``RobertaLayer``) -> ``TransformerLayer``
    (``norm="post"``) state. Cross-attention (``crossattention.*``, as in X-VLM / ALBEF fusion
    layers built from ``BertLayer(add_cross_attention=True)``) is converted when present."""
    state = sub_state(state, prefix) if prefix else dict(state)
    out = _rename(state, _BERT, "BERT")
    if any(k.startswith("crossattention.") for k in state):
        out.update(_rename(state, _BERT_CROSS, "BERT cross-attention"))
    return out


def vit_layer_state(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """One pre-norm HF ``ViltLayer`` / ``ViTLayer`` -> ``TransformerLayer`` (``norm="pre"``)
    state. Missing q/k/v biases (``qkv_bias=False``) become zeros."""
    state = sub_state(state, prefix) if prefix else dict(state)
    return _rename(state, _VIT, "ViT")


def clip_layer_state(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """One HF ``CLIPEncoderLayer`` -> ``TransformerLayer`` (``norm="pre"``,
    ``act="quick_gelu"`` for OpenAI CLIP) state."""
    state = sub_state(state, prefix) if prefix else dict(state)
    return _rename(state, _CLIP, "CLIP")


def timm_block_state(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """One timm ViT ``Block`` (fused ``attn.qkv``) -> ``TransformerLayer`` (``norm="pre"``) state.

    timm stores q, k, v stacked along the output dimension of ``attn.qkv`` in that order
    (``timm/models/vision_transformer.py``, ``Attention.forward``: ``qkv.reshape(B, N, 3, H, d)``).
    """
    state = sub_state(state, prefix) if prefix else dict(state)
    w = state.get("attn.qkv.weight")
    if w is None:
        raise KeyError(f"timm block state lacks attn.qkv.weight; its keys: {', '.join(sorted(state))}")
    b = state.get("attn.qkv.bias")
    b = b if b is not None else w.new_zeros(w.shape[0])
    out = {}
    for name, wi, bi in zip("qkv", w.chunk(3, 0), b.chunk(3, 0)):
        out[f"attn.{name}.weight"], out[f"attn.{name}.bias"] = wi, bi
    out.update(_rename(state, _TIMM, "timm"))
    return out


def load_layer(layer: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy a converted state into ``layer``; every parameter must be covered (adapters
    excepted) and no key may be left over. Returns ``layer``."""
    result = layer.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("adapters.")]
    if missing or result.unexpected_keys:
        raise KeyError(f"converted layer state does not fit {type(layer).__name__}: "
                       f"missing {missing}, unexpected {result.unexpected_keys}")
    return layer


def layer_from_state(state: Mapping[str, torch.Tensor], num_heads: int, **layer_kwargs) -> TransformerLayer:
    """A ``TransformerLayer`` sized from a converted state (dim, FFN width, cross-attention)
    holding copies of its tensors. ``layer_kwargs`` go to ``TransformerLayer`` (``norm``,
    ``act``, ``eps``, dropouts, ``context_dim``). The layer is built on the meta device and
    the tensors assigned, so no time goes into an initialisation that would be overwritten."""
    dim = state["attn.q.weight"].shape[1]
    ffn = state["ffn.fc1.weight"].shape[0]
    cross = "cross_attn.q.weight" in state
    if cross and "context_dim" not in layer_kwargs:
        layer_kwargs["context_dim"] = state["cross_attn.k.weight"].shape[1]
    with torch.device("meta"):
        layer = TransformerLayer(dim, num_heads, ffn, cross=cross, **layer_kwargs)
    result = layer.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(f"converted layer state does not fit TransformerLayer: "
                       f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return layer


# HF activation names (transformers.activations.ACT2FN) -> vlkit.models.layers.ACTIVATIONS
_HF_ACT = {
    "gelu": "gelu",  # exact erf GELU
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
}


def hf_activation(name: str) -> str:
    """Map a HF ``hidden_act`` name to a :data:`vlkit.models.layers.ACTIVATIONS` key."""
    if name not in _HF_ACT:
        raise UnknownNameError("activation", name, sorted(_HF_ACT))
    assert _HF_ACT[name] in ACTIVATIONS
    return _HF_ACT[name]


def config_overrides(cls, overrides: Mapping | None, aliases: Mapping[str, str] | None = None) -> dict:
    """``overrides`` with alias names resolved, refusing names that are not fields of the HF
    config class ``cls``.

    HF configs silently accept any keyword (a typo such as ``num_layer=2`` would be ignored),
    so names are checked against the config's dataclass fields and its ``attribute_map``;
    ``aliases`` adds extra names (e.g. ``intermediate_size -> d_ff`` for T5).
    """
    aliases = {**getattr(cls, "attribute_map", {}), **(aliases or {})}
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(vars(cls()))
    fields |= {k for k in dir(cls) if isinstance(getattr(cls, k, None), property) and getattr(cls, k).fset is not None}
    out = {}
    for key, value in (overrides or {}).items():
        name = aliases.get(key, key)
        if name not in fields:
            raise UnknownNameError(f"{cls.__name__} field", key, sorted(fields | set(aliases)))
        out[name] = value
    return out


def hf_config(cls, defaults: Mapping | None = None, overrides: Mapping | None = None,
              aliases: Mapping[str, str] | None = None):
    """The HF config ``cls(**defaults, **overrides)`` with override names checked
    (:func:`config_overrides`)."""
    return cls(**{**dict(defaults or {}), **config_overrides(cls, overrides, aliases)})


def pretrained_config(cls, path: Path, overrides: Mapping | None = None, aliases: Mapping[str, str] | None = None):
    """The config saved in a local checkpoint folder, with checked ``overrides`` applied."""
    config = cls.from_pretrained(path, local_files_only=True)
    for key, value in config_overrides(cls, overrides, aliases).items():
        setattr(config, key, value)
    return config


def checkpoint_dir(weights: str | Path) -> Path:
    """A local HF checkpoint folder (must hold ``config.json``); never a hub id."""
    path = Path(weights).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist (vlkit never downloads: "
                                "pass a local folder written by save_pretrained)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} has no config.json; found: "
                                f"{', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'}")
    return path


def load_pretrained(cls, weights: str | Path, overrides: Mapping | None = None,
                    aliases: Mapping[str, str] | None = None, may_miss: tuple[str, ...] = ("pooler.",)):
    """``cls.from_pretrained`` on a local checkpoint folder (config ``overrides`` checked),
    refusing a checkpoint that leaves weights uninitialised -- except keys starting with
    ``may_miss`` (a checkpoint saved without a pooler gets a freshly initialised one)."""
    path = checkpoint_dir(weights)
    config = pretrained_config(cls.config_class, path, overrides, aliases)
    model, info = cls.from_pretrained(path, config=config, local_files_only=True, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(may_miss)]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(f"checkpoint {str(path)!r} does not fit {cls.__name__}: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, mismatched {mismatched[:8]}")
    return model
