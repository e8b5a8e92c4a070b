"""Crash-safe files: every write goes to a temporary sibling, is fsynced, then renamed over the target.

Only safe formats are read back: safetensors for tensors, JSON / YAML for everything else.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .files import _fsync_dir, atomic_write, atomic_write_json, atomic_write_text, link_file
from .sharded_state import flatten_optimizer, scatter, unflatten_optimizer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda p: _save_file(tensors, p, metadata))


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]]) -> None:
    """safetensors' save_file, its failed writes raised as the OSError they are: it reports a full disk as
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), which the
    callers' handling of a failed write (atomic_write, the training checkpoint) would let through as a traceback."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; a truncated or corrupt file is a UserError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable or corrupt safetensors file ({e})") from None


def publish_dir(final: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a fresh temporary sibling of `final`, then publish it under `final` in one rename
    (replace_dir). On any failure the temporary directory goes and the error propagates: `final` is as it was."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Publish a fully written directory under its final name (the old one, if any, is removed after)."""
    _fsync_dir(tmp_dir)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)


# ---- training checkpoints: weights + optimizer + scheduler + scaler + RNG + data position ----------------------
STATE_NAME = "training_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
STATE_KEYS = ("progress", "optimizer_param_groups", "scheduler", "python_random")  # what read_training_checkpoint reads


def rng_states(accelerator) -> dict[str, torch.Tensor]:
    """Every rank's torch (and CUDA) RNG state, keyed "torch.rank<r>" / "cuda.rank<r>": a collective when several
    processes run (only the main rank's dict is complete), so dropout resumes bit-exactly in each of them."""
    own = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
    if accelerator.num_processes == 1:
        return {f"{k}.rank0": v for k, v in own.items()}
    from accelerate.utils import gather_object

    return {f"{k}.rank{r}": v for r, st in enumerate(gather_object([own])) for k, v in st.items()}


def write_training_checkpoint(directory: Path, model, weights: dict, optimizer_state: Optional[dict], scheduler,
                              accelerator, progress: dict, rng: dict[str, torch.Tensor],
                              saved_in: Optional[Path] = None) -> None:
    """Everything a resumed run needs, written into the empty `directory` (publish_dir's temporary one).
    `weights` / `optimizer_state`: whole tensors from sharded_state.gather (no optimizer state: the last step of a
    run that will not be continued, train.save_final_optimizer); `rng`: from rng_states. `saved_in`: a directory
    where model.save_pretrained has just written these weights (best/ of the same step): its weights file is
    hard-linked, not written again (files are replaced, never rewritten in place, so the two stay independent;
    written where the file system has no hard links)."""
    import random

    if saved_in is None or not link_file(saved_in / WEIGHTS_NAME, directory / WEIGHTS_NAME):
        model.save_pretrained(directory, tensors=weights)
    else:  # the rest of what save_pretrained writes
        model.config.save_yaml(directory / CONFIG_NAME)
    groups = None
    if optimizer_state is not None:
        opt_tensors, groups = flatten_optimizer(optimizer_state)
        save_tensors(directory / OPTIMIZER_NAME, opt_tensors)
    save_tensors(directory / RNG_NAME, rng)
    scaler = getattr(accelerator, "scaler", None)
    state = {
        "progress": progress,
        "optimizer_param_groups": groups,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "python_random": random.getstate(),
    }
    atomic_write_json(directory / STATE_NAME, state)


def read_training_checkpoint(directory: Path, model, optimizer, scheduler, accelerator) -> dict:
    """Restore a training checkpoint into live objects (`model` as prepared: plain, DDP or FSDP; every rank reads
    the files); returns the saved progress dict."""
    import random

    state = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
    tensors, _ = load_tensors(directory / WEIGHTS_NAME)
    accelerator.unwrap_model(model).check_trainable(tensors, str(directory / WEIGHTS_NAME))
    groups = state["optimizer_param_groups"]
    scatter(model, optimizer, tensors, None if groups is None else unflatten_optimizer(
        load_tensors(directory / OPTIMIZER_NAME)[0], groups))
    sched = scheduler.state_dict()
    sched.update(state["scheduler"])
    scheduler.load_state_dict(sched)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rng, _ = load_tensors(directory / RNG_NAME)
    rank = accelerator.process_index  # a rank the saving run did not have takes rank 0's state
    mine = rank if f"torch.rank{rank}" in rng else 0
    torch.set_rng_state(rng[f"torch.rank{mine}"])
    if torch.cuda.is_available() and f"cuda.rank{mine}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.rank{mine}"])
    v, internal, gauss = state["python_random"]
    random.setstate((v, tuple(internal), gauss))
    return state["progress"]


def _verify(directory: Path) -> None:
    """Cheap integrity check: JSON parses and every safetensors file's header and size are consistent."""
    from safetensors import safe_open

    state = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{STATE_NAME} lacks {', '.join(missing)}")
    # No param groups: a last step saved without optimizer state (train.save_final_optimizer), no file to check.
    optimizer = (OPTIMIZER_NAME,) if state["optimizer_param_groups"] is not None else ()
    for name in (WEIGHTS_NAME, RNG_NAME, *optimizer):
        with safe_open(str(directory / name), framework="pt") as f:
            for k in f.keys():
                f.get_slice(k)
        load_file(str(directory / name))


def latest_training_checkpoint(root: Path, log=print) -> Optional[Path]:
    """The newest readable `step-*` checkpoint; unreadable ones are reported and skipped."""
    if not root.is_dir():
        return None
    for d in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True):
        try:
            _verify(d)
            return d
        except (OSError, ValueError, SafetensorError, KeyError) as e:
            log(f"checkpoint {d} is unreadable ({e.__class__.__name__}: {e}); falling back to the one before")
    return None


def prune_checkpoints(root: Path, keep: int, keep_every: Optional[int] = None) -> None:
    """Keep the newest `keep` step checkpoints (the one before the latest stays as a fallback), and with
    `keep_every` those of step 0 and of its multiples (learning curves). A checkpoint kept only for a curve is
    no resume point, so it drops its optimizer state (two thirds of its size under AdamW) and keeps the weights."""
    for d in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)[keep:]:
        if keep_every is None or int(d.name.removeprefix("step-")) % keep_every:
            shutil.rmtree(d, ignore_errors=True)
        else:
            (d / OPTIMIZER_NAME).unlink(missing_ok=True)
    for tmp in root.glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after `step` (by a run that died before its next checkpoint)."""
    if not path.exists():
        return
    def step_of(line: str) -> Optional[int]:
        try:
            return json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            return None  # a line cut short by a crash or a full disk: dropped

    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    kept = [ln for ln in lines if (s := step_of(ln)) is not None and s <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


# ---- resuming with another config --------------------------------------------------------------------------------
# Fields a run may change when it resumes from its output directory: they decide how long the run goes, how often it
# validates, saves and logs, how fast or where it computes - not which model is trained, on which data, with which
# optimization. Everything else must match the checkpoint's config.yaml (docs/training.md says why for each).
# train.batch_size is not compared here: restore_latest checks the global batch (batch_size x processes), which
# may be kept with another process count.
RESUME_SAFE = (
    "train.output_dir", "train.max_steps", "train.epochs", "train.save_every", "train.keep_every", "train.eval_every",
    "train.save_final_optimizer", "train.patience", "train.num_threads", "train.tensorboard", "train.skip_nonfinite",
    "train.mixed_precision", "train.feature_cache", "train.feature_cache_dir", "train.feature_dtype", "train.batch_size",
    "data.skip_bad", "small.gradient_checkpointing",
)
_UNSET = object()


def flatten_config(d: dict, prefix: str = "") -> dict[str, object]:
    """{"bridge": {"num_layers": 2}, "large": {"config": {"hidden_size": 64}}} -> {"bridge.num_layers": 2,
    "large.config.hidden_size": 64}; lists and empty mappings are values."""
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _shown(v) -> str:
    if v is _UNSET:
        return "(not set)"
    return v if isinstance(v, str) and v else json.dumps(v)


def config_changes(saved: dict, current: dict, safe: tuple = RESUME_SAFE) -> tuple[list[str], list[str]]:
    """(changes that forbid resuming, changes that are allowed), each as "key: old -> new" in the config's order."""
    a, b = flatten_config(saved), flatten_config(current)
    keys = list(b) + [k for k in a if k not in b]
    forbidden, allowed = [], []
    for k in keys:
        old, new = a.get(k, _UNSET), b.get(k, _UNSET)
        if old != new:
            is_safe = any(k == s or k.startswith(s + ".") for s in safe)
            (allowed if is_safe else forbidden).append(f"{k}: {_shown(old)} -> {_shown(new)}")
    return forbidden, allowed


def saved_config(directory: Path) -> Optional[dict]:
    """The config a checkpoint was saved with, defaults filled in for fields added since (None: no config.yaml). A
    file the current code cannot validate (a field removed since) is compared as written."""
    from .config import LLMModulesConfig, load_yaml

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return None
    raw = load_yaml(path)
    try:
        return LLMModulesConfig.from_dict(raw, where=str(path)).to_dict()
    except UserError:
        return raw
