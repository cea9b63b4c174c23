"""Checkpoint directories that a crash cannot corrupt, and loading that says what differs.

Layout of ``run_dir`` (one training run)::

    run_dir/
      ckpt-00000100/
        model.safetensors       weights (the full state dict, or trainable params + buffers)
        optimizer.safetensors   every tensor of the optimiser and scheduler state dicts
        meta.json               step, RNG states, params hash, model class / preset,
                                tensor names + shapes, the non-tensor optimiser / scheduler
                                state, sha256 + size of each file above, caller's ``extra``
      ckpt-00000200/ ...
      latest                    text file holding the name of the newest checkpoint dir

Writing (:func:`save_checkpoint`) follows the classic atomic-replace recipe: every file is
written into ``run_dir/.tmp-<name>-<random>/`` and fsynced, ``meta.json`` last; the
directory is fsynced and renamed to its final name (``rename`` is atomic on POSIX); the
``latest`` pointer is then replaced with ``os.replace`` (also atomic) -- so ``latest`` only
ever names a complete directory, and a ``SIGKILL`` at any instant leaves at worst a
``.tmp-*`` directory that readers ignore and the next save removes. Old checkpoints beyond
``keep`` are renamed to ``.tmp-*`` before they are deleted, for the same reason.

Reading (:func:`load_checkpoint`) trusts nothing: it checks each file's size (truncation)
and sha256 (corruption) against ``meta.json``, parses it with safetensors (never pickle),
compares tensor names and shapes with the model and names the missing, unexpected and
mismatched ones, and checks the preset and params hash. Every failure is a
:class:`CheckpointError` that names the file or the tensors at fault.

No pickle anywhere: tensors go through safetensors, everything else through JSON (the
optimiser's nested state dict is split into tensors + a JSON skeleton by :func:`encode_state`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .seeding import rng_state, set_rng_state

FORMAT = "vlkit-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
CKPT_RE = re.compile(r"^ckpt-(\d{8,})$")

#: Fault-injection point for the reliability tests: if set, called as ``hook(event, path)``
#: after each file is written (event = the file name), after the rename (``"renamed"``) and
#: after ``latest`` is replaced (``"latest"``). A test sets it to SIGKILL its own process
#: mid-write. Production code never sets it.
write_hook: Callable[[str, Path], None] | None = None


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, corrupt, or does not fit the model/run."""


# ============================================================================ helpers
def checkpoint_name(step: int) -> str:
    return f"ckpt-{int(step):08d}"


def hash_params(obj: Any) -> str:
    """A short, stable hash (sha256 of canonical JSON, 16 hex digits) of JSON-able ``obj``.

    Used as the "params hash" of a run: a checkpoint only resumes a run whose hash matches.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hook(event: str, path: Path) -> None:
    if write_hook is not None:
        write_hook(event, path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _preset_of(model: torch.nn.Module) -> str | None:
    p = getattr(model, "preset", None)
    return p if isinstance(p, str) and p not in ("", "?") else None


def _few(names, n: int = 5) -> str:
    names = list(names)
    more = f" ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


# ============================================================================ nested state <-> tensors + JSON
def encode_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Split a nested state dict into JSON-able data and a flat dict of tensors.

    Tensors are replaced by ``{"__tensor__": key}`` (key = their path, e.g.
    ``optimizer.state.3.exp_avg``); tuples by ``{"__tuple__": [...]}``; dicts whose keys are
    not all strings (the optimiser's ``{param_index: ...}``) by ``{"__dict__": [[k, v], ...]}``.
    Anything else that JSON cannot hold raises :class:`CheckpointError` naming its path.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        out = []
        for i, (k, v) in enumerate(obj.items()):
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise CheckpointError(f"cannot store dict key {k!r} of type {type(k).__name__} at {prefix}")
            out.append([k, encode_state(v, f"{prefix}.{k if isinstance(k, (str, int)) else i}", tensors)])
        return {"__dict__": out}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise CheckpointError(f"cannot store value of type {type(obj).__name__} at {prefix} (only tensors and JSON data)")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"tensor {key!r} is missing from {STATE_FILE}")
            return tensors[key]
        if set(obj) == {"__tuple__"}:
            return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
        if set(obj) == {"__dict__"}:
            return {k: decode_state(v, tensors) for k, v in obj["__dict__"]}
        return {k: decode_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    return obj


# ============================================================================ model tensors
def _saved_names(model: torch.nn.Module, trainable_only: bool) -> list[str]:
    """State-dict names a checkpoint of ``model`` holds (see :func:`save_checkpoint`)."""
    names = list(model.state_dict().keys())
    if not trainable_only:
        return names
    keep = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return [n for n in names if n in keep]


def _model_tensors(model: torch.nn.Module, trainable_only: bool):
    """(tensors to write, aliases {dropped name: kept name}) -- tied weights are stored once."""
    sd = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name in _saved_names(model, trainable_only):
        t = sd[name].detach()
        ptr = (t.device.type, t.untyped_storage().data_ptr())
        key = (*ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out = t.to("cpu").contiguous()
        if t.numel() > 0 and (ptr in storages or out.untyped_storage().nbytes() != out.numel() * out.element_size()):
            out = out.clone()  # partial view of a shared storage: safetensors wants it on its own
        storages.add(ptr)
        tensors[name] = out
    return tensors, aliases


# ============================================================================ saving
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    extra: dict | None = None,
    params_hash: str | None = None,
    keep: int | None = 2,
    trainable_only: bool = False,
    rng_states: list[dict] | None = None,
    preset: str | None = None,
) -> Path:
    """Write ``run_dir/ckpt-<step:08d>/`` atomically, point ``latest`` at it, prune old ones.

    ``trainable_only=False`` (default) stores the full state dict, so the checkpoint alone
    rebuilds the model. ``trainable_only=True`` stores parameters with ``requires_grad`` plus
    all persistent buffers (BatchNorm statistics change even in a frozen backbone): PETL
    methods keep a frozen backbone that the caller rebuilds identically (same preset and
    seed, or the same pre-trained files), so saving it at every checkpoint would only cost
    disk. ``rng_states`` is one :func:`~vlkit.seeding.rng_state` per process (default: this
    process's). ``extra`` must be JSON-able (``fit`` puts data position, history and config
    there). ``keep`` = how many checkpoints to keep (``None``: all). Returns the directory.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an int >= 1 or None (keep all), got {keep!r}")
    if extra is not None:
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"extra must be JSON-able without NaN/inf: {e}") from e
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = run_dir / f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    final = run_dir / name
    try:
        files: dict[str, dict] = {}
        tensors, aliases = _model_tensors(model, trainable_only)
        save_file(tensors, str(tmp / MODEL_FILE))
        _fsync_file(tmp / MODEL_FILE)
        files[MODEL_FILE] = _digest(tmp / MODEL_FILE)
        _hook(MODEL_FILE, tmp / MODEL_FILE)

        state_tensors: dict[str, torch.Tensor] = {}
        opt_struct = encode_state(optimizer.state_dict(), "optimizer", state_tensors) if optimizer is not None else None
        sch_struct = encode_state(scheduler.state_dict(), "scheduler", state_tensors) if scheduler is not None else None
        if state_tensors:
            save_file(state_tensors, str(tmp / STATE_FILE))
            _fsync_file(tmp / STATE_FILE)
            files[STATE_FILE] = _digest(tmp / STATE_FILE)
            _hook(STATE_FILE, tmp / STATE_FILE)

        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vlkit_version": __version__,
            "torch_version": torch.__version__,
            "step": step,
            "params_hash": params_hash,
            "model": {
                "class": f"{type(model).__module__}.{type(model).__qualname__}",
                "preset": preset if preset is not None else _preset_of(model),
                "trainable_only": bool(trainable_only),
                "tensors": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()},
                "aliases": aliases,
            },
            "optimizer": opt_struct,
            "scheduler": sch_struct,
            "rng": rng_states if rng_states is not None else [rng_state()],
            "files": files,
            "extra": extra or {},
        }
        _write_json(tmp / META_FILE, meta)
        _hook(META_FILE, tmp / META_FILE)
        _fsync_dir(tmp)

        old = None
        if final.exists():  # re-saving a step (e.g. after resuming from an earlier one)
            old = run_dir / f"{TMP_PREFIX}old-{name}-{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
        _hook("renamed", final)
        _write_latest(run_dir, name)
        _hook(LATEST, run_dir / LATEST)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(run_dir, keep, protect=name)
    return final


def _write_latest(run_dir: Path, name: str) -> None:
    tmp = run_dir / f"{TMP_PREFIX}latest-{secrets.token_hex(4)}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / LATEST)
    _fsync_dir(run_dir)


def _prune(run_dir: Path, keep: int | None, protect: str) -> None:
    """Delete checkpoints beyond the newest ``keep`` and leftovers of crashed writes."""
    for p in run_dir.glob(f"{TMP_PREFIX}*"):  # a crashed save's temp dir / pointer / deletion
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if keep is None:
        return
    for p in list_checkpoints(run_dir)[:-keep]:
        if p.name == protect:
            continue
        doomed = run_dir / f"{TMP_PREFIX}del-{p.name}-{secrets.token_hex(4)}"
        os.rename(p, doomed)  # atomic: never a half-deleted ckpt-* directory
        shutil.rmtree(doomed, ignore_errors=True)


# ============================================================================ finding
def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories of ``run_dir`` (those with ``meta.json``), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := CKPT_RE.match(p.name)) and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The directory ``run_dir/latest`` names; if that is missing or names no complete
    checkpoint, the newest complete ``ckpt-*`` directory; ``None`` if there is none.
    ``.tmp-*`` directories (writes that never finished) are never returned."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if CKPT_RE.match(name) and (run_dir / name / META_FILE).is_file():
            return run_dir / name
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if CKPT_RE.match(path.name):
        raise CheckpointError(f"{path / META_FILE}: missing -- {path} is not a complete checkpoint")
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no checkpoint in {path} (no 'latest' pointer and no complete ckpt-* directory)")
    return found


def read_meta(ckpt: str | os.PathLike) -> dict:
    """Parse and sanity-check ``meta.json`` of a checkpoint directory (or a run directory)."""
    ckpt = _resolve(ckpt)
    path = ckpt / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable or corrupt ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a vlkit checkpoint (format {fmt!r}, expected {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {meta.get('format_version')!r}; this vlkit reads {FORMAT_VERSION}")
    for key in ("step", "model", "files", "rng"):
        if key not in meta:
            raise CheckpointError(f"{path}: field {key!r} missing")
    meta["path"] = str(ckpt)
    return meta


def verify_files(ckpt: str | os.PathLike, meta: dict | None = None) -> None:
    """Check every file listed in ``meta.json`` exists with the recorded size and sha256."""
    ckpt = _resolve(ckpt)
    meta = meta if meta is not None else read_meta(ckpt)
    for fname, want in meta["files"].items():
        path = ckpt / fname
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: truncated or altered ({size} bytes, expected {want['bytes']})")
        if _digest(path)["sha256"] != want["sha256"]:
            raise CheckpointError(f"{path}: corrupted (sha256 differs from the one recorded in meta.json)")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e


# ============================================================================ loading
def check_model_compatible(meta: dict, model: torch.nn.Module, *, strict: bool = True, file_shapes=None) -> None:
    """Raise :class:`CheckpointError` listing missing / unexpected / shape-mismatched tensors.

    ``strict=False`` tolerates missing and unexpected names (like ``load_state_dict``), never
    shape mismatches.
    """
    m = meta["model"]
    shapes = dict(file_shapes) if file_shapes is not None else {k: tuple(v[0]) for k, v in m["tensors"].items()}
    for alias, target in m.get("aliases", {}).items():
        if target in shapes:
            shapes[alias] = shapes[target]
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _saved_names(model, bool(m.get("trainable_only")))
    missing = [n for n in expected if n not in shapes]
    unexpected = [n for n in shapes if n not in model_shapes]
    mismatched = [f"{n} {list(shapes[n])} vs model {list(model_shapes[n])}" for n in shapes
                  if n in model_shapes and shapes[n] != model_shapes[n]]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing from the checkpoint: {_few(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} not in the model: {_few(unexpected)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {meta.get('path')} (model {m.get('class')}, preset {m.get('preset')!r}) does not fit "
            f"{type(model).__name__}: " + "; ".join(problems))


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    strict: bool = True,
    expected_preset: str | None = None,
    params_hash: str | None = None,
    restore_rng: bool = False,
    verify: bool = True,
) -> dict:
    """Load a checkpoint directory (or a run directory's latest checkpoint) into ``model``
    (and ``optimizer`` / ``scheduler``); return its meta data (``meta["path"]`` = the dir).

    Checks, in order, each raising :class:`CheckpointError` that names what is wrong:
    ``meta.json`` readable; each file present with the recorded size and sha256
    (``verify=False`` skips the hashing for huge files); preset (``expected_preset``, or the
    model's ``preset`` attribute) and ``params_hash`` (when given) equal to the recorded ones;
    tensor names and shapes against the model (:func:`check_model_compatible`); optimiser
    state against the optimiser's parameters. Nothing is loaded unless all checks pass.
    ``restore_rng=True`` restores the first process's RNG states.
    """
    ckpt = _resolve(path)
    meta = read_meta(ckpt)
    where = f"checkpoint {ckpt}"
    saved_preset = meta["model"].get("preset")
    want_preset = expected_preset if expected_preset is not None else _preset_of(model)
    if want_preset is not None and saved_preset is not None and want_preset != saved_preset:
        raise CheckpointError(f"{where} was written for preset {saved_preset!r}, not {want_preset!r}")
    if params_hash is not None and meta.get("params_hash") != params_hash:
        raise CheckpointError(
            f"{where} was written with params hash {meta.get('params_hash')!r}, this run has {params_hash!r} "
            "(its parameters changed: use another run directory, or start over with resume=False)")
    if verify:
        verify_files(ckpt, meta)
    if MODEL_FILE not in meta["files"]:
        raise CheckpointError(f"{ckpt / META_FILE}: lists no {MODEL_FILE}")
    weights = _read_tensors(ckpt / MODEL_FILE)
    listed = meta["model"].get("tensors", {})  # report names in state-dict order, not the file's sorted order
    order = [k for k in listed if k in weights] + sorted(set(weights) - set(listed))
    check_model_compatible(meta, model, strict=strict, file_shapes={k: tuple(weights[k].shape) for k in order})

    opt_sd = sch_sd = None
    if optimizer is not None or scheduler is not None:
        state = _read_tensors(ckpt / STATE_FILE) if STATE_FILE in meta["files"] else {}
        if optimizer is not None:
            if meta.get("optimizer") is None:
                raise CheckpointError(f"{where} holds no optimizer state")
            opt_sd = decode_state(meta["optimizer"], state)
            _check_optimizer(opt_sd, optimizer, where)
        if scheduler is not None:
            if meta.get("scheduler") is None:
                raise CheckpointError(f"{where} holds no scheduler state")
            sch_sd = decode_state(meta["scheduler"], state)

    model_names = set(model.state_dict())
    sd = {k: v for k, v in weights.items() if k in model_names}
    for alias, target in meta["model"].get("aliases", {}).items():
        if alias in model_names and target in weights:
            sd[alias] = weights[target]
    model.load_state_dict(sd, strict=False)
    try:
        if optimizer is not None:
            optimizer.load_state_dict(opt_sd)
        if scheduler is not None:
            scheduler.load_state_dict(sch_sd)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{where}: optimizer/scheduler state does not fit ({e})") from e
    if restore_rng and meta["rng"]:
        set_rng_state(meta["rng"][0])
    return meta


def _check_optimizer(sd: dict, optimizer: torch.optim.Optimizer, where: str) -> None:
    groups = sd.get("param_groups", [])
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{where}: optimizer has {len(optimizer.param_groups)} param groups, "
                              f"checkpoint {len(groups)}")
    bad = []
    for gi, (saved, cur) in enumerate(zip(groups, optimizer.param_groups)):
        if len(saved["params"]) != len(cur["params"]):
            raise CheckpointError(f"{where}: optimizer param group {gi} has {len(cur['params'])} parameters, "
                                  f"checkpoint {len(saved['params'])}")
        for pid, p in zip(saved["params"], cur["params"]):
            for key, t in sd.get("state", {}).get(pid, {}).items():
                if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(p.shape):
                    bad.append(f"group {gi} param {pid} {key} {list(t.shape)} vs {list(p.shape)}")
    if bad:
        raise CheckpointError(f"{where}: optimizer state shapes differ: {_few(bad)}")


__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "read_meta", "verify_files", "check_model_compatible", "hash_params", "encode_state", "decode_state",
           "checkpoint_name"]
