"""One training loop for every vlkit method: :func:`fit`.

What it does, per optimiser step ``k`` (1-based: step ``k`` is the k-th parameter update,
and checkpoint ``ckpt-k`` holds the state after it):

1. take the next ``grad_accum`` micro-batches of the seeded data stream (below), run
   ``loss_fn(model, batch)`` under autocast, back-propagate ``loss / grad_accum``;
2. in multi-process runs, average gradients and logged values over processes;
3. stop with :class:`NonFiniteLossError` if a loss (or a logged value) or the gradient norm
   is non-finite -- naming the step, the batch index within its epoch and the last good
   checkpoint -- before the optimiser touches the parameters and without checkpointing
   the broken state;
4. clip (optional), ``AdamW`` step, learning-rate schedule step;
5. every ``eval_every`` steps and at the end: ``eval_fn(model)`` (non-finite metrics raise
   :class:`NonFiniteMetricError`); every ``ckpt_every`` steps and at the end: a checkpoint
   directory (:mod:`vlkit.checkpoint`) holding weights, optimiser, scheduler, per-process
   RNG states, the data position and the history so far.

Data stream. ``train_data`` is anything with ``__len__`` and ``__getitem__`` (a torch
``Dataset``, a ``datasets.Dataset``, a list); batches are ``collate_fn([data[i] ...])``
(default ``torch.utils.data.default_collate``). Epoch ``e`` visits
``torch.randperm(len(data), generator=data_generator(seed, e))`` in consecutive micro-batches
of ``batch_size`` (the last incomplete one is dropped, so every micro-batch has the same
size). Epochs are concatenated into one stream and step ``k`` consumes micro-batches
``(k-1)*grad_accum ... k*grad_accum - 1`` of it, so the data position is a pure function of
the step: a resumed run re-creates the epoch's order and skips what it has seen.

Loss semantics. ``loss_fn`` returns the *mean* loss of its micro-batch (a scalar tensor, or
a dict with ``"loss"`` and other scalars to log). Back-propagating ``loss / grad_accum``
makes ``grad_accum=a`` with ``batch_size=b`` equal ``grad_accum=1`` with ``batch_size=a*b``
(up to float rounding), because every micro-batch has the same size.

Processes. ``batch_size`` is the *global* micro-batch size: with ``P`` processes each takes
a contiguous ``batch_size / P`` slice of the same global micro-batch, and gradients are
averaged, so a ``torchrun --nproc_per_node P`` run follows the single-process run (up to
float rounding) and every process ends with identical parameters. Accelerate sets up the
process group, the device, autocast and the fp16 gradient scaler; the model is *not*
wrapped in ``DistributedDataParallel``: methods call the backbone through its protocol
(``embed``, ``run_units`` on a frozen prefix, ...) rather than only through ``forward``, and
leave some parameters without gradients (skipped layers), which DDP's forward-hook
reducer does not support without ``find_unused_parameters``. Gradients are averaged
once per step with one flattened ``all_reduce`` instead (a parameter keeps ``grad=None``
only if it has none on every process, so AdamW skips it exactly as in one process).

Precision. ``amp="auto"`` is bf16 autocast on a CUDA device that supports it and full
fp32 on the CPU (bit-reproducible); ``"bf16"`` / ``"fp16"`` force it (fp16 needs CUDA and
uses a gradient scaler, which handles inf gradients itself by skipping the step, so the
gradient guard is off for fp16 -- the loss guard stays on).

Resume. ``fit(..., run_dir=d)`` resumes from ``latest_checkpoint(d)`` if there is one and
its params hash (training config + dataset length + caller's ``params_hash``) matches; on
the CPU the finished run equals an uninterrupted one bit for bit (tests/reliability).
``resume=False`` deletes the run directory's checkpoints first and starts over.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    checkpoint_name,
    hash_params,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .models.protocol import UnknownNameError
from .seeding import check_seed, data_generator, derive_seed, rng_state, seed_everything, set_rng_state

log = logging.getLogger("vlkit.train")

AMP_MODES = ("auto", "off", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")
# Fields that do not change what is computed: left out of the params hash, so they may
# change between a run and its resumption.
_NON_RESULT_FIELDS = ("log_every", "ckpt_every", "keep", "ckpt_trainable_only", "progress")


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss, logged value or gradient norm stopped the run.

    Attributes: ``step`` (1-based update that failed), ``epoch``, ``batch`` (index of the
    micro-batch within its epoch), ``what`` (``"loss"``, ``"gradient norm"`` or the logged
    key), ``value``, ``checkpoint`` (last good checkpoint path, or ``None``).
    """

    def __init__(self, what: str, value: float, step: int, epoch: int, batch: int, checkpoint: Path | None,
                 detail: str = ""):
        self.what, self.value, self.step, self.epoch, self.batch = what, value, step, epoch, batch
        self.checkpoint = checkpoint
        super().__init__(
            f"non-finite {what} ({value}) at step {step} (epoch {epoch}, batch {batch}){detail}; "
            f"last good checkpoint: {checkpoint if checkpoint is not None else 'none'}. The run was stopped "
            "before the update; nothing of the broken state was saved.")


class NonFiniteMetricError(FloatingPointError):
    """``eval_fn`` returned a non-finite metric: it must never reach a results table."""


@dataclass
class TrainConfig:
    """Every knob of :func:`fit`. Give exactly one of ``steps`` (optimiser steps) or
    ``epochs`` (passes over the data, counted in micro-batches; see the module docstring).

    ``batch_size`` is the global micro-batch size (all processes together); one optimiser
    step sees ``batch_size * grad_accum`` examples. ``schedule``: ``constant``, ``linear``
    (warm-up then linear decay to 0, as ``transformers.get_linear_schedule_with_warmup``) or
    ``cosine`` (warm-up then half-cosine to 0, ``get_cosine_schedule_with_warmup``).
    ``weight_decay`` applies to parameters with ``ndim >= 2`` only (not biases / norm
    scales -- the BERT and nanoGPT convention). ``amp``: ``auto | off | bf16 | fp16``;
    ``device``: ``auto | cpu | cuda``. ``ckpt_every=None``: checkpoint only at the end (and
    when stopped by ``stop_at_step``). ``keep``: checkpoints kept (``None``: all).
    ``ckpt_trainable_only``: see :func:`vlkit.checkpoint.save_checkpoint`. ``progress``:
    tqdm bar; ``None`` = only when stderr is a terminal. ``fused``: AdamW's fused kernel
    (``torch.optim.AdamW(fused=True)``), several times faster on the CPU; off by default so
    a run equals a hand-written for-loop AdamW bit for bit.
    """

    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accum: int = 1
    max_grad_norm: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = None
    ckpt_every: int | None = None
    keep: int | None = 2
    ckpt_trainable_only: bool = False
    progress: bool | None = None
    fused: bool = False  # AdamW's fused kernel (CPU/CUDA): ~5x faster steps on the CPU; rounding differs slightly

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"give exactly one of steps or epochs (got steps={self.steps!r}, epochs={self.epochs!r})")
        required = ("batch_size", "grad_accum", "log_every")
        for name in ("steps", "epochs", *required, "eval_every", "ckpt_every", "keep"):
            v = getattr(self, name)
            if (v is not None or name in required) and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                allowed = "an int >= 1" if name in required else "an int >= 1 or None"
                raise ValueError(f"{name} must be {allowed}, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        mgn = self.max_grad_norm
        if mgn is not None and not (isinstance(mgn, (int, float)) and math.isfinite(mgn) and mgn > 0):
            raise ValueError(f"max_grad_norm must be a number > 0 or None, got {self.max_grad_norm!r}")
        if self.amp not in AMP_MODES:
            raise UnknownNameError("amp mode", self.amp, AMP_MODES)
        if self.schedule not in SCHEDULES:
            raise UnknownNameError("schedule", self.schedule, SCHEDULES)
        if self.device not in DEVICES:
            raise UnknownNameError("device", self.device, DEVICES)
        self.betas = tuple(self.betas)
        check_seed(self.seed)

    def result_dict(self) -> dict:
        """The fields that change what is computed (hashed into the run's params hash)."""
        d = dataclasses.asdict(self)
        for k in _NON_RESULT_FIELDS:
            d.pop(k)
        d["betas"] = list(d["betas"])
        if not d["fused"]:  # absent when off, so runs from before the field keep their params hash
            d.pop("fused")
        return d


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    ``history``: one dict per optimiser step from step 1 (``step``, ``loss``, ``lr``,
    ``grad_norm`` and the loss_fn's other logged scalars), restored from the checkpoint on
    resume; ``evals``: one dict per evaluation (``step`` + metrics); ``step``: the last step
    done; ``total_steps``; ``wall_time``: seconds spent in this call; ``checkpoint``: the last
    checkpoint written or loaded; ``resumed_from``: the checkpoint this call started from.
    """

    history: list[dict]
    evals: list[dict]
    step: int
    total_steps: int
    wall_time: float
    checkpoint: Path | None = None
    resumed_from: Path | None = None

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


class _Schedule:
    """LR multiplier for ``LambdaLR``; a class (not a lambda) so its settings are saved in the
    scheduler state dict. Formulas of transformers' ``get_{linear,cosine}_schedule_with_warmup``."""

    def __init__(self, kind: str, warmup: int, total: int):
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return s / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        progress = (s - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


# ============================================================================ helpers
def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator
    # with other settings; resetting it (not the PartialState that holds the process group)
    # lets successive fit() calls in one process use different amp / device settings.
    AcceleratorState._reset_state()
    cuda_ok = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda_ok:
        raise ValueError("device='cuda' but CUDA is not available; valid here: auto, cpu")
    cpu = cfg.device == "cpu" or not cuda_ok
    if cfg.amp == "auto":
        mp = "bf16" if (not cpu and torch.cuda.is_bf16_supported()) else "no"
    elif cfg.amp == "off":
        mp = "no"
    elif cfg.amp == "fp16" and cpu:
        raise ValueError("amp='fp16' needs a CUDA device; on the CPU use amp='bf16' or 'off'")
    else:
        mp = cfg.amp
    return Accelerator(cpu=cpu, mixed_precision=mp)


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters (``requires_grad``) in two groups: ``ndim >= 2`` with weight
    decay, biases and norm scales without (BERT / nanoGPT ``configure_optimizers``)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (none has requires_grad=True)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _split_loss(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    extras = {}
    if isinstance(out, dict):
        if "loss" not in out:
            raise KeyError(f"loss_fn returned a dict without 'loss' (keys: {', '.join(map(str, out))})")
        extras = {k: v for k, v in out.items() if k != "loss"}
        out = out["loss"]
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"loss_fn must return a scalar tensor (or a dict with 'loss'), got {shape}")
    scalars = {}
    for k, v in extras.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            scalars[str(k)] = v.detach().float().reshape(())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            scalars[str(k)] = torch.tensor(float(v))
    return out.reshape(()), scalars


def _all_reduce_grads(params: list[nn.Parameter], world: int) -> None:
    """Average gradients over processes with one flattened all_reduce per dtype/device."""
    import torch.distributed as dist

    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(flags)
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.device, p.dtype), []).append(p)
    for ps in groups.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for p, g in zip(ps, torch._utils._unflatten_dense_tensors(flat, grads)):
            p.grad = g.clone()
    for p, f in zip(params, flags.tolist()):
        if f == 0:
            p.grad = None


def _gather_json(obj: Any, world: int) -> list:
    """``[obj of process 0, obj of process 1, ...]`` through JSON bytes (no pickle)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    n = torch.tensor([data.numel()], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, n)
    size = int(max(s.item() for s in sizes))
    buf = torch.zeros(size, dtype=torch.uint8)
    buf[: data.numel()] = data
    out = [torch.zeros(size, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(out, buf)
    return [json.loads(bytes(o[: int(s.item())].tolist()).decode()) for o, s in zip(out, sizes)]


def _show_progress(cfg: TrainConfig, main: bool) -> bool:
    if not main or cfg.progress is False:
        return False
    return bool(cfg.progress) or sys.stderr.isatty()


# ============================================================================ the loop
def fit(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Any],
    train_data: Sequence,
    *,
    config: TrainConfig,
    collate_fn: Callable[[list], Any] | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = True,
    params_hash: str | None = None,
    param_groups: list[dict] | None = None,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    stop_at_step: int | None = None,
) -> TrainResult:
    """Train ``model`` in place with ``loss_fn(model, batch)`` (see the module docstring).

    ``eval_fn(model) -> {metric: number}`` runs under ``torch.no_grad()`` in eval mode.
    ``run_dir``: checkpoint directory (``None``: no checkpoints, no resume). ``params_hash``:
    the caller's hash of everything else that shapes the run (model preset, method knobs,
    data profile); it is combined with the config into the checkpoint's params hash.
    ``param_groups``: AdamW groups replacing :func:`default_param_groups`. ``callbacks``:
    called as ``cb(step, record)`` after each step (after its eval and checkpoint).
    ``stop_at_step``: stop (and checkpoint) once this step is done, as a preemption would;
    calling ``fit`` again resumes.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    cfg = config
    accelerator = _make_accelerator(cfg)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    collate = collate_fn if collate_fn is not None else torch.utils.data.default_collate

    n = len(train_data)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    bpe = n // cfg.batch_size  # micro-batches per epoch
    if bpe == 0:
        raise ValueError(f"the training data has {n} examples, fewer than batch_size={cfg.batch_size}")
    total = cfg.steps if cfg.steps is not None else cfg.epochs * bpe // cfg.grad_accum
    if total < 1:
        raise ValueError(f"{cfg.epochs} epoch(s) of {bpe} micro-batches give no step of grad_accum={cfg.grad_accum}")
    stop = total if stop_at_step is None else min(total, int(stop_at_step))
    run_hash = hash_params({"train": cfg.result_dict(), "data_len": n, "params": params_hash})

    model.to(device)
    model.train()
    groups = param_groups if param_groups is not None else default_param_groups(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                  **({"fused": True} if cfg.fused else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(cfg.schedule, cfg.warmup_steps, total))
    # Model order (not group order), so the clipping norm sums in the order a plain
    # ``clip_grad_norm_(model.parameters())`` would: bit-identical to a hand-written loop.
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    params = [p for p in model.parameters() if id(p) in in_opt]
    in_model = {id(p) for p in params}
    params += [p for g in optimizer.param_groups for p in g["params"] if id(p) not in in_model]
    names = {id(p): k for k, p in model.named_parameters()}

    # ---------------------------------------------------------------- resume or start
    run_dir = Path(run_dir) if run_dir is not None else None
    resumed_from, history, evals, step = None, [], [], 0
    if run_dir is not None and not resume:
        if main and run_dir.is_dir():
            for p in list_checkpoints(run_dir):
                shutil.rmtree(p)
            (run_dir / "latest").unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    if run_dir is not None and resume:
        resumed_from = latest_checkpoint(run_dir)
    if resumed_from is not None:
        meta = load_checkpoint(resumed_from, model, optimizer, scheduler, params_hash=run_hash)
        step, extra = int(meta["step"]), meta["extra"]
        history, evals = list(extra.get("history", [])), list(extra.get("evals", []))
        if len(history) != step:
            raise CheckpointError(f"checkpoint {resumed_from}: history has {len(history)} steps, meta says {step}")
        rngs = meta["rng"]
        if rank < len(rngs):
            set_rng_state(rngs[rank])
        else:  # resumed with more processes than were saved: a fresh stream for this one
            seed_everything(derive_seed(cfg.seed, "rank", rank, "step", step) % 2**32)
        log.info("resumed from %s at step %d/%d", resumed_from, step, total)
    else:
        # Process 0 takes the seed itself, so a one-process run is seeded like a plain script.
        seed_everything(cfg.seed if rank == 0 else derive_seed(cfg.seed, "rank", rank) % 2**32)
    last_ckpt = resumed_from
    opt = accelerator.prepare_optimizer(optimizer)  # fp16 scaler + device placement of the state

    # ---------------------------------------------------------------- data stream
    perm_cache: dict[int, torch.Tensor] = {}

    def batch_at(micro: int):
        epoch, b = divmod(micro, bpe)
        if epoch not in perm_cache:
            perm_cache.clear()
            perm_cache[epoch] = torch.randperm(n, generator=data_generator(cfg.seed, epoch))
        idx = perm_cache[epoch][b * cfg.batch_size:(b + 1) * cfg.batch_size][rank * per_rank:(rank + 1) * per_rank]
        batch = collate([train_data[int(i)] for i in idx])
        if device.type != "cpu":
            from accelerate.utils import send_to_device

            batch = send_to_device(batch, device)
        return epoch, b, batch

    def run_eval(at: int) -> None:
        was = model.training
        model.eval()
        with torch.no_grad():
            metrics = eval_fn(model)
        model.train(was)
        if not isinstance(metrics, dict):
            raise TypeError(f"eval_fn must return a dict of metrics, got {type(metrics).__name__}")
        rec = {"step": at}
        for k, v in metrics.items():
            v = float(v.item() if isinstance(v, torch.Tensor) else v)
            if not math.isfinite(v):
                raise NonFiniteMetricError(f"eval metric {k!r} is {v} at step {at}; last good checkpoint: "
                                           f"{last_ckpt if last_ckpt is not None else 'none'}")
            rec[str(k)] = v
        evals.append(rec)

    def save(at: int) -> Path:
        rngs = _gather_json(rng_state(), world)
        micro = at * cfg.grad_accum
        extra = {"data": {"micro_batches": micro, "epoch": micro // bpe, "batch": micro % bpe,
                          "batches_per_epoch": bpe},
                 "total_steps": total, "world_size": world, "config": dataclasses.asdict(cfg),
                 "caller_params_hash": params_hash, "history": history, "evals": evals}
        if main:
            save_checkpoint(run_dir, at, model, optimizer, scheduler, extra=extra, params_hash=run_hash,
                            keep=cfg.keep, trainable_only=cfg.ckpt_trainable_only, rng_states=rngs)
        accelerator.wait_for_everyone()
        return run_dir / checkpoint_name(at)

    # ---------------------------------------------------------------- steps
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not _show_progress(cfg, main),
               dynamic_ncols=True, leave=False)
    try:
        while step < stop:
            k = step + 1
            losses, positions, extras_sum, bad = [], [], {}, None
            for j in range(cfg.grad_accum):
                epoch, b, batch = batch_at(step * cfg.grad_accum + j)
                positions.append((epoch, b))
                with accelerator.autocast():
                    loss, extras = _split_loss(loss_fn(model, batch))
                value = loss.detach().float()
                if bool(torch.isfinite(value)):  # a non-finite one stops the run below, on every process
                    if not loss.requires_grad:
                        raise TypeError("loss_fn returned a loss that does not require grad (computed under "
                                        "no_grad, or from frozen parameters only)")
                    accelerator.backward(loss / cfg.grad_accum)
                losses.append(value.cpu())
                for key, v in extras.items():
                    extras_sum[key] = extras_sum.get(key, 0.0) + v.cpu()
            keys = sorted(extras_sum)
            stats = torch.stack(losses + [extras_sum[key] / cfg.grad_accum for key in keys]).double()
            if world > 1:
                _all_reduce_grads(params, world)
                import torch.distributed as dist

                dist.all_reduce(stats)  # NaN on any process -> NaN everywhere, all stop together
                stats /= world
            values = stats.tolist()
            for j, v in enumerate(values[: cfg.grad_accum]):
                if not math.isfinite(v):
                    raise NonFiniteLossError("loss", v, k, *positions[j], last_ckpt)
            for key, v in zip(keys, values[cfg.grad_accum:]):
                if not math.isfinite(v):
                    raise NonFiniteLossError(f"logged value {key!r}", v, k, *positions[0], last_ckpt)

            if cfg.max_grad_norm is not None:
                gnorm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            else:
                accelerator.unscale_gradients()
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            gnorm = float(gnorm)
            if not math.isfinite(gnorm) and accelerator.mixed_precision != "fp16":
                culprits = [names.get(id(p), "?") for p in params
                            if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                raise NonFiniteLossError("gradient norm", gnorm, k, *positions[0], last_ckpt,
                                         detail=f"; parameters with non-finite gradients: {', '.join(culprits[:5])}")
            lr = scheduler.get_last_lr()[0]
            opt.step()
            if not opt.step_was_skipped:
                scheduler.step()
            opt.zero_grad(set_to_none=True)
            step = k

            rec = {"step": k, "loss": sum(values[: cfg.grad_accum]) / cfg.grad_accum, "lr": lr, "grad_norm": gnorm}
            rec.update(zip(keys, values[cfg.grad_accum:]))
            history.append(rec)
            if main and (k % cfg.log_every == 0 or k == total):
                log.info("step %d/%d loss %.5g lr %.3g grad_norm %.3g", k, total, rec["loss"], lr, gnorm)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4g}", refresh=False)
            if eval_fn is not None and ((cfg.eval_every and k % cfg.eval_every == 0) or k == total):
                run_eval(k)
            if run_dir is not None and ((cfg.ckpt_every and k % cfg.ckpt_every == 0) or k == stop):
                last_ckpt = save(k)
            for cb in callbacks:
                cb(k, rec)
    finally:
        bar.close()
    # Accelerate's fp16/bf16 handling does not touch a model it did not prepare; nothing to unwrap.
    return TrainResult(history=history, evals=evals, step=step, total_steps=total,
                       wall_time=time.perf_counter() - t0, checkpoint=last_ckpt, resumed_from=resumed_from)


__all__ = ["TrainConfig", "TrainResult", "fit", "NonFiniteLossError", "NonFiniteMetricError", "default_param_groups",
           "AMP_MODES", "SCHEDULES", "DEVICES"]
