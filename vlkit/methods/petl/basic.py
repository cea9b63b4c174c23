"""Full fine-tuning, BitFit, bottleneck Adapter and LoRA on any protocol backbone.

Each ``apply_*`` function changes ``backbone`` **in place** (freezes parameters, injects
modules) and returns it; the result is still the same :class:`~vlkit.models.protocol.Backbone`
(same units, ``embed`` / ``run_units`` / ``finalize``), with exactly the method's parameters
``requires_grad`` and every other parameter frozen. Pass ``copy.deepcopy(backbone)`` to keep
the original. The task head is not part of this: callers add it (and train it) separately.

* :func:`apply_full` -- every parameter trainable.
* :func:`apply_bitfit` -- Ben Zaken et al., "BitFit: Simple Parameter-efficient Fine-tuning
  for Transformer-based Masked Language-models" (ACL 2022), Sec. 2: only the bias terms.
* :func:`apply_adapter` -- Houlsby et al., "Parameter-Efficient Transfer Learning for NLP"
  (ICML 2019), Sec. 2.1 and Fig. 2: a bottleneck adapter after attention and after the FFN of
  every Transformer unit, trained together with the layer norms.
* :func:`apply_lora` -- Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models"
  (ICLR 2022), Eq. 3 ``h = W0 x + (alpha / r) B A x`` with ``B = 0`` at init, on the attention
  query and value projections (Sec. 4.2, 7.1), injected with PEFT
  (``peft.inject_adapter_in_model``).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from vlkit.models.layers import ACTIVATIONS
from vlkit.models.protocol import Backbone, UnknownNameError
from vlkit.nn.adapters import INITS, PLACEMENTS, BottleneckAdapter, ParallelAdapter, SequentialAdapter, add_adapters
from vlkit.seeding import seeded  # noqa: F401  (re-exported for the methods)

__all__ = ["apply_full", "apply_bitfit", "apply_adapter", "apply_lora", "set_trainable", "is_norm",
           "adapter_bottleneck", "unit_width", "lora_modules", "LORA_PREFIX"]

LORA_PREFIX = "lora_"


# ---------------------------------------------------------------------------- helpers
def check_backbone(backbone) -> None:
    """Methods work on protocol backbones only."""
    if not isinstance(backbone, Backbone):
        raise TypeError(f"PETL methods need a vlkit Backbone (vlkit.models.build(...)), got {type(backbone).__name__}")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")




def set_trainable(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> int:
    """``requires_grad = keep(name, param)`` for every parameter of ``model``; returns the
    number of trainable elements. Parameters shared under two names count as trainable if
    either name is kept."""
    named = list(model.named_parameters(remove_duplicate=False))
    kept = {id(p) for n, p in named if keep(n, p)}
    for _, p in named:
        p.requires_grad_(id(p) in kept)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm-like modules: ``nn.LayerNorm``, ``nn.RMSNorm`` and library norms named
    ``*LayerNorm`` / ``*RMSNorm`` (e.g. HF ``T5LayerNorm``)."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


# ---------------------------------------------------------------------------- full, BitFit
def apply_full(backbone: Backbone) -> Backbone:
    """Full fine-tuning: every backbone parameter trainable. No options."""
    check_backbone(backbone)
    set_trainable(backbone, lambda n, p: True)
    return backbone


def apply_bitfit(backbone: Backbone) -> Backbone:
    """BitFit (Ben Zaken et al. 2022, Sec. 2, Eqs. 1-2): train only the bias terms.

    Trainable: every parameter named ``bias`` -- the q/k/v/output projections', the FFN's, the
    poolers' and the LayerNorm *shifts* (BitFit lists ``b^{LN}`` among its bias terms). The
    LayerNorm *gains* (``weight``) stay frozen: BitFit trains biases only. No options.

    Backbones without bias terms (T5: bias-free Linears and RMS norms) raise ``ValueError``.
    """
    check_backbone(backbone)
    n = set_trainable(backbone, lambda name, p: name.rsplit(".", 1)[-1] == "bias")
    if n == 0:
        raise ValueError(f"BitFit needs bias terms, but {type(backbone).__name__} ({backbone.preset}) has none")
    return backbone


# ---------------------------------------------------------------------------- Adapter
ADAPTER_SLOTS = ("attn", "cross", "ffn")


def adapter_bottleneck(dim: int) -> int:
    """Default adapter width: ``D // 8`` (96 at D = 768, the DAS adapters' size; 48 at 384)."""
    return max(1, dim // 8)


def unit_width(module: nn.Module) -> int:
    """Width D of a unit's stream: ``module.dim`` (TransformerLayer) or, failing that, the
    ``in_features`` of its first Linear (T5: the self-attention query)."""
    dim = getattr(module, "dim", None)
    if isinstance(dim, int):
        return dim
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise TypeError(f"cannot tell the width of unit module {type(module).__name__}")


def _has_cross(module: nn.Module) -> bool:
    return getattr(module, "cross_attn", None) is not None or bool(getattr(module, "is_decoder", False))


def apply_adapter(backbone: Backbone, *, bottleneck: int | None = None, placement: str = "sequential",
                  slots: Sequence[str] = ("attn", "ffn"), act: str = "gelu", layer_norm: bool = False,
                  init: str = "zero", train_norms: bool = True, seed: int = 0) -> Backbone:
    """Bottleneck adapters in every adaptable unit (Houlsby et al. 2019, Sec. 2.1, Fig. 2).

    Options (defaults follow Houlsby):

    * ``bottleneck``: adapter width r; ``None`` -> :func:`adapter_bottleneck` of each unit's
      width, ``D // 8`` (96 at D = 768, as the DAS adapters).
    * ``placement``: ``"sequential"`` (Houlsby: ``h + delta(h)`` after the sub-layer, before
      the residual sum) or ``"parallel"`` (He et al. 2022 / DAS: ``h + delta(x_in)``), see
      :mod:`vlkit.nn.adapters`.
    * ``slots``: sub-layers that get an adapter, from ``("attn", "cross", "ffn")``; Houlsby puts
      two per layer (after attention and after the FFN). ``"cross"`` only goes into units with
      cross-attention (fusion / decoder units); other units skip it.
    * ``act``: bottleneck activation (one of :data:`vlkit.models.layers.ACTIVATIONS`).
    * ``layer_norm``: a LayerNorm inside the adapter, in front of the down-projection (the DAS
      official adapter has one; Houlsby's has none -> default ``False``).
    * ``init``: ``"zero"`` up-projection (exact identity at init, so the adapted backbone starts
      equal to the pre-trained one; Houlsby use a near-identity init) or ``"bert"`` (N(0, 0.02)).
    * ``train_norms``: also train the backbone's LayerNorms (gains and shifts) -- Houlsby:
      "the layer normalization parameters are also trained"; ``False`` trains adapters only.
    * ``seed``: seed of the adapters' random initialisation.

    A DAS-style adapter baseline: ``placement="parallel", layer_norm=True, act="relu",
    train_norms=False``.

    Adaptable units are those with an ``adapters`` slot dict (:class:`~vlkit.models.layers.
    TransformerLayer`, T5 units); other units (e.g. DAS skip adapters) are left as they are.
    Trainable: ``sum over units and slots of bottleneck_params(D_unit, r, layer_norm)``
    (:func:`vlkit.nn.adapters.bottleneck_params`) + the norms' parameters if ``train_norms``.
    """
    check_backbone(backbone)
    if bottleneck is not None:
        check_positive_int("bottleneck", bottleneck)
    if placement not in PLACEMENTS:
        raise UnknownNameError("adapter placement", placement, PLACEMENTS)
    slots = (slots,) if isinstance(slots, str) else tuple(slots)
    if not slots:
        raise ValueError(f"slots must name at least one of {ADAPTER_SLOTS}")
    for s in slots:
        if s not in ADAPTER_SLOTS:
            raise UnknownNameError("adapter slot", s, ADAPTER_SLOTS)
    if len(set(slots)) != len(slots):
        raise ValueError(f"duplicate slots in {slots}")
    if act not in ACTIVATIONS:
        raise UnknownNameError("activation", act, ACTIVATIONS)
    if init not in INITS:
        raise UnknownNameError("adapter init", init, INITS)

    cls = {"parallel": ParallelAdapter, "sequential": SequentialAdapter}[placement]
    added = 0
    with seeded(seed):
        for unit in backbone.units:
            m = unit.module
            if not isinstance(getattr(m, "adapters", None), nn.ModuleDict):
                continue
            here = tuple(s for s in slots if s != "cross" or _has_cross(m))
            if not here:
                continue
            dim = unit_width(m)
            r = bottleneck if bottleneck is not None else adapter_bottleneck(dim)
            if hasattr(m, "dim"):  # TransformerLayer: the library call (checks slots, device, dtype)
                add_adapters(m, placement, r, here, act=act, layer_norm=layer_norm, init=init)
            else:  # units with adapter slots but no .dim (T5Unit): same modules, placed by hand
                ref = next(m.parameters())
                for s in here:
                    if s in m.adapters:
                        raise ValueError(f"slot {s!r} of unit {unit.name} already holds an adapter")
                    m.adapters[s] = cls(dim, r, act=act, layer_norm=layer_norm, init=init).to(ref.device, ref.dtype)
            added += len(here)
    if added == 0:
        raise ValueError(f"no unit of {type(backbone).__name__} has adapter slots {slots}; units: "
                         f"{', '.join(f'{u.name} ({type(u.module).__name__})' for u in backbone.units)}")

    adapter_params = {id(p) for m in backbone.modules() if isinstance(m, BottleneckAdapter) for p in m.parameters()}
    norm_params = {id(p) for m in backbone.modules() if train_norms and is_norm(m) for p in m.parameters()}
    set_trainable(backbone, lambda n, p: id(p) in adapter_params or id(p) in norm_params)
    return backbone


# ---------------------------------------------------------------------------- LoRA
def _target_matches(name: str, target: str) -> bool:
    """PEFT's rule for a string entry of ``target_modules``: the module name equals the
    target or ends with ``"." + target``."""
    return name == target or name.endswith("." + target)


def apply_lora(backbone: Backbone, *, r: int = 8, alpha: float = 16, targets: Sequence[str] = ("q", "v"),
               dropout: float = 0.0, seed: int = 0) -> Backbone:
    """LoRA through PEFT (``LoraConfig`` + ``inject_adapter_in_model``, in place).

    Each target Linear ``W0`` becomes ``W0 x + (alpha / r) B A x`` (Hu et al. 2022, Eq. 3 and
    Sec. 4.1), ``A`` Kaiming-uniform, ``B = 0`` at init (so the output is unchanged at init),
    no bias. Only the ``lora_A`` / ``lora_B`` weights are trainable.

    Options:

    * ``r`` (8) and ``alpha`` (16): rank and scale ``alpha / r``, as the official RoBERTa-base
      GLUE runs (``microsoft/LoRA``, ``examples/NLU/roberta_base_mnli.sh``: ``--lora_r 8
      --lora_alpha 16``).
    * ``targets`` (``("q", "v")``): module names as PEFT matches them (a module whose name
      equals the entry or ends with ``"." + entry``). The default adapts the query and value
      projections of *every* attention, self- and cross- (T5 too: its projections are also
      named ``q``/``v``); ``("attn.q", "attn.v")`` keeps to self-attention in
      :class:`~vlkit.models.layers.TransformerLayer` units.
    * ``dropout`` (0.0): dropout on the LoRA branch's input (``lora_dropout``).
    * ``seed``: seed of ``A``'s initialisation.

    Trainable: ``sum over adapted Linears of r * (d_in + d_out)``; for BERT-like units with the
    default targets, ``layers * 2 * r * (D + D)``. The backbone keeps its units; the adapted
    Linears are PEFT ``lora.Linear`` modules (the original one is their ``base_layer``).
    """
    check_backbone(backbone)
    check_positive_int("r", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty list of module names, got {targets!r}")
    linears = [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
    for t in targets:
        hits = [n for n, _ in backbone.named_modules() if _target_matches(n, t)]
        if not hits:
            raise UnknownNameError("LoRA target", t, leaves)
        bad = [n for n in hits if n not in linears]
        if bad:
            raise ValueError(f"LoRA target {t!r} matches modules that are not Linear layers ({bad[0]}, ...); "
                             f"name Linear layers, e.g. one of {', '.join(leaves)}")

    from peft import LoraConfig, inject_adapter_in_model  # heavy import, only when used

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=float(dropout),
                        bias="none", init_lora_weights=True)
    with seeded(seed):
        model = inject_adapter_in_model(config, backbone)
    if model is not backbone:  # PEFT documents in-place injection; make sure of it
        raise RuntimeError("peft.inject_adapter_in_model returned a new model; expected in-place injection")
    set_trainable(backbone, lambda n, p: LORA_PREFIX in n)
    return backbone


def lora_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(name, module)`` of every PEFT LoRA layer inside ``model``."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
