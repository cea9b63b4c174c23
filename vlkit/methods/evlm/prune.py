"""Physical removal of attention heads and FFN units (EfficientVLM Sec. 3.3, CoFi Sec. 3).

EfficientVLM (Wang et al., ACL Findings 2023) prunes heads and FFN intermediate units with
hard-concrete gates (:mod:`vlkit.methods.evlm.gating`) and then *removes* them: the pruned
model is a smaller dense model, not a masked one (DESIGN.md, "Efficiency accounting").
transformers 5 has no ``prune_heads``, so the Linear layers are shrunk here by hand.

Masks
-----
``masks = {unit_name: {"heads": BoolTensor[H], "cross_heads": BoolTensor[H], "ffn":
BoolTensor[d_ff]}}``, True = keep. ``cross_heads`` only exists for units with
cross-attention (fusion units). A missing unit or key keeps everything. The lengths are the
*current* sizes of the unit (so an already pruned model can be pruned again).

What a mask means (the masked model, :func:`apply_masks`), per sub-layer of a
:class:`~vlkit.models.layers.TransformerLayer`::

    attention:  out = s * (W_o (ctx (.) m) + b_o),   m = heads mask (per head), s = 1[any(m)]
    FFN:        out = s * (W_2 (act(W_1 x + b_1) (.) m) + b_2),   m = FFN units, s = 1[any(m)]

``s`` is the sub-layer output scale (``out_scale``; CoFi's ``head_layer_z`` / ``mlp_z``): a
sub-layer whose entries are all False contributes **nothing**, its output bias included.

Physical removal (:func:`prune`) keeps, per attention sub-layer, the rows of ``q``, ``k``,
``v`` (weights and biases) and the columns of ``o`` that belong to kept heads (head ``h``
owns rows / columns ``h*head_dim .. (h+1)*head_dim - 1``); per FFN the rows of ``fc1`` (and
its bias) and the columns of ``fc2`` of kept units. A sub-layer with no entry left is
removed: 0 heads / 0 units and **no output bias** (``o.bias`` / ``fc2.bias`` dropped), so it
outputs exactly 0 -- as the masked model does. Hence ``prune(b, m)(x) == apply_masks(b, m)(x)``
up to float rounding (the tests check it, eval mode, atol 1e-4).

Parameters removed (:func:`removed_params`), per dropped entry::

    head (self- or cross-attention):  head_dim * (q_in + k_in + v_in + o_out) + 3 * head_dim
                                      (rows of q, k, v with their biases; columns of o)
                                      = 4 * head_dim * D + 3 * head_dim when k/v read width D
    FFN unit:                         fc1_in + fc2_out + 1 = 2 * D + 1     (row, column, bias)

plus the output bias (D) of every sub-layer removed whole. (Bias terms drop out for layers
built without biases.) EfficientVLM's ``calculate_model_size`` spreads ``b_o`` over the heads
instead (``params_per_head = (4 D^2 + 4 D) / H``); we count what each structure really owns,
so the count equals ``params(full) - params(pruned)`` exactly.

Saving and loading
------------------
A pruned model has non-default shapes, so its ``state_dict`` cannot be loaded into a fresh
preset. :func:`pruning_spec` records the per-unit sizes in a JSON-able dict;
:func:`load_pruned` builds the preset, shrinks it to the spec (:func:`reshape_to_spec`) and
loads the weights. :func:`save_pruned` writes ``model.safetensors`` + ``pruning.json``.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from vlkit.models.layers import Attention, FeedForward, TransformerLayer
from vlkit.models.protocol import UnknownNameError

__all__ = [
    "MASK_KEYS", "SPEC_FORMAT", "prunable_units", "sublayer", "check_masks", "apply_masks", "clear_masks",
    "masked_copy", "removed_params", "uniform_masks", "head_cost", "ffn_unit_cost", "prune", "pruning_spec",
    "reshape_to_spec", "save_pruned", "load_pruned",
]

#: mask keys, in sub-layer order: self-attention heads, cross-attention heads, FFN units
MASK_KEYS = ("heads", "cross_heads", "ffn")
SPEC_FORMAT = "vlkit-evlm-pruning/1"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "pruning.json"


# ----------------------------------------------------------------------------- units and sub-layers
def prunable_units(backbone) -> dict[str, TransformerLayer]:
    """``{unit name: TransformerLayer}`` of every unit that has heads / FFN units to prune.

    Units served by another module (a DAS skip adapter, a T5 block, a CNN stage) are left out.
    """
    if not hasattr(backbone, "units"):
        raise TypeError(f"expected a protocol Backbone (with .units), got {type(backbone).__name__}")
    return {u.name: u.module for u in backbone.units if isinstance(u.module, TransformerLayer)}


def unit_keys(layer: TransformerLayer) -> tuple[str, ...]:
    """Mask keys valid for ``layer``: ``heads``, [``cross_heads``], ``ffn``."""
    return MASK_KEYS if layer.cross_attn is not None else ("heads", "ffn")


def sublayer(layer: TransformerLayer, key: str) -> Attention | FeedForward:
    """The sub-layer module a mask key addresses (``attn``, ``cross_attn`` or ``ffn``)."""
    if key == "heads":
        return layer.attn
    if key == "cross_heads" and layer.cross_attn is not None:
        return layer.cross_attn
    if key == "ffn":
        return layer.ffn
    raise UnknownNameError("mask key", key, unit_keys(layer))


def _size(module: Attention | FeedForward) -> int:
    """Current number of entries: heads of an Attention, hidden units of a FeedForward."""
    return module.num_heads if isinstance(module, Attention) else module.fc1.out_features


def _nbias(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else linear.bias.numel()


def head_cost(attn: Attention) -> int:
    """Parameters one head owns: ``head_dim * (q_in + k_in + v_in + o_out)`` weights plus its
    ``head_dim`` bias entries in each of q, k, v (``4 * head_dim * D + 3 * head_dim`` when the
    keys / values read width D). ``o``'s bias belongs to the sub-layer, not to a head."""
    hd = attn.head_dim
    w = hd * (attn.q.in_features + attn.k.in_features + attn.v.in_features + attn.o.out_features)
    b = hd * sum(lin.bias is not None for lin in (attn.q, attn.k, attn.v))
    return w + b


def ffn_unit_cost(ffn: FeedForward) -> int:
    """Parameters one FFN unit owns: a row of ``fc1`` (+ its bias) and a column of ``fc2``:
    ``2 * D + 1``. ``fc2``'s bias belongs to the sub-layer."""
    return ffn.fc1.in_features + ffn.fc2.out_features + (ffn.fc1.bias is not None)


def _entry_cost(module) -> int:
    return head_cost(module) if isinstance(module, Attention) else ffn_unit_cost(module)


def _out_bias(module) -> int:
    """Output bias size of a sub-layer (``o.bias`` / ``fc2.bias``): removed with the last entry."""
    return _nbias(module.o if isinstance(module, Attention) else module.fc2)


# ----------------------------------------------------------------------------- mask validation
def _as_bool_mask(value, where: str, expected: int) -> torch.Tensor:
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{where} must be a boolean tensor (True = keep), got {type(value).__name__}") from e
    t = t.detach().cpu()
    if t.dtype != torch.bool:
        if t.is_complex() or not ((t == 0) | (t == 1)).all():
            raise ValueError(f"{where} must be boolean (True = keep) or 0/1 values, got dtype "
                             f"{str(t.dtype).removeprefix('torch.')} with values outside {{0, 1}}")
        t = t != 0
    if t.shape != (expected,):
        raise ValueError(f"{where} has shape {tuple(t.shape)}, expected ({expected},): one entry per "
                         f"{'head' if 'heads' in where else 'FFN unit'}")
    return t


def check_masks(backbone, masks: Mapping) -> dict[str, dict[str, torch.Tensor]]:
    """Validate ``masks`` against ``backbone``; return them as CPU bool tensors.

    Errors name the bad value and the valid ones: an unknown unit raises
    :class:`~vlkit.models.protocol.UnknownNameError` listing the prunable units; a unit that
    exists but is not a TransformerLayer, a wrong key (``cross_heads`` on a unit without
    cross-attention), a wrong length or non-boolean values raise with unit, key, expected and
    actual shape.
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a dict {{unit: {{key: BoolTensor}}}}, got {type(masks).__name__}")
    units = prunable_units(backbone)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, entry in masks.items():
        if name not in units:
            if name in getattr(backbone, "unit_names", []):
                raise ValueError(f"unit {name!r} is served by a {type(backbone.unit(name)).__name__}, not a "
                                 f"TransformerLayer: it has no heads / FFN units to prune; prunable units: "
                                 f"{', '.join(units)}")
            raise UnknownNameError("unit", name, list(units))
        if not isinstance(entry, Mapping):
            raise TypeError(f"masks[{name!r}] must be a dict {{key: BoolTensor}} with keys in "
                            f"{unit_keys(units[name])}, got {type(entry).__name__}")
        layer, checked = units[name], {}
        for key, value in entry.items():
            if key not in unit_keys(layer):
                raise UnknownNameError(f"mask key of unit {name}", key, unit_keys(layer))
            checked[key] = _as_bool_mask(value, f"masks[{name!r}][{key!r}]", _size(sublayer(layer, key)))
        out[name] = checked
    return out


# ----------------------------------------------------------------------------- the masked model
def _set_mask(module, keep: torch.Tensor | None) -> None:
    """Mask fields of one sub-layer: entry mask + ``out_scale = 0`` when nothing is kept."""
    field = "head_mask" if isinstance(module, Attention) else "unit_mask"
    ref = module.o.weight if isinstance(module, Attention) else module.fc2.weight
    if keep is None:
        setattr(module, field, None)
        module.out_scale = None
        return
    setattr(module, field, keep.to(device=ref.device, dtype=ref.dtype))
    module.out_scale = None if bool(keep.any()) else torch.zeros((), device=ref.device, dtype=ref.dtype)


def apply_masks(backbone, masks: Mapping):
    """Set ``masks`` on ``backbone`` *as masks* (in place; shapes unchanged) and return it.

    Each named sub-layer gets its binary ``head_mask`` / ``unit_mask`` and, when all its
    entries are False, ``out_scale = 0`` (module docstring). Sub-layers not named are reset
    to unmasked. This is the model :func:`prune` must agree with.
    """
    checked = check_masks(backbone, masks)
    for name, layer in prunable_units(backbone).items():
        for key in unit_keys(layer):
            _set_mask(sublayer(layer, key), checked.get(name, {}).get(key))
    return backbone


def clear_masks(backbone):
    """Remove every head / unit mask and output scale (in place); return ``backbone``."""
    for layer in prunable_units(backbone).values():
        for key in unit_keys(layer):
            _set_mask(sublayer(layer, key), None)
    return backbone


def masked_copy(backbone, masks: Mapping):
    """A deep copy of ``backbone`` with ``masks`` applied as masks (:func:`apply_masks`)."""
    _check_no_gates(backbone)
    return apply_masks(copy.deepcopy(backbone), masks)


def removed_params(backbone, masks: Mapping) -> int:
    """Parameters that ``prune(backbone, masks)`` removes (module docstring's count):
    ``sum(dropped entries * cost per entry) + output biases of sub-layers removed whole``."""
    checked = check_masks(backbone, masks)
    units = prunable_units(backbone)
    total = 0
    for name, entry in checked.items():
        for key, keep in entry.items():
            module = sublayer(units[name], key)
            dropped = int((~keep).sum())
            total += dropped * _entry_cost(module)
            if not bool(keep.any()):
                total += _out_bias(module)
    return total


def uniform_masks(backbone, sparsity: float) -> dict[str, dict[str, torch.Tensor]]:
    """Uniform structured pruning of every prunable unit: keep the first ``round((1 - s) * n)``
    heads (self- and cross-attention) and FFN units of each -- EfficientVLM Tab. 2's uniformly
    pruned student (``bench/bench_prune.py``, ``bench/bench_prune_xvlm.py``, the study's
    :func:`~vlkit.methods.evlm.study.table_2`). ``round`` is Python's (half to even)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    masks = {}
    for name, layer in prunable_units(backbone).items():
        masks[name] = {}
        for key in unit_keys(layer):
            n = _size(sublayer(layer, key))
            masks[name][key] = torch.arange(n) < int(round((1 - sparsity) * n))
    return masks


# ----------------------------------------------------------------------------- physical removal
def _check_linear(lin, where: str) -> nn.Linear:
    if type(lin) is not nn.Linear:
        raise TypeError(f"cannot prune {where}: it is a {type(lin).__name__}, not a plain nn.Linear "
                        f"(merge or remove LoRA / adapters wrapping it first)")
    return lin


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (out, in) and ``bias`` (copies), grad flags of ``like``.

    Built on the meta device and then given its tensors, so nothing is initialised (and a
    zero-width layer raises no "zero-element init" warning).
    """
    lin = nn.Linear(1, 1, bias=bias is not None, device="meta")
    lin.in_features, lin.out_features = weight.shape[1], weight.shape[0]
    lin.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=like.weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=like.bias.requires_grad)
    return lin.train(like.training)


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    return _new_linear(lin.weight[idx], None if lin.bias is None else lin.bias[idx], lin)


def _cols(lin: nn.Linear, idx: torch.Tensor, keep_bias: bool) -> nn.Linear:
    return _new_linear(lin.weight[:, idx], lin.bias if (keep_bias and lin.bias is not None) else None, lin)


def _prune_attention(attn: Attention, keep: torch.Tensor, where: str) -> None:
    for n in ("q", "k", "v", "o"):
        _check_linear(getattr(attn, n), f"{where}.{n}")
    heads = torch.nonzero(keep, as_tuple=False).flatten()
    hd = attn.head_dim
    idx = (heads[:, None] * hd + torch.arange(hd)[None, :]).flatten().to(attn.q.weight.device)
    attn.q, attn.k, attn.v = _rows(attn.q, idx), _rows(attn.k, idx), _rows(attn.v, idx)
    attn.o = _cols(attn.o, idx, keep_bias=len(heads) > 0)
    attn.num_heads = len(heads)
    attn.head_mask, attn.out_scale = None, None


def _prune_ffn(ffn: FeedForward, keep: torch.Tensor, where: str) -> None:
    _check_linear(ffn.fc1, f"{where}.fc1")
    _check_linear(ffn.fc2, f"{where}.fc2")
    idx = torch.nonzero(keep, as_tuple=False).flatten().to(ffn.fc1.weight.device)
    ffn.fc1 = _rows(ffn.fc1, idx)
    ffn.fc2 = _cols(ffn.fc2, idx, keep_bias=len(idx) > 0)
    ffn.unit_mask, ffn.out_scale = None, None


def _check_no_gates(backbone) -> None:
    gated = [n for n, layer in prunable_units(backbone).items() if getattr(layer, "_evlm_gated", False)]
    if gated:
        raise ValueError(f"units {gated} still carry EfficientVLM gates: export the masks with "
                         f"gates.masks(), call gates.detach(), then prune / copy")


def prune(backbone, masks: Mapping, *, inplace: bool = False):
    """Physically remove the heads and FFN units that ``masks`` mark False (module docstring).

    Returns the pruned backbone -- a deep copy unless ``inplace`` -- whose ``q``/``k``/``v``/
    ``o`` and ``fc1``/``fc2`` are smaller dense ``nn.Linear`` layers; sub-layers with every
    entry False are removed (0 heads / units, no output bias). Any mask fields left on the
    pruned sub-layers are cleared (the masks are now in the shapes). Save it with
    :func:`save_pruned`, load it with :func:`load_pruned`.
    """
    _check_no_gates(backbone)
    checked = check_masks(backbone, masks)
    out = backbone if inplace else copy.deepcopy(backbone)
    units = prunable_units(out)
    for name, entry in checked.items():
        for key, keep in entry.items():
            module, where = sublayer(units[name], key), f"{name}.{key}"
            if isinstance(module, Attention):
                _prune_attention(module, keep, where)
            else:
                _prune_ffn(module, keep, where)
    return out


# ----------------------------------------------------------------------------- save / load
def pruning_spec(backbone) -> dict:
    """JSON-able record of the current sizes: ``{"format", "preset", "units": {name:
    {"heads": n, ["cross_heads": n,] "ffn": d_ff}}}`` for every prunable unit."""
    units = {}
    for name, layer in prunable_units(backbone).items():
        units[name] = {key: _size(sublayer(layer, key)) for key in unit_keys(layer)}
    return {"format": SPEC_FORMAT, "preset": getattr(backbone, "preset", None), "units": units}


def reshape_to_spec(backbone, spec: Mapping):
    """Shrink ``backbone`` (in place) to the sizes in ``spec`` -- the weights are *not* kept
    meaningful (first entries, to be overwritten by ``load_state_dict``) -- and return it.

    A sub-layer shrunk to 0 entries loses its output bias, as in :func:`prune`.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("units"), Mapping):
        raise ValueError(f"not a pruning spec (expected a dict with 'units'; see pruning_spec()): {spec!r:.200}")
    if spec.get("format", SPEC_FORMAT) != SPEC_FORMAT:
        raise ValueError(f"unsupported pruning spec format {spec.get('format')!r}; expected {SPEC_FORMAT!r}")
    units = prunable_units(backbone)
    masks = {}
    for name, sizes in spec["units"].items():
        if name not in units:
            raise UnknownNameError("unit", name, list(units))
        layer, entry = units[name], {}
        for key, n in sizes.items():
            if key not in unit_keys(layer):
                raise UnknownNameError(f"mask key of unit {name}", key, unit_keys(layer))
            full = _size(sublayer(layer, key))
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= full:
                raise ValueError(f"spec['units'][{name!r}][{key!r}] = {n!r}: expected an int in [0, {full}]")
            entry[key] = torch.arange(full) < n
        masks[name] = entry
    return prune(backbone, masks, inplace=True)


def save_pruned(backbone, folder: str | os.PathLike) -> Path:
    """Write ``folder/model.safetensors`` (the state dict) and ``folder/pruning.json``
    (:func:`pruning_spec`); return the folder."""
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(backbone, str(folder / WEIGHTS_FILE))
    (folder / SPEC_FILE).write_text(json.dumps(pruning_spec(backbone), indent=2) + "\n", encoding="utf-8")
    return folder


def load_pruned(preset_or_builder: str | Callable, spec: Mapping | str | os.PathLike,
                state_dict: Mapping | str | os.PathLike | None = None, **overrides):
    """Rebuild a pruned backbone: build the full model, shrink it to ``spec``, load the weights.

    preset_or_builder: a preset name for :func:`vlkit.models.build` or a callable returning
        the (unpruned) backbone; ``overrides`` go to it (use the ones the model was built with).
    spec: a :func:`pruning_spec` dict, or a folder written by :func:`save_pruned` (then
        ``state_dict`` defaults to its ``model.safetensors``).
    state_dict: a mapping of tensors or a ``.safetensors`` file; loaded strictly.
    """
    from safetensors.torch import load_model

    folder = None
    if not isinstance(spec, Mapping):
        folder = Path(spec)
        if not (folder / SPEC_FILE).is_file():
            raise FileNotFoundError(f"no {SPEC_FILE} in {folder} (write it with save_pruned)")
        spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
        if state_dict is None:
            state_dict = folder / WEIGHTS_FILE
    if state_dict is None:
        raise ValueError("state_dict is required when spec is a dict")
    if isinstance(preset_or_builder, str):
        from vlkit.models import build

        if spec.get("preset") not in (None, "?", preset_or_builder):
            raise ValueError(f"spec was saved from preset {spec['preset']!r}, not {preset_or_builder!r}")
        model = build(preset_or_builder, **overrides)
    elif callable(preset_or_builder):
        model = preset_or_builder(**overrides)
    else:
        raise TypeError(f"preset_or_builder must be a preset name or a callable, got {preset_or_builder!r}")
    reshape_to_spec(model, spec)
    if isinstance(state_dict, Mapping):
        model.load_state_dict(state_dict, strict=True)
    else:
        path = Path(state_dict)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} not found")
        load_model(model, str(path), strict=True)
    return model
