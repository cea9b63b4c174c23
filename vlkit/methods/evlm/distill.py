"""EfficientVLM knowledge distillation (Wang et al., ACL Findings 2023, Sec. 3.1).

EfficientVLM distils a layer-halved student from its teacher with TinyBERT-style losses
(Jiao et al., Findings of EMNLP 2020, Eqs. 7-11) on every encoder (vision, text, fusion):

* **attention** -- MSE between the attention probability maps of paired layers
  (:func:`attention_loss`);
* **hidden** -- MSE between the outputs of paired layers (and of the embeddings), the
  student's projected to the teacher's width by a learned ``W_h`` when they differ
  (:func:`hidden_loss`, :class:`HiddenProjection`; TinyBERT Eq. 9);
* **logits** -- ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` on the heads' logits
  (:func:`logits_loss`; Hinton et al. 2015);

plus the task loss, all weighted by a :class:`DistillConfig` (a ``params.yaml`` section).
:class:`Distiller` runs both models through the backbone protocol and is what
:func:`vlkit.train.fit` trains (``loss_fn=distill_loss``).

Layer map (:func:`layer_pairs`): student layer ``i`` <-> teacher layer ``2i + 1`` of the
same encoder (0-based; the last meets the last), :func:`vlkit.models.xvlm.student_layer_map`.
This is the official code's choice (``swaggy-TN/EfficientVLM``, ``GeneralDistill.py`` /
``Eff_VQA.py``, ``get_cor_teacher``: attention maps ``i * k + k - 1`` and hidden states
``i * k`` of the list that starts with the embeddings, ``k = 2``).

Choices, and where they follow or leave the official code
---------------------------------------------------------
* **Attention maps are probabilities** (post-softmax), as the official xbert returns them
  (TinyBERT's own code compares pre-softmax scores). Per pair, the loss is the squared error
  summed over the key axis and averaged over batch, heads and *real* query rows: the
  official ``MSELoss()(s, t) * s.shape[-1]`` (mean over every element times the key count),
  except that padded query rows are left out. Padded keys carry probability exactly 0 in
  both maps (the additive mask is ``finfo.min``), so they add nothing either way.
* **Cross-attention** maps of fusion units are distilled too when
  ``DistillConfig.cross_attention`` is true (default): the official fine-tuning scripts do
  (``Eff_VQA.py``: ``cross_attention_loss``), its pre-training script ``GeneralDistill.py``
  uses self-attention maps only -- set it false there to match.
* **Heads must match**: maps are compared head by head, so the attention loss needs the same
  head count in both paired units. Hard-concrete gates (:mod:`.gating`) and masks only
  multiply head *outputs*, so every map survives and distillation runs alongside pruning,
  as in the paper's fine-tuning stage. After *physical* pruning (:func:`.prune.prune`) heads
  are gone: the attention loss raises, naming the unit and both counts (set its weight to 0).
* **Embeddings** are distilled by the hidden loss when ``DistillConfig.embeddings`` is true
  (default): TinyBERT's ``m = 0`` term and the official hidden-state lists, which start with
  the embedding output. They are the streams :meth:`Backbone.embed` returns.
* **Sums over pairs**: both losses add up their pairs over all encoders (TinyBERT Eq. 11,
  official ``get_kd_loss``). The official code also reweights per encoder (image hidden x0.1
  in pre-training, x0.2 in fine-tuning; fusion x0.5 in fine-tuning); vlkit does not -- one
  weight per loss kind.
* **Hidden MSE** ignores padded positions (the official ``MSELoss`` averages over them too).
* **Logits KD** is ``KL(p_t || p_s)`` averaged over rows (``batchmean``) times ``T^2``
  (Hinton); the official ``soft_cross_entropy`` omits ``T^2`` (identical at its default
  ``T = 1``). Which logits: whatever the heads give on ``features(output)`` (default the
  pooled vector) -- the task head at fine-tuning time; for pre-training, vlkit has the ITM
  head (:class:`~vlkit.tasks.heads.ITMHead`); an MLM head's logits work the same way when a
  ``features`` function gathers the masked positions' hidden states (the official code
  distils ITM and MLM logits).
* **Weights**: the official total is ``0.6 * task + 0.4 * (attn + hidden + logits)``;
  :class:`DistillConfig`'s defaults are those numbers.

Only the paired units' outputs are compared; a unit with no partner (the teacher's even
layers) is free.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...models.protocol import Backbone, BackboneOutput, UnitSpec
from ...models.xvlm import student_layer_map

LOSS_KEYS = ("attn", "hidden", "logits", "task")


# ============================================================================ config
@dataclass(frozen=True)
class DistillConfig:
    """Weights of the distillation objective (a ``params.yaml`` section)::

        loss = attn * L_attn + hidden * L_hidden + logits * L_logits + task * L_task

    Defaults follow the official code's ``0.4 * L_kd + 0.6 * L_task`` (module docstring).
    ``temperature``: the logits-KD temperature ``T`` (> 0). ``cross_attention``: also distil
    fusion units' cross-attention maps. ``embeddings``: the hidden loss also compares the
    embedding outputs. A weight of 0 switches its loss off (and the teacher is not run at all
    when every KD weight is 0: fine-tune-only); Tab. 4's "KD-only" is ``task = 0``.
    """

    attn: float = 0.4
    hidden: float = 0.4
    logits: float = 0.4
    task: float = 0.6
    temperature: float = 1.0
    cross_attention: bool = True
    embeddings: bool = True

    def __post_init__(self):
        for name in LOSS_KEYS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"distillation weight {name} must be a finite number >= 0, got {v!r}")
        if not any(getattr(self, name) > 0 for name in LOSS_KEYS):
            raise ValueError(f"at least one distillation weight ({', '.join(LOSS_KEYS)}) must be > 0; all are 0")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        for name in ("cross_attention", "embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def kd(self) -> bool:
        """Whether any teacher-based loss is on (else the teacher need not run)."""
        return self.attn > 0 or self.hidden > 0 or self.logits > 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DistillConfig":
        """From a ``params.yaml`` mapping; unknown keys raise naming the valid ones."""
        valid = [f.name for f in fields(cls)]
        bad = [k for k in d if k not in valid]
        if bad:
            raise ValueError(f"unknown distillation key(s) {', '.join(map(repr, bad))}; valid keys: {', '.join(valid)}")
        return cls(**d)


# ============================================================================ layer map
def _encoders(model: Backbone) -> dict[str, list[UnitSpec]]:
    """Units grouped into encoders by (modality, stream), in execution order.

    The stream matters for co-attention fusion (METER): ``FL*`` (text side) and ``FV*``
    (image side) are two interleaved encoders of one modality."""
    groups: dict[tuple[str, str], list[UnitSpec]] = {}
    for s in model.specs:
        groups.setdefault((s.modality, s.stream), []).append(s)
    per_modality: dict[str, int] = {}
    for m, _ in groups:
        per_modality[m] = per_modality.get(m, 0) + 1
    return {(m if per_modality[m] == 1 else f"{m} ({st} stream)"): v for (m, st), v in groups.items()}


def layer_pairs(student: Backbone, teacher: Backbone) -> list[tuple[str, str]]:
    """``(student unit, teacher unit)`` pairs, in the student's execution order: in every
    encoder (units of one modality updating one stream), student layer ``i`` <-> teacher layer
    ``2i + 1`` (:func:`~vlkit.models.xvlm.student_layer_map`; last to last).

    Raises ``ValueError`` naming the encoder and both layer counts when the teacher's encoder
    is not twice the student's, or when an encoder exists in only one of the models.
    E.g. xvlm-clip-small (6/3/3) vs xvlm-clip (12/6/6): VEn0-VEn1, ..., VEn5-VEn11, LEn0-LEn1,
    ..., LEn2-LEn5, F0-F1, ..., F2-F5 (the same as :func:`~vlkit.models.xvlm.student_unit_map`).
    """
    s_enc, t_enc = _encoders(student), _encoders(teacher)
    missing = sorted(set(s_enc) ^ set(t_enc))
    if missing:
        desc = "; ".join(f"{e}: student has {len(s_enc.get(e, []))} layers, teacher has {len(t_enc.get(e, []))}"
                         for e in missing)
        raise ValueError(f"student and teacher have different encoders ({desc}); student encoders: "
                         f"{', '.join(s_enc) or 'none'}; teacher encoders: {', '.join(t_enc) or 'none'}")
    pairs: list[tuple[str, str]] = []
    for enc, s_units in s_enc.items():
        t_units = t_enc[enc]
        try:
            idx = student_layer_map(len(s_units), len(t_units))
        except ValueError as e:
            raise ValueError(f"{enc} encoder: student has {len(s_units)} layers and teacher {len(t_units)}; "
                             f"{e}") from None
        pairs += [(s_units[i].name, t_units[j].name) for i, j in enumerate(idx)]
    order = {n: k for k, n in enumerate(student.unit_names)}
    return sorted(pairs, key=lambda p: order[p[0]])


# ============================================================================ losses
def _row_mask(mask: torch.Tensor | None, shape: torch.Size, what: str) -> torch.Tensor | None:
    """A keep-mask (1 = keep) as bool, checked to have ``shape``; ``None`` stays ``None``."""
    if mask is None:
        return None
    if mask.shape != shape:
        raise ValueError(f"{what} mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask.to(torch.bool)


def attention_loss(s_attn: torch.Tensor, t_attn: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention-map MSE of one layer pair (TinyBERT Eq. 8, EfficientVLM Sec. 3.1)::

        L = 1 / (H * sum_b,i mask[b,i]) * sum_{b,h,i: mask[b,i]} sum_j (A^S_bhij - A^T_bhij)^2

    ``s_attn``, ``t_attn``: (B, H, N, M) attention probabilities; ``mask``: (B, N) keep-mask of
    the *query* rows (1 = real token) or ``None`` (all rows). Summing over the keys ``j``
    equals the official ``MSELoss()(A_s, A_t) * M`` when no row is masked.
    """
    if s_attn.dim() != 4 or s_attn.shape != t_attn.shape:
        raise ValueError(f"attention maps must both be (B, H, N, M) of one shape; got student "
                         f"{tuple(s_attn.shape)}, teacher {tuple(t_attn.shape)}")
    err = (s_attn.float() - t_attn.float()).pow(2).sum(-1)  # (B, H, N), fp32 under autocast too
    keep = _row_mask(mask, s_attn.shape[:1] + s_attn.shape[2:3], "query")
    if keep is None:
        return err.mean()
    rows = keep.sum()
    if rows == 0:
        raise ValueError("attention_loss: the mask keeps no query row")
    return (err * keep[:, None, :]).sum() / (rows * s_attn.shape[1])


def hidden_loss(s_hidden: torch.Tensor, t_hidden: torch.Tensor, proj: nn.Module | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden-state MSE of one layer pair (TinyBERT Eq. 9)::

        L = 1 / (D_T * sum mask) * sum_{b,i: mask[b,i]} || proj(H^S_bi) - H^T_bi ||^2

    ``s_hidden``: (B, N, D_S); ``t_hidden``: (B, N, D_T); ``proj``: the learned ``W_h`` mapping
    ``D_S -> D_T`` (required when the widths differ; ``None`` = identity); ``mask``: (B, N)
    keep-mask (1 = real token) or ``None`` (every position).
    """
    if proj is not None:
        s_hidden = proj(s_hidden)
    if s_hidden.shape != t_hidden.shape:
        hint = "" if proj is not None else " (widths differ: pass a projection, e.g. HiddenProjection)"
        raise ValueError(f"hidden states differ in shape: student {tuple(s_hidden.shape)}, teacher "
                         f"{tuple(t_hidden.shape)}{hint}")
    err = (s_hidden.float() - t_hidden.float()).pow(2)
    keep = _row_mask(mask, s_hidden.shape[:-1], "token")
    if keep is None:
        return err.mean()
    n = keep.sum()
    if n == 0:
        raise ValueError("hidden_loss: the mask keeps no position")
    return (err * keep[..., None]).sum() / (n * s_hidden.shape[-1])


def logits_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Soft-target KD (Hinton et al. 2015; TinyBERT Eq. 10)::

        L = T^2 / R * sum_r KL( softmax(z^T_r / T) || softmax(z^S_r / T) )

    over the rows ``r`` of ``(..., C)`` logits (``batchmean``), or over the rows ``mask``
    (shape ``logits.shape[:-1]``) keeps.
    """
    if s_logits.shape != t_logits.shape:
        raise ValueError(f"logits differ in shape: student {tuple(s_logits.shape)}, teacher {tuple(t_logits.shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    log_ps = F.log_softmax(s_logits.float() / temperature, dim=-1)
    log_pt = F.log_softmax(t_logits.float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (...,)
    keep = _row_mask(mask, s_logits.shape[:-1], "logits row")
    if keep is None:
        return kl.mean() * temperature ** 2
    n = keep.sum()
    if n == 0:
        raise ValueError("logits_loss: the mask keeps no row")
    return (kl * keep).sum() / n * temperature ** 2


# ============================================================================ projection
def embed_key(stream: str) -> str:
    """Key of an embedding stream in :class:`HiddenProjection` (unit names never contain ':')."""
    return f"embed:{stream}"


class HiddenProjection(nn.Module):
    """TinyBERT's learned ``W_h`` (Eq. 9): one ``Linear(D_S, D_T)`` per distilled pair whose
    widths differ, keyed by the student unit's name (or :func:`embed_key` of an embedding
    stream); pairs of equal width get none (identity). Initialised under ``seed``.

    ``widths``: key -> ``(D_S, D_T)``.
    """

    def __init__(self, widths: Mapping[str, tuple[int, int]], seed: int = 0):
        super().__init__()
        self.widths = dict(widths)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # ModuleDict keys may not contain '.', so ':' is encoded
            self.proj = nn.ModuleDict({k.replace(":", "__"): nn.Linear(ds, dt)
                                       for k, (ds, dt) in self.widths.items() if ds != dt})

    def get(self, key: str) -> nn.Module | None:
        """The projection of ``key`` (``None`` = identity)."""
        if key not in self.widths:
            raise KeyError(f"no distilled pair {key!r}; valid: {', '.join(self.widths)}")
        return self.proj[key.replace(":", "__")] if key.replace(":", "__") in self.proj else None


# ============================================================================ distiller
def _run(model: Backbone, inputs: Mapping[str, Any], attentions: bool, units: bool):
    """Backbone.forward spelled out through the protocol, so the embedding streams are kept:
    returns (output with unit_outputs / attentions, embedding streams, stream masks)."""
    state = model.embed(**inputs)
    embeds, masks = dict(state.streams), dict(state.masks)
    record = {} if units else None
    attns = {} if attentions else None
    state = model.run_units(state, 0, None, record=record, attentions=attns)
    out = model.finalize(state)
    out.unit_outputs, out.attentions = record, attns
    return out, embeds, masks


def _input_names(model: Backbone) -> set[str] | None:
    """Keyword names ``model.embed`` accepts (``None``: it takes ``**kwargs``)."""
    params = inspect.signature(model.embed).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _pooled(output: BackboneOutput) -> torch.Tensor:
    return output.pooled


class Distiller(nn.Module):
    """Student + frozen teacher + distillation losses; what :func:`vlkit.train.fit` trains.

    ``student``, ``teacher``: protocol backbones whose encoders pair up by :func:`layer_pairs`.
    ``student_head`` / ``teacher_head``: task heads (e.g. the fine-tuned teacher's classifier)
    applied to ``features(output)`` (default: the pooled vector); the logits loss needs both.
    ``inputs_fn(batch) -> dict`` picks the backbone inputs from a batch (default: the batch's
    keys that ``student.embed`` accepts). ``task_loss_fn(s, batch)``: the task loss, where
    ``s`` is the student head's logits if there is a student head, else the student's
    :class:`BackboneOutput`. ``seed`` initialises the hidden projections.

    Trainable: the student, its head and the hidden projections. The teacher (and its head)
    are frozen (``requires_grad=False`` -- on the caller's modules), always in eval mode, and
    run under ``torch.no_grad()``. They are submodules (``.to(device)`` moves them), so a
    checkpoint of the Distiller holds them unless ``TrainConfig(ckpt_trainable_only=True)``.
    """

    def __init__(self, student: Backbone, teacher: Backbone, config: DistillConfig | None = None,
                 student_head: nn.Module | None = None, teacher_head: nn.Module | None = None, *,
                 features: Callable[[BackboneOutput], torch.Tensor] = _pooled,
                 inputs_fn: Callable[[Any], Mapping[str, Any]] | None = None,
                 task_loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, seed: int = 0):
        super().__init__()
        for name, m in (("student", student), ("teacher", teacher)):
            if not isinstance(m, Backbone):
                raise TypeError(f"{name} must be a vlkit Backbone (vlkit.models.build(...)), got {type(m).__name__}")
        if student is teacher:
            raise ValueError("student and teacher are the same module; distil into a separate student")
        self.config = config = config if config is not None else DistillConfig()
        if not isinstance(config, DistillConfig):
            raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
        if config.logits > 0 and (student_head is None or teacher_head is None):
            raise ValueError(f"logits weight {config.logits} > 0 needs both student_head and teacher_head "
                             "(or set logits: 0)")
        self.student, self.teacher = student, teacher
        self.student_head, self.teacher_head = student_head, teacher_head
        self.features, self.inputs_fn, self.task_loss_fn = features, inputs_fn, task_loss_fn
        # only the attention and hidden losses pair layers (logits-only KD needs no layer map)
        self.pairs = layer_pairs(student, teacher) if config.attn > 0 or config.hidden > 0 else []
        for frozen in (teacher, teacher_head):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen.eval()
        self.projection = HiddenProjection(self._widths() if config.hidden > 0 else {}, seed=seed)

    # ------------------------------------------------------------------ set-up
    def _widths(self) -> dict[str, tuple[int, int]]:
        """(D_S, D_T) of every distilled hidden pair: from the units' ``dim`` (every
        TransformerLayer has one) and the embedding streams of a dry run on dummy inputs."""
        s_dims, t_dims = self._dims(self.student), self._dims(self.teacher)
        out = {s: (s_dims[s], t_dims[t]) for s, t in self.pairs}
        if self.config.embeddings:
            s_emb, t_emb = s_dims["embed"], t_dims["embed"]
            if set(s_emb) != set(t_emb):
                raise ValueError(f"embedding streams differ: student {sorted(s_emb)}, teacher {sorted(t_emb)}")
            out.update({embed_key(k): (s_emb[k], t_emb[k]) for k in s_emb})
        return out

    def _dims(self, model: Backbone) -> dict:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                inputs = model.dummy_inputs(1)
                dims: dict = {"embed": {k: v.shape[-1] for k, v in model.embed(**inputs).streams.items()}}
                if all(isinstance(getattr(model.unit(n), "dim", None), int) for n in model.unit_names):
                    dims.update({n: model.unit(n).dim for n in model.unit_names})
                else:  # a replaced unit without ``dim``: read the widths off a full dry run
                    out = model(output_units=True, **inputs)
                    dims.update({n: t.shape[-1] for n, t in out.unit_outputs.items()})
        finally:
            model.train(was)
        return dims

    def train(self, mode: bool = True) -> "Distiller":
        """Train mode for the student side only; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        if self.teacher_head is not None:
            self.teacher_head.eval()
        return self

    def inputs(self, batch: Any) -> dict:
        """The backbone inputs of ``batch`` (see the class docstring)."""
        if self.inputs_fn is not None:
            return dict(self.inputs_fn(batch))
        if not isinstance(batch, Mapping):
            raise TypeError(f"a batch must be a mapping of backbone inputs (or give inputs_fn); got "
                            f"{type(batch).__name__}")
        names = _input_names(self.student)
        return dict(batch) if names is None else {k: v for k, v in batch.items() if k in names}

    # ------------------------------------------------------------------ the loss
    def _attention(self, s_out, t_out, masks) -> torch.Tensor:
        total = 0
        for s_name, t_name in self.pairs:
            s_maps, t_maps = s_out.attentions[s_name], t_out.attentions[t_name]
            n = 2 if self.config.cross_attention else 1
            s_maps, t_maps = s_maps[:n], t_maps[:n]
            if len(s_maps) != len(t_maps) or not s_maps:
                raise ValueError(f"attention distillation: student unit {s_name} gave {len(s_maps)} attention maps "
                                 f"and teacher unit {t_name} {len(t_maps)}; both need the same (set attn: 0 for "
                                 "units without attention)")
            mask = masks.get(self.student.spec(s_name).stream)
            for k, (a_s, a_t) in enumerate(zip(s_maps, t_maps)):
                kind = "self" if k == 0 else "cross"
                if a_s is None or a_t is None or a_s.shape[1] != a_t.shape[1]:
                    hs = 0 if a_s is None else a_s.shape[1]
                    ht = 0 if a_t is None else a_t.shape[1]
                    raise ValueError(f"attention distillation compares head by head: student unit {s_name} has {hs} "
                                     f"{kind}-attention heads, teacher unit {t_name} has {ht}. Distil before physical "
                                     "pruning (gated or masked heads keep their maps) or set attn: 0")
                total = total + attention_loss(a_s, a_t, mask)
        return total

    def _hidden(self, s_out, t_out, s_emb, t_emb, masks) -> torch.Tensor:
        total = 0
        if self.config.embeddings:
            for stream, h in s_emb.items():
                total = total + hidden_loss(h, t_emb[stream], self.projection.get(embed_key(stream)), masks.get(stream))
        for s_name, t_name in self.pairs:
            mask = masks.get(self.student.spec(s_name).stream)
            total = total + hidden_loss(s_out.unit_outputs[s_name], t_out.unit_outputs[t_name],
                                        self.projection.get(s_name), mask)
        return total

    def loss(self, batch: Any, task_loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> dict:
        """``{"loss", "attn", "hidden", "logits", "task"}``: the weighted total and each loss
        unweighted (0 when its weight is 0 and it was not computed)."""
        cfg = self.config
        task_loss_fn = task_loss_fn or self.task_loss_fn
        if cfg.task > 0 and task_loss_fn is None:
            raise ValueError(f"task weight {cfg.task} > 0 needs a task_loss_fn (or set task: 0 for KD only)")
        inputs = self.inputs(batch)
        want_attn, want_units = cfg.attn > 0, cfg.hidden > 0
        if cfg.kd:
            self.teacher.eval()
            with torch.no_grad():
                t_out, t_emb, _ = _run(self.teacher, inputs, want_attn, want_units)
                t_logits = self.teacher_head(self.features(t_out)) if cfg.logits > 0 else None
        s_out, s_emb, masks = _run(self.student, inputs, want_attn, want_units)
        s_logits = self.student_head(self.features(s_out)) if self.student_head is not None else None

        zero = s_out.pooled.new_zeros(())
        parts = dict.fromkeys(LOSS_KEYS, zero)
        if want_attn:
            parts["attn"] = zero + self._attention(s_out, t_out, masks)
        if want_units:
            parts["hidden"] = zero + self._hidden(s_out, t_out, s_emb, t_emb, masks)
        if cfg.logits > 0:
            parts["logits"] = logits_loss(s_logits, t_logits, cfg.temperature)
        if cfg.task > 0:
            parts["task"] = task_loss_fn(s_logits if s_logits is not None else s_out, batch)
        total = sum(getattr(cfg, k) * parts[k] for k in LOSS_KEYS if getattr(cfg, k) > 0)
        return {"loss": total, **parts}

    def forward(self, batch: Any, task_loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> dict:
        return self.loss(batch, task_loss_fn)


def distill_loss(distiller: Distiller, batch: Any) -> dict:
    """``fit``'s ``loss_fn``: ``fit(distiller, distill_loss, data, config=...)``."""
    return distiller.loss(batch)
