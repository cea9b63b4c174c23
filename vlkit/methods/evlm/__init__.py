"""EfficientVLM: distilling then pruning (Wang et al., ACL Findings 2023).

This package holds both halves: task-time and pre-training distillation of a layer-halved
student (:mod:`.distill`, TinyBERT-style attention / hidden / logits losses), hard-concrete
gates on the heads and FFN units of any protocol backbone (:mod:`.gating`, following CoFi, Xia
et al. 2022) and the physical removal of what the gates close (:mod:`.prune`), so the pruned
model is a smaller dense model whose outputs equal the masked model's. The study that
rebuilds the paper's tables on the mini models is :mod:`.study` (not imported here: it pulls
in the task runners).

Typical flow::

    gates = attach_gates(backbone)                      # gates on every TransformerLayer unit
    budget = gates.budget(target_sparsity=0.5, warmup_steps=1000)   # modal-adaptive (global)
    ...  loss = task_loss + budget(step).penalty  ...   # optimise gates.parameters() too
    masks = gates.masks(); gates.detach()
    small = prune(backbone, masks)                      # smaller q/k/v/o and FFN Linear layers
    save_pruned(small, "out/"); small2 = load_pruned(preset, "out/")
"""

from .distill import (DistillConfig, Distiller, HiddenProjection, attention_loss, distill_loss, hidden_loss,
                      layer_pairs, logits_loss)
from .gating import DEFAULT_INIT, GateSet, attach_gates
from .prune import (MASK_KEYS, apply_masks, check_masks, clear_masks, ffn_unit_cost, head_cost, load_pruned,
                    masked_copy, prunable_units, prune, pruning_spec, removed_params, reshape_to_spec,
                    save_pruned, uniform_masks)

__all__ = ["GateSet", "attach_gates", "DEFAULT_INIT", "MASK_KEYS", "prune", "masked_copy", "apply_masks",
           "clear_masks", "check_masks", "removed_params", "head_cost", "ffn_unit_cost", "prunable_units",
           "pruning_spec", "reshape_to_spec", "save_pruned", "load_pruned", "uniform_masks", "DistillConfig",
           "Distiller", "distill_loss", "layer_pairs", "attention_loss", "hidden_loss", "logits_loss",
           "HiddenProjection"]
