"""Parameter-efficient transfer-learning (PETL) baselines behind one call: ``apply``.

The method interface (every method follows it, the SHERL / LST / UniPT ones too)
--------------------------------------------------------------------------------
``apply(method, backbone, **options) -> nn.Module`` returns **the model to train**:

* a module whose ``forward(**inputs)`` returns a :class:`~vlkit.models.protocol.BackboneOutput`
  (``pooled``, ``sequences``, ``masks``, ...) exactly as a backbone's does, so the caller's
  task head reads ``out.pooled`` whatever the method;
* with **exactly the method's parameters** ``requires_grad`` and everything else frozen. The
  task head is *not* included: the caller adds it and trains it, so the "trainable" counts
  here (:func:`trainable_parameters`) exclude the head and the tables add it;
* where the method allows it, still a protocol :class:`~vlkit.models.protocol.Backbone`
  (``units``, ``embed`` / ``run_units`` / ``finalize``, with
  ``finalize(run_units(embed(**x), 0, n)) == forward(**x)``);
* built **in place** from ``backbone``: parameters are frozen and modules injected into the
  backbone itself (``full``, ``bitfit``, ``adapter``, ``lora`` return the very same object;
  ``prompt`` returns a wrapper around it). Pass ``copy.deepcopy(backbone)`` to keep the original.

Each method is a function ``apply_<name>(backbone, *, option=default, ...)`` whose docstring
lists its options, their defaults and the paper they follow. A method with random
initialisation takes ``seed`` (default 0) and does not touch the global RNG. Unknown method
names raise :class:`~vlkit.models.protocol.UnknownNameError` listing :data:`METHODS`; unknown
options raise it listing the method's options; bad option values raise ``ValueError`` naming
the value.

Methods (:data:`METHODS`, looked up lazily as ``"module:function"`` so that importing this
package imports neither PEFT nor the side-network methods):

=========  ==========================================================  =======================
name       what is trained                                             source
=========  ==========================================================  =======================
full       everything                                                  --
bitfit     bias terms (LayerNorm shifts included, gains not)           Ben Zaken et al. 2022
adapter    bottleneck adapters after attention and FFN + LayerNorms    Houlsby et al. 2019
lora       rank-r ``B A`` beside the attention q/v projections (PEFT)  Hu et al. 2022
prompt     n prompt tokens after [CLS] (optionally deep, per unit)     Lester et al. 2021
lst        ladder side network                                         Sung et al. 2022
unipt      UniPT side network                                          Diao et al. 2024
sherl      MTSA + the last pre-trained layer                           Diao et al. 2024
das        skip adapters for the ``skip`` units, parallel adapters     Wu et al. 2023
           beside the kept ones, poolers, token-type embeddings
=========  ==========================================================  =======================

Example::

    from vlkit.models import build
    from vlkit.methods.petl import apply, trainable_parameters
    model = apply("lora", build("minilm"), r=8, alpha=16)
    trainable_parameters(model)   # 6 layers * 2 targets * 8 * (384 + 384) = 73,728
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

from torch import nn

from vlkit.efficiency import params
from vlkit.models.protocol import UnknownNameError

__all__ = ["METHODS", "apply", "resolve", "options", "trainable_parameters", "trainable_fraction"]

# method name -> "module:function"; the function is called as fn(backbone, **options).
METHODS: dict[str, str] = {
    "full": "vlkit.methods.petl.basic:apply_full",
    "bitfit": "vlkit.methods.petl.basic:apply_bitfit",
    "adapter": "vlkit.methods.petl.basic:apply_adapter",
    "lora": "vlkit.methods.petl.basic:apply_lora",
    "prompt": "vlkit.methods.petl.prompt:apply_prompt",
    "lst": "vlkit.methods.petl.lst:apply_lst",
    "unipt": "vlkit.methods.petl.unipt:apply_unipt",
    "sherl": "vlkit.methods.sherl:apply_sherl",
    "das": "vlkit.methods.das.apply:apply_das",
}


def resolve(method: str) -> Callable[..., nn.Module]:
    """The function behind ``method`` (imported on first use)."""
    if method not in METHODS:
        raise UnknownNameError("PETL method", method, METHODS)
    module, fn = METHODS[method].split(":")
    return getattr(importlib.import_module(module), fn)


def options(method: str) -> dict:
    """``{option: default}`` of ``method`` (its function's keyword parameters)."""
    sig = inspect.signature(resolve(method))
    return {n: p.default for n, p in list(sig.parameters.items())[1:]
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def apply(method: str, backbone: nn.Module, **opts) -> nn.Module:
    """Turn ``backbone`` into the model to train with ``method`` (see the module docstring).

    ``opts`` are the method's options; a name the method does not take raises
    :class:`~vlkit.models.protocol.UnknownNameError` with the valid ones.
    """
    fn = resolve(method)
    sig = inspect.signature(fn)
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        valid = options(method)
        for key in opts:
            if key not in valid:
                raise UnknownNameError(f"option of {method}", key, valid or ["(none)"])
    return fn(backbone, **opts)


def trainable_parameters(model: nn.Module) -> int:
    """Number of trainable (``requires_grad``) parameter elements; each tensor once
    (:func:`vlkit.efficiency.params` with ``trainable_only=True``)."""
    return params(model, trainable_only=True)


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters / all parameters of ``model`` (0.0 for a model without any)."""
    total = params(model)
    return trainable_parameters(model) / total if total else 0.0
