"""The two baselines a practitioner would pick instead of LLM Modules, on the combined run's exact training set-up.

Both fine-tune ONE Hugging Face causal LM (its own tokenizer, embeddings and LM head) on the data, batches, steps,
seed, optimizer, schedule and prompt format that an `LLMModulesConfig` gives the combined model:
  method "lora", base "large": LoRA (peft) on the large model's attention and MLP projections, its weights frozen,
      with a rank whose trainable-parameter count is closest to a target (the combined model's count);
  method "full", base "small": every weight of a pretrained small causal LM (`small.pretrained: true`).
(The other two pairings, LoRA on the small model and full fine-tuning of the large one, work the same way.)

What is shared with train.py: data.build_datasets with the fine-tuned model's own tokenizer, LengthGroupedBatches
seeded with train.seed, the loss (cross-entropy summed over an optimizer step's labelled tokens / their count),
train.make_optimizer (AdamW), the warm-up + cosine / constant schedule, gradient clipping, validation every
train.eval_every steps and at the end, train.patience, metrics.jsonl lines and the loss plot.

Output directory: metrics.jsonl, loss.png, best/ (the lowest validation loss: config.yaml, finetune.json and the
peft adapter or the whole model with its tokenizer; replaced atomically), resume/ (every train.save_every steps and
on SIGTERM / SIGINT: the trainable weights, optimizer, schedule, RNG and data position; removed when the run ends)
and DONE (the summary, written last). An unfinished run with the same settings resumes from resume/ and ends as an
uninterrupted one would; with other settings, or without resume/, it starts over; a finished one with the same
settings is not run again. docs/baselines.md has the decisions.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import random
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import LLMModulesConfig
from .data import IGNORE_INDEX, DataBundle, LengthGroupedBatches, build_datasets, collate
from .errors import UserError
from .interrupt import Interrupted, StopRequests, signal_name
from .sharded_state import flatten_optimizer, unflatten_optimizer

METHODS = ("lora", "full")
BASES = ("large", "small")
# LoRA on the attention and MLP projections (Qwen2 / Llama / Mistral / Gemma names).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FINETUNE_NAME = "finetune.json"
DONE_NAME = "DONE"
BEST_NAME = "best"
RESUME_NAME = "resume"
# Causal LMs whose logits are exactly lm_head(last hidden state) (no soft-capping or scaling): the head then runs at
# the labelled positions only, as the combined model's does. Others run their whole forward.
HEAD_ONLY_TYPES = ("qwen2", "qwen3", "llama", "mistral", "gpt2", "gpt_neo")
# train.* fields that do not change what a baseline run computes (a finished run is not redone for them).
TRAIN_IRRELEVANT = ("output_dir", "lr_bridge", "lr_gate", "save_every", "feature_cache", "feature_dtype",
                    "feature_cache_dir", "tensorboard", "num_threads", "distill_weight", "distill_temperature",
                    "distill_weight_end", "distill_decay_from", "chunked_loss")


# ---- LoRA rank --------------------------------------------------------------------------------------------------
def _matches(name: str, targets: Sequence[str]) -> Optional[str]:
    """The target naming module `name` as peft matches a list: the whole name, or its ending after a dot."""
    for t in targets:
        if name == t or name.endswith("." + t):
            return t
    return None


def _lora_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, int]:
    """{module name: LoRA parameters per unit of rank (in + out features)} of the modules LoRA would adapt."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, module in model.named_modules():
        layer = getattr(module, "base_layer", module)  # a module that peft has already wrapped
        if _matches(name, targets) and isinstance(layer, (nn.Linear, Conv1D, nn.Embedding)):
            out[name] = int(sum(layer.weight.shape))  # A: r x in, B: out x r (Conv1D / Embedding alike)
    return out


def lora_params_per_rank(model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS) -> int:
    """Trainable LoRA parameters per unit of rank: sum of (in + out) over the adapted modules (no bias trained)."""
    return sum(_lora_modules(model, target_modules).values())


def lora_rank_for(model: nn.Module, target_params: int, target_modules: Sequence[str] = DEFAULT_TARGETS) -> int:
    """The LoRA rank (>= 1) whose trainable-parameter count on `model` is closest to `target_params`."""
    if target_params < 1:
        raise UserError(f"target_params: {target_params} must be >= 1")
    per_rank = lora_params_per_rank(model, target_modules)
    if per_rank == 0:
        raise _no_targets(model, target_modules)
    return max(1, math.floor(target_params / per_rank + 0.5))


def _no_targets(model: nn.Module, targets: Sequence[str]) -> UserError:
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    return UserError(f"LoRA: no module of this {type(model).__name__} matches target_modules "
                     f"{', '.join(targets)}; its linear layers are named {', '.join(linear) or '(none)'}")


# ---- the run ----------------------------------------------------------------------------------------------------
@dataclass
class FinetuneRun:
    cfg: LLMModulesConfig
    method: str
    base: str
    out: Path
    model: nn.Module  # what trains and is saved: the peft model (LoRA) or the Hugging Face model (full)
    hf_model: nn.Module  # the Hugging Face causal LM (for LoRA: with the adapter layers injected)
    tokenizer: object
    data: DataBundle
    batches: LengthGroupedBatches
    optimizer: torch.optim.Optimizer
    scheduler: object
    accelerator: object
    max_steps: int
    lr: float
    rank: Optional[int]
    alpha: Optional[float]
    target_modules: Optional[list]
    trainable_params: int
    log: object = print
    settings: Optional[dict] = None  # _settings: what a resumed run must share with the one that saved resume/
    step: int = 0
    windows: int = 0  # grad_accum windows consumed (a skipped non-finite step consumes one without a step)
    seconds: float = 0.0  # the time of the earlier processes of a resumed run
    started: float = field(default_factory=time.perf_counter)  # when this process began it (train_finetune sets it)
    best_val: Optional[float] = None
    best_step: Optional[int] = None
    bad_validations: int = 0
    nonfinite_skipped: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)


def _check_args(method: str, base: str, target_params, rank, lr, alpha) -> None:
    if method not in METHODS:
        raise UserError(f"method: {method!r} is not one of {', '.join(map(repr, METHODS))}")
    if base not in BASES:
        raise UserError(f"base: {base!r} is not one of {', '.join(map(repr, BASES))}")
    if method == "lora":
        if (rank is None) == (target_params is None):
            raise UserError("LoRA: give exactly one of rank (e.g. 16) or target_params (the rank is then chosen "
                            "so that the trainable-parameter count is closest to it)")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise UserError(f"rank: {rank!r} must be an integer >= 1")
    elif rank is not None or target_params is not None or alpha is not None:
        raise UserError("method full trains every weight: rank, target_params and alpha are for method lora")
    if lr is not None and not lr > 0:
        raise UserError(f"lr: {lr} must be > 0")


def load_base(cfg: LLMModulesConfig, base: str):
    """(Hugging Face causal LM with its own head, its tokenizer) for base "large" or "small"."""
    from .backbones import load_causal_lm, load_model_tokenizer, load_small_tokenizer

    if base == "small":
        if cfg.small.name_or_path is None or not cfg.small.pretrained:
            raise UserError("base: small fine-tunes a pretrained small model with its own tokenizer: set "
                            "small.name_or_path (e.g. smollm2-135m-instruct) and small.pretrained: true")
        tokenizer = load_small_tokenizer(cfg)
    else:
        tokenizer = load_model_tokenizer(cfg)
        if tokenizer is None:
            raise UserError("base: large with an inline large config needs `tokenizer` (e.g. byte-level)")
    model = load_causal_lm(getattr(cfg, base), base)
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(f"{base}: the tokenizer has {len(tokenizer)} entries but the model embeds only {rows}")
    return model, tokenizer


def apply_lora(model: nn.Module, rank: int, target_modules: Sequence[str] = DEFAULT_TARGETS,
               alpha: Optional[float] = None, log=print):
    """`model` (changed in place) wrapped as a peft model with LoRA of `rank` on `target_modules`; only the
    adapter trains. alpha defaults to 2 x rank."""
    from peft import LoraConfig, get_peft_model

    from transformers.pytorch_utils import Conv1D

    found = _lora_modules(model, target_modules)
    if not found:
        raise _no_targets(model, target_modules)
    present = sorted({_matches(n, target_modules) for n in found})
    missing = [t for t in target_modules if t not in present]
    log(f"LoRA rank {rank} on {len(found)} modules ({', '.join(present)})"
        + (f"; not in this model: {', '.join(missing)}" if missing else ""))
    conv1d = any(isinstance(m, Conv1D) for n, m in model.named_modules() if n in found)  # GPT-2's (in, out) weights
    config = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=0.0, bias="none",
                        target_modules=present, fan_in_fan_out=conv1d, task_type="CAUSAL_LM")
    with _quiet():
        return get_peft_model(model, config)


def setup_finetune(cfg: LLMModulesConfig, *, method: str, base: str, output_dir: Union[str, Path],
                   target_params: Optional[int] = None, rank: Optional[int] = None, lr: Optional[float] = None,
                   alpha: Optional[float] = None, target_modules: Optional[Sequence[str]] = None,
                   log=print) -> FinetuneRun:
    """Model, data, batches, optimizer and schedule of a baseline run (nothing trained or written yet)."""
    from accelerate import Accelerator
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    from .train import _check_writable, make_optimizer, seed_everything

    _check_args(method, base, target_params, rank, lr, alpha)
    settings = _settings(cfg, method, base, target_params, rank, lr, alpha, target_modules)
    t = cfg.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    out = Path(output_dir)
    accelerator = Accelerator(mixed_precision=t.mixed_precision)
    if accelerator.num_processes > 1:
        raise UserError("fine-tuning baselines run in one process; start them without accelerate launch / torchrun")
    _check_writable(out)
    seed_everything(t.seed)
    hf_model, tokenizer = load_base(cfg, base)
    data = build_datasets(cfg.data, tokenizer, log=log)
    targets = list(target_modules or DEFAULT_TARGETS) if method == "lora" else None
    if method == "lora":
        if rank is None:
            rank = lora_rank_for(hf_model, target_params, targets)
            log(f"LoRA rank {rank} gives {rank * lora_params_per_rank(hf_model, targets):,} trainable parameters, "
                f"the count closest to the target {target_params:,}")
        model = apply_lora(hf_model, rank, targets, alpha, log=log)
        alpha = 2 * rank if alpha is None else alpha
    else:
        model = hf_model
        model.requires_grad_(True)
        if base == "small" and cfg.small.gradient_checkpointing:
            hf_model.gradient_checkpointing_enable()
    model.to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    lr = t.lr_small if lr is None else lr
    batches = LengthGroupedBatches([len(e) for e in data.train], t.batch_size, seed=t.seed)
    steps_per_epoch = max(1, len(batches) // t.grad_accum)
    max_steps = min(t.max_steps, steps_per_epoch * t.epochs) if t.max_steps is not None else steps_per_epoch * t.epochs
    optimizer = accelerator.prepare(make_optimizer([{"params": trainable, "lr": lr,
                                                      "weight_decay": t.weight_decay, "name": method}]))
    make = get_cosine_schedule_with_warmup if t.schedule == "cosine" else get_constant_schedule_with_warmup
    kwargs = {"num_training_steps": max(1, max_steps)} if t.schedule == "cosine" else {}
    scheduler = make(optimizer, num_warmup_steps=t.warmup_steps, **kwargs)
    return FinetuneRun(cfg, method, base, out, model, hf_model, tokenizer, data, batches, optimizer, scheduler,
                       accelerator, max_steps, lr, rank, alpha, targets, n_trainable, log=log, settings=settings)


def _settings(cfg: LLMModulesConfig, method: str, base: str, target_params, rank, lr, alpha, target_modules) -> dict:
    """What makes two baseline runs the same run (compared with a finished run's DONE before anything loads)."""
    lora = method == "lora"
    train = {k: v for k, v in cfg.to_dict()["train"].items() if k not in TRAIN_IRRELEVANT}
    return json.loads(json.dumps({
        "method": method, "base": base, "target_params": target_params, "rank": rank,
        "lora_alpha": alpha, "target_modules": list(target_modules or DEFAULT_TARGETS) if lora else None,
        "lr": cfg.train.lr_small if lr is None else lr, base: cfg.to_dict()[base],
        "tokenizer": cfg.tokenizer if base == "large" else cfg.small_tokenizer,
        "data": cfg.to_dict()["data"], "train": train}))


def _config_for(cfg: LLMModulesConfig, out: Path) -> LLMModulesConfig:
    return cfg.replace(train={"output_dir": str(out)})


# ---- loss -------------------------------------------------------------------------------------------------------
def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(cross-entropy summed over the labelled next tokens, their count) of a collated batch; `model` is the
    Hugging Face causal LM (for LoRA, with its adapter layers in place). Logits are computed at labelled positions
    only where the architecture allows (HEAD_ONLY_TYPES)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if model.config.model_type in HEAD_ONLY_TYPES:
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][keep]
    n = int(keep.sum())
    return nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum"), n


def _targets(example) -> int:
    return sum(1 for x in example.labels[1:] if x != IGNORE_INDEX)


def _batch(run: FinetuneRun, examples) -> dict[str, torch.Tensor]:
    dev = run.accelerator.device
    return {k: v.to(dev) for k, v in collate(examples, run.tokenizer.pad_token_id).items()}


@torch.no_grad()
def validate(run: FinetuneRun) -> float:
    """Mean loss per labelled token over the whole held-out split (token-weighted), as train.validate."""
    val, B = run.data.val, run.cfg.train.batch_size
    if not val:
        return float("nan")
    run.model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(val), B):
            with run.accelerator.autocast():
                s, n = loss_sum(run.hf_model, _batch(run, val[start:start + B]))
            total, count = total + float(s), count + n
    finally:
        run.model.train()
    return total / count if count else float("nan")


def train_step(run: FinetuneRun, window: list[list[int]]) -> tuple[Optional[float], int]:
    """One optimizer step over `grad_accum` batches: the summed loss / the step's labelled-token count."""
    t, acc = run.cfg.train, run.accelerator
    n_step = sum(_targets(run.data.train[i]) for b in window for i in b)
    total = 0.0
    for indices in window:
        batch = _batch(run, [run.data.train[i] for i in indices])
        try:
            with acc.autocast():
                s, _ = loss_sum(run.hf_model, batch)
            acc.backward(s / max(1, n_step))
        except torch.OutOfMemoryError:
            from .train import _out_of_memory

            raise _out_of_memory(*batch["input_ids"].shape) from None
        total += float(s.detach())
    total /= max(1, n_step)
    if not math.isfinite(total):
        run.optimizer.zero_grad(set_to_none=True)
        run.nonfinite_skipped += 1
        if run.nonfinite_skipped > t.skip_nonfinite:
            raise UserError(f"non-finite training loss ({total}) at step {run.step + 1}; lower the learning rate, "
                            "or allow N such steps with train.skip_nonfinite: N")
        run.log(f"step {run.step + 1}: non-finite loss skipped ({run.nonfinite_skipped}/{t.skip_nonfinite})")
        return None, 0
    if t.max_grad_norm > 0:
        acc.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], t.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total, n_step


def _windows(run: FinetuneRun):
    """(epoch after the window, grad_accum batches) in the order train.py consumes them (a window may span an
    epoch boundary; the epoch is counted as train.py's progress counts it: the next one once an epoch is used up)."""
    window = []
    for epoch in range(run.cfg.train.epochs):
        batches = run.batches.batches(epoch)
        for index, batch in enumerate(batches):
            window.append(batch)
            if len(window) == run.cfg.train.grad_accum:
                yield (epoch + 1 if index + 1 >= len(batches) else epoch), window
                window = []


def fit(run: FinetuneRun) -> None:
    """Train for run.max_steps optimizer steps (or until train.patience validations bring no improvement),
    validating every train.eval_every steps and at the end, saving best/ at each new lowest validation loss
    (without a held-out split: the final weights) and resume/ every train.save_every steps. From a restored run
    (restore), it goes on after the saved step.

    SIGTERM / SIGINT: the optimizer step in progress finishes, resume/ is saved there and `Interrupted` is raised
    (the command line exits with 143 / 130); the same command resumes."""
    t = run.cfg.train
    if run.data.val and not run.step:
        _log_metrics(run, {"step": 0, "val_loss": validate(run)})
    run.model.train()
    tokens_seen, t0 = 0, time.perf_counter()
    bar = tqdm(total=run.max_steps, initial=run.step, desc=f"{run.method} {run.base}", dynamic_ncols=True)
    stops = StopRequests(first="finishing the optimizer step in progress, then saving resume/ (further signals are "
                               "ignored until it is written)", again="ignored until resume/ is written")
    try:
        with stops:
            for epoch, window in itertools.islice(_windows(run), run.windows, None):
                if run.step >= run.max_steps or run.stopped_early:
                    break
                loss, n_tok = train_step(run, window)
                run.windows += 1
                if loss is None:
                    continue
                run.step += 1
                tokens_seen += n_tok
                tps = tokens_seen / max(1e-9, time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
                record = {"step": run.step, "epoch": epoch, "train_loss": loss,
                          "lr": run.scheduler.get_last_lr()[0], "tokens_per_s": tps}
                if run.data.val and (run.step % t.eval_every == 0 or run.step == run.max_steps):
                    record["val_loss"] = validate(run)
                    if _improved(run, record["val_loss"]):
                        save_best(run)
                _log_metrics(run, record)
                if stops.signum or (run.step % t.save_every == 0 and run.step < run.max_steps):
                    save_resume(run)
                if stops.signum:
                    message = (f"stopped after step {run.step} ({signal_name(stops.signum)}): saved "
                               f"{run.out / RESUME_NAME}; run the same command again to resume")
                    run.log(message)
                    raise Interrupted(stops.signum, message)
    finally:
        bar.close()
    if not run.step:
        return
    if not run.data.val:  # nothing to choose by: best/ holds the final weights
        run.best_step = run.step
        save_best(run)
    elif run.history[-1].get("val_loss") is None:  # the data ran out between validations (skipped steps)
        record = {"step": run.step, "val_loss": validate(run)}
        if _improved(run, record["val_loss"]):
            save_best(run)
        _log_metrics(run, record)


def _improved(run: FinetuneRun, val: float) -> bool:
    if run.best_val is None or val < run.best_val:
        run.best_val, run.best_step, run.bad_validations = val, run.step, 0
        return True
    run.bad_validations += 1
    patience = run.cfg.train.patience
    if patience is not None and run.bad_validations >= patience:
        run.stopped_early = True
        run.log(f"early stop at step {run.step}: validation loss has not improved for {patience} validations")
    return False


def _log_metrics(run: FinetuneRun, record: dict) -> None:
    run.history.append(record)
    try:
        with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise UserError(f"cannot append to {run.out / 'metrics.jsonl'} ({e.strerror or e})") from None


# ---- checkpoints ------------------------------------------------------------------------------------------------
PROGRESS = ("step", "windows", "best_val", "best_step", "bad_validations", "nonfinite_skipped", "stopped_early")


def save_resume(run: FinetuneRun) -> None:
    """resume/: what `restore` needs to go on from this step (published whole by _write_dir: a crash leaves the
    previous resume/). The optimizer state is keyed by the trainable parameters' order, which setup_finetune
    rebuilds identically from the same settings."""
    def write(d: Path) -> None:
        ckpt.save_tensors(d / ckpt.WEIGHTS_NAME, {n: p for n, p in run.model.named_parameters() if p.requires_grad})
        opt_tensors, groups = flatten_optimizer(run.optimizer.state_dict())
        ckpt.save_tensors(d / ckpt.OPTIMIZER_NAME, opt_tensors)
        ckpt.save_tensors(d / ckpt.RNG_NAME, {"torch": torch.get_rng_state()})
        ckpt.atomic_write_json(d / ckpt.STATE_NAME, {
            "settings": run.settings, "progress": {k: getattr(run, k) for k in PROGRESS},
            "seconds": run.seconds + time.perf_counter() - run.started,
            "optimizer_param_groups": groups, "python_random": random.getstate(),
            "scheduler": {k: v for k, v in run.scheduler.state_dict().items() if k != "lr_lambdas"}})
    _write_dir(run.out / RESUME_NAME, write)


def restore(run: FinetuneRun) -> bool:
    """Put resume/ back into a freshly set-up run when it was saved with the same settings (then True); metrics
    lines after its step (a run killed before its next save) are dropped."""
    d = run.out / RESUME_NAME
    try:
        state = json.loads((d / ckpt.STATE_NAME).read_text(encoding="utf-8"))
        if state["settings"] != run.settings:
            return False
        weights, _ = ckpt.load_tensors(d / ckpt.WEIGHTS_NAME)
        opt_tensors, _ = ckpt.load_tensors(d / ckpt.OPTIMIZER_NAME)
        rng, _ = ckpt.load_tensors(d / ckpt.RNG_NAME)
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return False
    trainable = {n: p for n, p in run.model.named_parameters() if p.requires_grad}
    if weights.keys() != trainable.keys():
        return False
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(weights[n])
    optim = unflatten_optimizer(opt_tensors, state["optimizer_param_groups"])
    run.optimizer.load_state_dict({"state": {int(k): v for k, v in optim["state"].items()},
                                   "param_groups": optim["param_groups"]})
    sched = run.scheduler.state_dict()
    sched.update(state["scheduler"])
    run.scheduler.load_state_dict(sched)
    torch.set_rng_state(rng["torch"])
    v, internal, gauss = state["python_random"]
    random.setstate((v, tuple(internal), gauss))
    for k in PROGRESS:
        setattr(run, k, state["progress"][k])
    run.seconds = state["seconds"]
    metrics = run.out / "metrics.jsonl"
    ckpt.truncate_metrics(metrics, run.step)
    run.history = [json.loads(ln) for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return True


def save_best(run: FinetuneRun) -> None:
    """best/: the model (peft adapter or whole model with its tokenizer), its config and finetune.json, published
    whole by _write_dir: a crash leaves the previous best/ (or none), never a half-written one."""
    def write(d: Path) -> None:
        with _quiet():
            run.model.save_pretrained(d)  # peft: adapter_model.safetensors + adapter_config.json; full: safetensors
            if run.method == "full":
                run.tokenizer.save_pretrained(d)  # the checkpoint is a complete Hugging Face model directory
        _config_for(run.cfg, run.out).save_yaml(d / ckpt.CONFIG_NAME)
        ckpt.atomic_write_json(d / FINETUNE_NAME, {
            "method": run.method, "base": run.base, "rank": run.rank, "trainable_params": run.trainable_params,
            "lora_alpha": run.alpha, "target_modules": run.target_modules, "lr": run.lr, "step": run.step,
            "val_loss": run.best_val})
    _write_dir(run.out / BEST_NAME, write)


def _write_dir(final: Path, write) -> None:
    """checkpoint.publish_dir(final, write), a failed write (a full disk: OSError, or SafetensorError from inside
    Hugging Face's save_pretrained) a UserError naming `final`."""
    try:
        ckpt.publish_dir(final, write)
    except (OSError, SafetensorError) as e:
        raise UserError(f"could not save {final} ({getattr(e, 'strerror', None) or e}); free some space and run "
                        "again") from None


@contextlib.contextmanager
def _quiet():
    """transformers' info messages and progress bars off, and the FutureWarning peft triggers by asking
    transformers a deprecated question (is_gradient_checkpointing) when it wraps a model."""
    from transformers.utils import logging

    from .backbones import quiet_transformers

    bars = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # "Writing model shards" at every save of best/
    try:
        with quiet_transformers(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        if bars:
            logging.enable_progress_bar()


def finished(output_dir: Union[str, Path]) -> Optional[dict]:
    """The summary of a finished baseline run in `output_dir` (what train_finetune returned), else None."""
    done = Path(output_dir) / DONE_NAME
    try:
        return json.loads(done.read_text(encoding="utf-8"))["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _start_over(out: Path, log) -> None:
    names = [DONE_NAME, "metrics.jsonl", "loss.png", BEST_NAME, f".{BEST_NAME}.tmp", f"{BEST_NAME}.old",
             RESUME_NAME, f".{RESUME_NAME}.tmp", f"{RESUME_NAME}.old"]
    old = [n for n in names if (out / n).exists()]
    for n in old:
        p = out / n
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if old:
        log(f"starting over in {out}: removed the unfinished run's {', '.join(old)}")


def train_finetune(cfg: LLMModulesConfig, *, method: str, base: str, output_dir: Union[str, Path],
                   target_params: Optional[int] = None, rank: Optional[int] = None, lr: Optional[float] = None,
                   alpha: Optional[float] = None, target_modules: Optional[Sequence[str]] = None,
                   overwrite: bool = False, log=print) -> dict:
    """Fine-tune one causal LM on the training set-up of `cfg` (see the module docstring); returns
    {"steps", "best_step", "best_val", "train_seconds", "peak_memory_gib", "trainable_params", "rank"}.

    method "lora" (with exactly one of `rank` / `target_params`) or "full"; base "large" or "small"; lr defaults to
    train.lr_small. A finished run with the same settings in `output_dir` is not run again (its summary is
    returned); a finished run with other settings is an error unless `overwrite`; an unfinished one resumes from
    resume/ when its settings are the same, else starts over. `train_seconds`: the whole call (loading, data,
    training, validations, saving), summed over the processes of a resumed run."""
    t0 = time.perf_counter()
    _check_args(method, base, target_params, rank, lr, alpha)
    out = Path(output_dir)
    settings = _settings(cfg, method, base, target_params, rank, lr, alpha, target_modules)
    previous = _read_done(out)
    if previous is not None:
        if previous.get("settings") == settings:
            log(f"{out}: this baseline has finished already ({DONE_NAME}); not run again")
            return previous["summary"]
        if not overwrite:
            changed = _changed(previous.get("settings") or {}, settings)
            raise UserError(f"{out} holds a finished baseline run with other settings ({'; '.join(changed[:4])}); "
                            "choose another output_dir, or pass overwrite=True to replace it")
    run = setup_finetune(cfg, method=method, base=base, output_dir=out, target_params=target_params, rank=rank,
                         lr=lr, alpha=alpha, target_modules=target_modules, log=log)
    run.started = t0
    if restore(run):
        log(f"resumed from {out / RESUME_NAME} at step {run.step}")
    else:
        _start_over(out, log)
    log(f"fine-tuning ({method}, {base} model) {run.trainable_params:,} parameters for {run.max_steps} steps "
        f"({len(run.data.train)} train / {len(run.data.val)} val examples, lr {run.lr:g}) -> {out}")
    fit(run)
    if (out / "metrics.jsonl").exists():
        from .plots import plot_metrics

        plot_metrics({f"{method} {base}": out / "metrics.jsonl"}, out / "loss.png")
    summary = {"steps": run.step, "best_step": run.best_step, "best_val": run.best_val,
               "train_seconds": run.seconds + time.perf_counter() - t0, "peak_memory_gib": peak_memory_gib(),
               "trainable_params": run.trainable_params, "rank": run.rank}
    if run.best_val is not None:
        log(f"best validation loss {run.best_val:.4f} at step {run.best_step}")
    ckpt.atomic_write_json(out / DONE_NAME, {"summary": summary, "settings": settings})
    shutil.rmtree(out / RESUME_NAME, ignore_errors=True)  # the run is over: DONE is what a rerun finds
    return summary


def _read_done(out: Path) -> Optional[dict]:
    try:
        d = json.loads((out / DONE_NAME).read_text(encoding="utf-8"))
        return d if isinstance(d, dict) and "summary" in d else None
    except (OSError, ValueError):
        return None


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def resident_peak_gib(pid: Union[int, str] = "self") -> Optional[float]:
    """Peak resident memory of process `pid` since it started its program (Linux: VmHWM), or None where /proc
    cannot tell (another OS, a process already gone). Not ru_maxrss: a process started by another inherits the
    starter's peak in it (the kernel carries it across exec), so an arm trained from a 10 GiB experiment process
    would report at least 10 GiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    except (OSError, ValueError):
        return None
    return None if kib is None else kib / 2 ** 20


def peak_memory_gib() -> float:
    """Peak resident memory of this process so far (resident_peak_gib; ru_maxrss where /proc is missing, KiB on
    Linux and bytes on macOS); on a GPU, the peak of allocated device memory if larger."""
    rss = resident_peak_gib()
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)
    gpu = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0
    return max(rss, gpu)


# ---- loading for evaluation -------------------------------------------------------------------------------------
def _checkpoint_dir(directory: Union[str, Path]) -> Optional[Path]:
    d = Path(directory)
    for c in (d, d / BEST_NAME):
        if (c / FINETUNE_NAME).is_file():
            return c
    return None


def is_finetuned(directory: Union[str, Path]) -> bool:
    """Whether `directory` is a baseline checkpoint (finetune.json), or a baseline run's output directory whose
    best/ is one."""
    return _checkpoint_dir(directory) is not None


def load_finetuned(directory: Union[str, Path]):
    """(eval-mode AutoModelForCausalLM, tokenizer, LLMModulesConfig, max_length) of a baseline checkpoint or of a
    run's output directory (its best/), like harness.load_for_eval: LoRA adapters are merged into the base model
    (rebuilt from config.yaml); a fully fine-tuned model and its tokenizer are read from the directory."""
    from .backbones import DTYPE

    d = _checkpoint_dir(directory)
    if d is None:
        raise UserError(f"{directory}: not a fine-tuned baseline (no {FINETUNE_NAME} there or in {BEST_NAME}/)")
    try:
        meta = json.loads((d / FINETUNE_NAME).read_text(encoding="utf-8"))
        method, base = meta["method"], meta["base"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{d / FINETUNE_NAME}: unreadable ({e})") from None
    if method not in METHODS or base not in BASES:
        raise UserError(f"{d / FINETUNE_NAME}: unknown method {method!r} / base {base!r}")
    cfg = LLMModulesConfig.from_yaml(d / ckpt.CONFIG_NAME)
    if method == "lora":
        from peft import PeftModel

        hf, tokenizer = load_base(cfg, base)
        try:
            with _quiet():
                model = PeftModel.from_pretrained(hf, str(d)).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"{d}: cannot load the LoRA adapter ({str(e).splitlines()[0]})") from None
    else:
        from transformers import AutoModelForCausalLM

        from .vocab import load_tokenizer

        try:
            with _quiet():
                model = AutoModelForCausalLM.from_pretrained(str(d), dtype=DTYPE[getattr(cfg, base).dtype])
        except (OSError, ValueError) as e:
            raise UserError(f"{d}: cannot load the fine-tuned model ({str(e).splitlines()[0]})") from None
        tokenizer = load_tokenizer(str(d))
    model.eval().requires_grad_(False)
    c = model.config
    limit = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or cfg.data.max_length
    return model, tokenizer, cfg, limit
