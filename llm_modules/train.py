"""Training: setup() -> fit() -> validate(). Plain code on top of `accelerate` (devices, mixed precision, processes).

Exact resume: a checkpoint holds the trainable weights, optimizer, scheduler, scaler and RNG states and the data
position (epoch, batch within epoch), so K steps + resume + K steps == 2K steps.
Multi-process: every rank derives the same global batch (B x world) and takes its slice; the loss is a token sum
over the whole optimizer step divided by its global token count, so N ranks with batch B give the same update as
one rank with batch N x B.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .backbones import load_frozen_large
from .config import LLMModulesConfig
from .couplings import COUPLINGS
from .data import DataBundle, LengthGroupedBatches, collate, load_data
from .distill import Distill, load_teacher_head
from .errors import UserError
from . import features as features_mod
from . import sharded_state
from .interrupt import Interrupted, StopRequests, signal_name
from .model import LLMModules


@dataclass
class Progress:
    """The resumable position of a run (saved as JSON beside each checkpoint)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of `epoch` already consumed
    best_val: Optional[float] = None
    best_step: Optional[int] = None
    bad_validations: int = 0
    nonfinite_skipped: int = 0
    stopped_early: bool = False
    global_batch: int = 0  # train.batch_size x processes of the run that saved it (0: not recorded)


@dataclass
class Run:
    cfg: LLMModulesConfig
    out: Path
    accelerator: object
    model: LLMModules
    optimizer: torch.optim.Optimizer
    scheduler: object
    data: DataBundle
    batches: LengthGroupedBatches
    features: Optional[dict] = None  # split -> features.SplitFeatures when training from the feature cache
    objective: Optional[Distill] = None  # the training loss when it is not plain cross-entropy
    progress: Progress = field(default_factory=Progress)
    max_steps: int = 0
    log: object = print
    saved_step: int = -1  # step of the last checkpoint written or restored (the same on every rank)
    stops: Optional[StopRequests] = None  # SIGTERM / SIGINT recorder, set while fit() runs
    stop_signal: int = 0  # the signal every rank agreed to stop on (0: none)

    @property
    def unwrapped(self) -> LLMModules:
        return self.accelerator.unwrap_model(self.model)


# ---- setup ----------------------------------------------------------------------------------------------------
def setup(cfg: LLMModulesConfig, *, resume: bool = True, log=print, model: Optional[LLMModules] = None) -> Run:
    from accelerate import Accelerator

    t = cfg.train
    if t.distill_weight > 0 and (t.feature_cache != "auto" or COUPLINGS[cfg.coupling].memory):
        raise UserError("train.distill_weight: distillation reads the large model's states of the whole sequence "
                        "from the feature cache: set train.feature_cache: auto (coupling: none or stream)")
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    out = Path(t.output_dir)
    accelerator = Accelerator(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum,
                              log_with="tensorboard" if t.tensorboard else None, project_dir=str(out))
    if t.small_from_step and accelerator.num_processes > 1:
        raise UserError(f"train.small_from_step: {t.small_from_step} needs one process: DDP and FSDP fix what trains "
                        f"when they wrap the model, and this run has {accelerator.num_processes}; set it to 0")
    if not accelerator.is_main_process:
        log = lambda *a, **k: None  # noqa: E731  (one rank speaks)
    _check_writable(out)
    seed_everything(t.seed)
    data, tokenizer = (load_data(cfg, model.large_tokenizer, model.tokenizer, log=log) if model is not None
                       else load_data(cfg, log=log))
    # The main process fills a missing feature cache while the others wait; they then find it complete and never
    # load the large model (accelerate's collective timeout bounds the wait: build big caches with cache-features).
    with accelerator.main_process_first():
        model, features = build_model_and_features(cfg, data, tokenizer, model, log)
    if cfg.bridge.init == "large" and not (resume and ckpt.latest_training_checkpoint(out / "checkpoints",
                                                                                      log=lambda *a: None)):
        from .warm_start import warm_start_run  # a resumed run restores its trained weights instead

        warm_start_run(model, cfg, data.train, features["train"] if features else None, log=log)
    if data.skipped:
        ckpt.atomic_write_text(out / "skipped_records.jsonl",
                               "".join(json.dumps(list(s)) + "\n" for s in data.skipped))
        log(f"skipped {len(data.skipped)} bad records, listed in {out / 'skipped_records.jsonl'}")
    global_batch = t.batch_size * accelerator.num_processes
    batches = LengthGroupedBatches([len(e) for e in data.train], global_batch, seed=t.seed)
    steps_per_epoch = max(1, len(batches) // t.grad_accum)
    max_steps = min(t.max_steps, steps_per_epoch * t.epochs) if t.max_steps is not None else steps_per_epoch * t.epochs
    optimizer = make_optimizer(model.param_groups(t.lr_bridge, t.lr_small, t.weight_decay, t.lr_head, t.lr_gate))
    scheduler = make_scheduler(optimizer, t, max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = Run(cfg, out, accelerator, model, optimizer, scheduler, data, batches, features, max_steps=max_steps,
              log=log)
    run.progress.global_batch = global_batch
    if t.distill_weight > 0:
        run.objective = Distill(load_teacher_head(cfg).to(accelerator.device), t.distill_weight, t.distill_temperature,
                                t.distill_weight_end, t.distill_decay_from, max_steps)
    if t.tensorboard:
        accelerator.init_trackers("llm-modules")
    if resume:
        restore_latest(run)
    elif accelerator.is_main_process:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    return run


def make_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW, fused where torch has a fused kernel for the device (on these CPUs the step over a 150k-token head
    takes about 7x less time than the default for-loop implementation)."""
    groups = [g for g in groups if g["params"]]  # the small-alone baseline has no bridge group
    try:
        return torch.optim.AdamW(groups, fused=True)
    except (RuntimeError, TypeError):  # a device without a fused kernel
        return torch.optim.AdamW(groups)


def make_scheduler(optimizer: torch.optim.Optimizer, t, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' warm-up + cosine (or constant) schedule; with train.small_from_step, the small model's group
    at 0 until that step, then on a warm-up and schedule of its own over the steps left (the second stage)."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    make = get_cosine_schedule_with_warmup if t.schedule == "cosine" else get_constant_schedule_with_warmup

    def factor(steps: int):  # the schedule's learning-rate factor by step, over `steps` steps
        kwargs = {"num_training_steps": max(1, steps)} if t.schedule == "cosine" else {}
        return make(torch.optim.SGD([torch.zeros(1)], lr=1.0), num_warmup_steps=t.warmup_steps, **kwargs).lr_lambdas[0]

    whole = factor(max_steps)
    if not t.small_from_step:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, whole)
    start, second = t.small_from_step, factor(max_steps - t.small_from_step)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [
        (lambda step: second(step - start) if step >= start else 0.0) if g["name"] == "small" else whole
        for g in optimizer.param_groups])


def _small_trains(run: Run) -> None:
    """train.small_from_step: the small model's group takes no gradient before that step (the bridge's gradient
    norm is then its own, as when the small model is frozen) and from it on trains."""
    trains = run.progress.step >= run.cfg.train.small_from_step
    for g in run.optimizer.param_groups:
        if g["name"] == "small":
            for q in g["params"]:
                q.requires_grad_(trains)


def build_model_and_features(cfg, data, tokenizer, model, log):
    """The model, and with train.feature_cache: auto the large model's states read from disk: a missing cache is
    filled once by the frozen large backbone, which is then released (the model is built without it). No cache
    when nothing reads those states (the small model alone, without distillation) or with feature_cache: off."""
    reads_states = COUPLINGS[cfg.coupling].reads_large or cfg.train.distill_weight > 0
    if cfg.train.feature_cache != "auto" or not reads_states:
        return model or LLMModules.from_config(cfg, tokenizer=tokenizer), None
    found = features_mod.available(cfg, data)
    if found is None:
        large = model.large if model is not None and model.large is not None else load_frozen_large(cfg.large)
        found = features_mod.prepare(large, cfg, data, log=log)
        del large
    else:
        log("feature cache complete: the large model is not loaded")
    return model or LLMModules.from_config(cfg, tokenizer=tokenizer, load_large=False), found


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: all ranks probe the same directory at once
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"output directory {out} is not writable ({e.strerror}); choose another with --output-dir")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ---- the loop -------------------------------------------------------------------------------------------------
def micro_batches(run: Run) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, index of the global batch in its epoch, this rank's example indices), from the saved position."""
    epoch, start = run.progress.epoch, run.progress.batch_in_epoch
    while epoch < run.cfg.train.epochs:
        for i, global_batch in enumerate(run.batches.iter_from(epoch, start), start=start):
            yield epoch, i, global_batch
        epoch, start = epoch + 1, 0


def fit(run: Run, stop_at: Optional[int] = None) -> Progress:
    """Train until max_steps (or early stopping); `stop_at` ends the process-side loop sooner, as an interruption
    would, leaving a checkpoint at that step (used to test exact resume).

    SIGTERM / SIGINT while this runs: the optimizer step in progress finishes, every rank agrees to stop after it,
    a checkpoint of that step is saved (a further signal is ignored until the save is done), and `Interrupted` is
    raised (the CLI exits with 143 / 130); the same call again resumes as if nothing had happened. The handlers
    are installed for this function only; the previous ones come back when it returns."""
    acc, p = run.accelerator, run.progress
    stop_at = run.max_steps if stop_at is None else min(stop_at, run.max_steps)
    stops = StopRequests(first="finishing the optimizer step in progress, then saving a checkpoint (further "
                               "signals are ignored until it is written)",
                         again="ignored until the checkpoint is written",
                         announce=acc.is_main_process)
    run.stops, run.stop_signal = stops, 0
    if run.saved_step < 0 and p.step == 0:  # a run that starts over (--no-resume, or nothing readable to resume)
        _clear_previous_run(run)
    try:
        with stops:
            bar = tqdm(total=run.max_steps, initial=p.step, desc="train", disable=not acc.is_main_process,
                       dynamic_ncols=True)
            try:  # the bar is closed even when a step fails, so the error is printed on a line of its own
                _steps(run, stop_at, bar)
            finally:
                bar.close()
            if not run.stop_signal:  # a signal during the last step or its checkpoint
                run.stop_signal = _stop_requested(run)
            if p.step and p.step != run.saved_step:  # not a file check: other ranks must not race the main one's write
                save_checkpoint(run, best=False)
            plot_losses(run)  # before the barrier: the ranks leave together (torchrun stops the others when one exits)
            # A barrier before the process group goes: its worker threads must be done with the last object
            # broadcast, whose Python-owned tensors they free under the GIL, or freeing the DDP model can deadlock
            # (seen with gloo: the main thread joins a worker that waits for the GIL the main thread holds).
            acc.wait_for_everyone()
            acc.end_training()
    finally:
        run.stops = None
    signum = run.stop_signal or stops.signum  # the latter: a signal after the last agreement, nothing left to do
    if signum:
        message = _stopped_message(run, signum)
        run.log(message)
        raise Interrupted(signum, message)
    return p


def _clear_previous_run(run: Run) -> None:
    """Remove the checkpoints and best/ of an earlier run in the output directory: kept, its later steps would
    outrank this run's checkpoints (pruning keeps the highest steps) and the next resume would continue it."""
    root, best = run.out / "checkpoints", run.out / "best"
    old = sorted(d.name for d in root.glob("step-*")) if root.is_dir() else []
    if not run.accelerator.is_main_process or not (old or best.exists()):
        return
    for d in [*root.glob("step-*"), *root.glob(".step-*.tmp"), best]:
        shutil.rmtree(d, ignore_errors=True)
    run.log(f"starting over in {run.out}: removed the earlier run's " + (f"checkpoints ({', '.join(old)}) and "
                                                                         if old else "") + "best/")


def _stop_requested(run: Run) -> int:
    """The signal to stop on, the same on every rank (0: carry on). Called at the same points of the loop by every
    rank; with several processes it is a collective (the largest signal number any rank received), made only when
    the handlers are installed (one process: an attribute read)."""
    stops = run.stops
    if stops is None or not stops.installed:
        return 0
    acc = run.accelerator
    if acc.num_processes == 1:
        return stops.signum or 0
    return int(acc.gather(torch.tensor([stops.signum or 0], device=acc.device)).max())


def _stopped_message(run: Run, signum: int) -> str:
    p, name = run.progress, signal_name(signum)
    if p.step == 0:
        return f"stopped by {name} before the first optimizer step: nothing to save"
    where = run.out / "checkpoints" / f"step-{p.step:08d}"
    if p.step >= run.max_steps or p.stopped_early:
        return f"stopped by {name}: training had finished (step {p.step}); its last checkpoint is {where}"
    return (f"stopped by {name} after step {p.step} of {run.max_steps}: checkpoint saved in {where}. Run the same "
            "command again (without --no-resume) to resume from it; the run then ends as if never interrupted")


def _steps(run: Run, stop_at: int, bar) -> None:
    t, p = run.cfg.train, run.progress
    pad = run.unwrapped.tokenizer.pad_token_id
    window: list[tuple[list[int], int]] = []  # the micro-batches of one optimizer step
    tokens_seen, t0 = 0, time.perf_counter()
    if p.step == 0 and run.data.val:
        log_metrics(run, {"step": 0, "val_loss": validate(run)})  # where training starts from
    if p.step == 0 and t.keep_every and run.saved_step != 0:
        save_checkpoint(run, best=False)  # the start of a learning curve
    run.model.train()
    for epoch, index, global_batch in micro_batches(run):
        if p.step >= stop_at or p.stopped_early:
            break
        window.append((global_batch, epoch))
        if len(window) < t.grad_accum:
            continue
        if t.small_from_step:
            _small_trains(run)
        loss, n_tok = train_step(run, [b for b, _ in window], pad)
        window = []
        p.epoch, p.batch_in_epoch = (epoch, index + 1)
        if p.batch_in_epoch >= len(run.batches):
            p.epoch, p.batch_in_epoch = epoch + 1, 0
        if loss is None:
            run.stop_signal = _stop_requested(run)
            if run.stop_signal:
                break  # fit() saves
            continue
        p.step += 1
        tokens_seen += n_tok
        tps = tokens_seen / max(1e-9, time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
        record = {"step": p.step, "epoch": p.epoch, "train_loss": loss, "lr": run.scheduler.get_last_lr()[0],
                  "tokens_per_s": tps}
        if run.objective:
            record["distill_weight"] = run.objective.weight_at(p.step - 1)  # the weight of the step just taken
        if p.step % t.eval_every == 0 or p.step == run.max_steps:
            record["val_loss"] = validate(run)
            _early_stopping(run, record["val_loss"])
        log_metrics(run, record)
        run.stop_signal = _stop_requested(run)  # SIGTERM / SIGINT: save this step and stop
        if (p.step % t.save_every == 0 or p.step in (run.max_steps, stop_at) or p.stopped_early
                or run.stop_signal):
            save_checkpoint(run, best=record.get("val_loss") is not None and p.best_step == p.step)
        if run.stop_signal:
            break


def train_step(run: Run, global_batches: list[list[int]], pad: int) -> tuple[Optional[float], int]:
    """One optimizer step over `grad_accum` global batches; returns (mean loss per target token, tokens) or
    (None, 0) when a non-finite loss was skipped."""
    t, acc = run.cfg.train, run.accelerator
    rank, B, world = acc.process_index, t.batch_size, acc.num_processes
    n_step = sum(_targets(run.data.train[i]) for g in global_batches for i in g)  # whole step, all ranks
    total = 0.0
    for indices in global_batches:
        mine = indices[rank * B:(rank + 1) * B]
        # A short last batch may leave this rank nothing; it still joins the backward (DDP) with zero weight.
        weight = 1.0 if mine else 0.0
        with acc.accumulate(run.model):
            loss_sum = _loss_sum(run, "train", mine or indices[:1], pad, training=True) * weight
            # accelerate divides by grad_accum and DDP averages over ranks: undo both to get sum / n_step.
            try:
                acc.backward(loss_sum / max(1, n_step) * world * t.grad_accum)
            except torch.OutOfMemoryError:
                lengths = [len(run.data.train[i]) for i in mine or indices[:1]]
                raise _out_of_memory(len(lengths), max(lengths)) from None
            total += float(loss_sum.detach())
            if acc.sync_gradients:
                total = float(acc.reduce(torch.tensor(total, device=acc.device), reduction="sum")) / max(1, n_step)
                if not math.isfinite(total):
                    run.optimizer.zero_grad(set_to_none=True)
                    _nonfinite(run, total)
                    return None, 0
                if t.max_grad_norm > 0:
                    acc.clip_grad_norm_(run.model.parameters(), t.max_grad_norm)  # after unscaling (fp16)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
    return total, n_step


def _targets(example) -> int:
    return sum(1 for x in example.labels[1:] if x != -100)


def _loss_sum(run: Run, split: str, indices: list[int], pad: int, training: bool = False) -> torch.Tensor:
    """Summed next-token loss of examples `indices` of `split` (source states from the cache when there is one);
    training=True applies the run's objective (distillation mixes in the KL to the teacher; validation loss stays
    plain cross-entropy, comparable across arms)."""
    dev = run.accelerator.device
    batch = {k: v.to(dev) for k, v in collate([getattr(run.data, split)[i] for i in indices], pad).items()}
    memory = {k: batch[k] for k in ("memory_ids", "memory_mask") if k in batch}
    source = None
    if run.features is not None:  # states of the whole sequence (stream) or of the prompt memory (prompt)
        length = (batch["memory_ids"] if memory else batch["input_ids"]).shape[1]
        source = run.features[split].batch(indices, length).to(dev)
    try:
        out = run.model(batch["input_ids"], batch["attention_mask"], batch["labels"],
                        source_states=source if COUPLINGS[run.cfg.coupling].reads_large else None, return_logits=False,
                        chunked_loss=run.cfg.train.chunked_loss, **memory)
        if training and run.objective:
            return run.objective(out, source, batch["labels"], run.progress.step)
        return out.loss_sum
    except torch.OutOfMemoryError:
        raise _out_of_memory(*batch["input_ids"].shape) from None


def _out_of_memory(B: int, T: int) -> UserError:
    return UserError(f"out of memory on a batch of {B} sequences of {T} tokens; lower train.batch_size, "
                     "data.max_length, or enable small.gradient_checkpointing")


def _nonfinite(run: Run, loss: float) -> None:
    p = run.progress
    p.nonfinite_skipped += 1
    if p.nonfinite_skipped > run.cfg.train.skip_nonfinite:
        raise UserError(f"non-finite training loss ({loss}) at step {p.step + 1}; nothing was saved over the last "
                        f"good checkpoint. Lower the learning rate, or allow N such steps with --skip-nonfinite N")
    run.log(f"step {p.step + 1}: non-finite loss skipped ({p.nonfinite_skipped}/{run.cfg.train.skip_nonfinite})")


@torch.no_grad()
def validate(run: Run) -> float:
    """Mean loss per target token over the whole held-out set (token-weighted, summed across ranks)."""
    acc, B = run.accelerator, run.cfg.train.batch_size
    pad = run.unwrapped.tokenizer.pad_token_id
    run.model.eval()
    total, count = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
    val, rank = run.data.val, acc.process_index
    # The same number of forward passes on every rank: a wrapped model's forward can hold a collective (DDP's buffer
    # broadcast, FSDP's all-gather), so a rank whose share has run out repeats example 0 with weight 0.
    for start in range(0, len(val), B * acc.num_processes):
        indices = list(range(start + rank * B, min(start + (rank + 1) * B, len(val))))
        loss_sum = _loss_sum(run, "val", indices or [0], pad).float()
        if indices:
            total += loss_sum
            count += sum(_targets(val[i]) for i in indices)
    run.model.train()
    total, count = acc.reduce(total, reduction="sum"), acc.reduce(count, reduction="sum")
    return float(total / count) if count else float("nan")


def _early_stopping(run: Run, val: float) -> None:
    p, patience = run.progress, run.cfg.train.patience
    if p.best_val is None or val < p.best_val:
        p.best_val, p.best_step, p.bad_validations = val, p.step, 0
    else:
        p.bad_validations += 1
        if patience is not None and p.bad_validations >= patience:
            p.stopped_early = True
            run.log(f"early stop at step {p.step}: validation loss has not improved for {patience} validations")


# ---- checkpoints ----------------------------------------------------------------------------------------------
def save_checkpoint(run: Run, best: bool) -> None:
    """Every rank joins (gathering sharded weights and optimizer state is a collective); the main rank writes; a
    failed write stops every rank with the same cause."""
    acc, p = run.accelerator, run.progress
    acc.wait_for_everyone()
    run.saved_step = p.step
    trainable = {n for n, _ in run.unwrapped.trainable_named_parameters()}
    last = p.step >= run.max_steps or p.stopped_early
    weights, optimizer_state = sharded_state.gather(
        run.model, run.optimizer if run.cfg.train.save_final_optimizer or not last else None, trainable)
    rng = ckpt.rng_states(acc)
    error = _write_checkpoint(run, best, weights, optimizer_state, rng) if acc.is_main_process else None
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
        if error and not acc.is_main_process:  # the main rank says why; the others only stop
            raise UserError(f"process {acc.process_index}: stopping, the main process could not save the checkpoint")
    if error:
        raise UserError(error)


def _write_checkpoint(run: Run, best: bool, weights: dict, optimizer_state: dict, rng: dict) -> Optional[str]:
    """Write and publish the step's checkpoint (and best/); returns why it could not be written, or None."""
    root = run.out / "checkpoints"
    try:
        if best:  # before the step is published: a run killed in between redoes the step and writes best/ again
            run.unwrapped.save_pretrained(run.out / "best", tensors=weights)
            for stale in (run.out / "best").glob(".*.tmp"):  # a file being written when such a run was killed
                stale.unlink(missing_ok=True)
        ckpt.publish_dir(root / f"step-{run.progress.step:08d}", lambda d: ckpt.write_training_checkpoint(
            d, run.unwrapped, weights, optimizer_state, run.scheduler, run.accelerator, run.progress.__dict__, rng,
            saved_in=run.out / "best" if best else None))
    except (OSError, UserError) as e:  # a full disk, a vanished directory ...
        cause = e.__context__ if isinstance(e, UserError) else e  # atomic_write's UserError wraps the OSError
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(e)
        intact = ckpt.latest_training_checkpoint(root, log=lambda *a: None)
        return (f"could not save the checkpoint of step {run.progress.step} in {root} ({reason}); "
                + (f"{intact.name} is intact: free some space and run the same command again to resume from it"
                   if intact else "there is no earlier checkpoint"))
    ckpt.prune_checkpoints(root, keep=2, keep_every=run.cfg.train.keep_every)
    return None


def restore_latest(run: Run) -> None:
    found = ckpt.latest_training_checkpoint(run.out / "checkpoints", log=run.log)
    if found is None:
        if run.accelerator.is_main_process:  # lines of a run killed before its first checkpoint: it starts over
            (run.out / "metrics.jsonl").unlink(missing_ok=True)
        return
    _check_resumable_config(run, found)
    state = ckpt.read_training_checkpoint(found, run.model, run.optimizer, run.scheduler, run.accelerator)
    now = run.progress.global_batch
    run.progress = p = Progress(**state)
    if not (found / ckpt.OPTIMIZER_NAME).is_file() and p.step < run.max_steps and not p.stopped_early:
        raise UserError(f"{found} is the last step of a finished run saved without optimizer state "
                        f"(train.save_final_optimizer: false): it cannot be continued to step {run.max_steps}. Keep "
                        f"train.max_steps at {p.step}, or train into another --output-dir")
    if p.global_batch not in (0, now):
        raise UserError(f"{found} was saved by a run with a global batch of {p.global_batch} examples "
                        f"(train.batch_size x processes); this one has {now}, which would reinterpret the saved data "
                        f"position. Keep train.batch_size x processes = {p.global_batch}, or start over "
                        f"in another --output-dir")
    p.global_batch = now
    run.saved_step = p.step
    ckpt.truncate_metrics(run.out / "metrics.jsonl", p.step)
    run.log(f"resumed from {found} (step {p.step}, epoch {p.epoch})")


def _check_resumable_config(run: Run, found: Path) -> None:
    """Refuse to resume a checkpoint made with another model, data or optimization config, naming what changed;
    changes in ckpt.RESUME_SAFE (length of the run, logging, saving, compute) are allowed and logged."""
    saved = ckpt.saved_config(found)
    if saved is None:
        return
    # The model's config: what this run's checkpoints will hold (the run's config with derived fields such as
    # vocab_size filled in, as in the saved one).
    forbidden, allowed = ckpt.config_changes(saved, run.unwrapped.config.to_dict())
    if forbidden:
        changed = "\n  ".join(forbidden)
        raise UserError(f"{run.out} holds a run made with another config; its checkpoint {found.name} differs from "
                        f"this one in:\n  {changed}\nA run resumes only with the model, data and optimization it "
                        "started with. Start over with --no-resume (which deletes that run's checkpoints), or train "
                        "into another --output-dir. Settings that may change on resume (train.max_steps, "
                        "train.save_every, ...) are listed in docs/training.md")
    allowed = [c for c in allowed if not c.startswith("train.output_dir:")]
    if allowed:
        horizon = run.cfg.train.schedule == "cosine" and any(c.startswith(("train.max_steps:", "train.epochs:"))
                                                             for c in allowed)
        run.log("resuming with changed settings: " + "; ".join(allowed)
                + (f" (the cosine schedule now decays to 0 at step {run.max_steps}, so the learning rate from here on "
                   "differs from the saved run's plan)" if horizon else ""))


def log_metrics(run: Run, record: dict) -> None:
    if run.cfg.train.tensorboard:
        run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    if run.accelerator.is_main_process:
        try:
            with open(run.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"cannot append to {run.out / 'metrics.jsonl'} ({e.strerror or e}); the last checkpoint "
                            "is intact: free some space and run the same command again to resume") from None


def plot_losses(run: Run) -> None:
    if run.accelerator.is_main_process and (run.out / "metrics.jsonl").exists():
        from .plots import plot_metrics

        plot_metrics({"train": run.out / "metrics.jsonl"}, run.out / "loss.png")


def train(cfg: LLMModulesConfig, *, resume: bool = True, log=print, stop_at: Optional[int] = None) -> Progress:
    """Set up, fit and return the final progress; the trained weights are in `<output_dir>/checkpoints`."""
    run = setup(cfg, resume=resume, log=log)
    log = run.log  # silent on ranks other than the main one
    trained = run.unwrapped.trained_count(cfg.train)
    log(f"training {trained:,} parameters for "
        f"{run.max_steps} steps ({len(run.data.train)} train / {len(run.data.val)} val examples) -> {run.out}")
    progress = fit(run, stop_at=stop_at)
    if progress.best_val is not None:
        log(f"best validation loss {progress.best_val:.4f} at step {progress.best_step}")
    return progress
