"""Time per training epoch with live large-model features vs the frozen-feature cache, and the cache build time.

    python benchmarks/training.py --config configs/default.yaml [--threads 2] [--max-batches N] [--out f.json]

All arms run in one process on the same machine, same data, same batches, same number of optimizer steps.
"live" runs the large model inside every step (what the reference does every epoch); "cached" reads its states
from the cache built once beforehand. With --max-batches the "epoch" is the first N batches of epoch 0 (both arms),
so the per-epoch figures are per N batches; the ratio is what matters.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine, write_json  # noqa: E402

from llm_modules.config import load_config  # noqa: E402
from llm_modules import features  # noqa: E402
from llm_modules.model import LLMModules  # noqa: E402
from llm_modules.train import micro_batches, setup, train_step  # noqa: E402


def timed_epoch(run, max_batches) -> tuple[float, int, int]:
    """Seconds, optimizer steps and tokens for one pass over epoch 0 (or its first max_batches batches)."""
    pad = run.unwrapped.tokenizer.pad_token_id
    run.model.train()
    steps, tokens = 0, 0
    t0 = time.perf_counter()
    for epoch, index, batch in micro_batches(run):
        if epoch > 0 or (max_batches and steps >= max_batches):
            break
        loss, _ = train_step(run, [batch], pad)
        tokens += sum(len(run.data.train[i]) for i in batch)
        steps += 1
    return time.perf_counter() - t0, steps, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batches", type=int, default=0, help="0 = the whole epoch")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    base = load_config(args.config, [("train.grad_accum", 1), ("train.num_threads", args.threads)])
    cfg_live = base.replace(train={"feature_cache": "off", "output_dir": str(work / "live")})
    cfg_cached = base.replace(train={"feature_cache": "auto", "output_dir": str(work / "cached"),
                                     "feature_cache_dir": str(work / "features")})
    m = machine()
    print(describe_machine(m))

    model = LLMModules.from_config(cfg_live)  # loaded once; the same initial weights serve both arms
    init = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    run = setup(cfg_live, resume=False, model=model, log=lambda *a: None)
    live_s, steps, tokens = timed_epoch(run, args.max_batches)

    with torch.no_grad():
        for n, p in model.trainable_named_parameters():
            p.copy_(init[n])
    t0 = time.perf_counter()
    features.prepare(model.large, cfg_cached, run.data, log=print)
    build_s = time.perf_counter() - t0
    run_c = setup(cfg_cached, resume=False, model=model, log=lambda *a: None)
    assert run_c.features is not None
    cached_s, steps_c, _ = timed_epoch(run_c, args.max_batches)

    result = {
        "machine": m, "config": args.config, "threads": args.threads, "optimizer_steps": steps, "tokens": tokens,
        "train_examples": len(run.data.train), "val_examples": len(run.data.val),
        "live_epoch_s": live_s, "cache_build_s": build_s, "cached_epoch_s": cached_s,
        "speedup_after_first_epoch": live_s / cached_s,
        "first_epoch_cached_incl_build_s": build_s + cached_s,
    }
    print(f"\nconfig {args.config}: {steps} optimizer steps over {tokens:,} tokens per epoch "
          f"({len(run.data.train)} train + {len(run.data.val)} val examples cached)")
    print(f"  live features      {live_s:8.1f} s / epoch")
    print(f"  cache build (once) {build_s:8.1f} s  (train + val splits)")
    print(f"  cached features    {cached_s:8.1f} s / epoch   -> {live_s / cached_s:.1f}x faster after the first epoch")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
