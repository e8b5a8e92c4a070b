"""`llm-modules ablations`: the paper's claims and next steps, measured with the same data, steps and seed per arm.

Arms: the combined model (learned gate, 2 cross-attention layers), also with the warm start (`bridge.init: large`,
at lr 1e-4 and at the combined model's 1e-3); the small model alone (own token embeddings);
the gate fixed at 0.5; 1 and 4 cross-attention layers; distillation (small alone + KL to the large model); the
prompt coupling; the large model alone with its own head (a ceiling, evaluated only); and a probe of how much of
the large model's prediction survives each bridge layer.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

from . import features as features_mod
from .config import LLMModulesConfig
from .data import load_data
from .evaluate import answer_accuracy, extract_answer, heldout_loss, is_correct
from .files import atomic_write_json, atomic_write_text
from .model import LLMModules
from .plots import plot_metrics
from .row_split import prepare_for_cpu_decoding
from .train import train

ARMS: dict[str, dict] = {
    "combined": {},
    "combined-warm": {"bridge": {"init": "large"}, "train": {"lr_bridge": 1.0e-4, "lr_small": 1.0e-4}},
    "combined-warm-lr-1e-3": {"bridge": {"init": "large"}},
    "small-alone": {"coupling": "none"},
    "gate-fixed-0.5": {"bridge": {"gate": "fixed", "gate_value": 0.5}},
    "layers-1": {"bridge": {"num_layers": 1}},
    "layers-4": {"bridge": {"num_layers": 4}},
    "distill": {"coupling": "none", "train": {"distill_weight": 0.5}},
    "prompt-coupling": {"coupling": "prompt", "bridge": {"every": 2}},
}


def arm_config(cfg: LLMModulesConfig, name: str, out: Path, budget: Optional[int], vocab: int) -> LLMModulesConfig:
    over = json.loads(json.dumps(ARMS[name]))
    train_over = {"output_dir": str(out / name), "feature_cache": "auto", **over.pop("train", {})}
    if budget is not None:
        train_over["max_steps"] = budget
    if over.get("coupling") == "prompt" and cfg.small.config is not None and cfg.small_tokenizer is None:
        from .backbones import resolve_path

        # A small model built from its config has no tokenizer of its own: give it the large one's, so this arm
        # is the small-alone arm plus the prompt memory.
        over["small"] = {"config": {**cfg.small.config, "vocab_size": vocab}}
        over["small_tokenizer"] = cfg.tokenizer or resolve_path(cfg.large)
    merged = cfg.to_dict()
    for section, value in over.items():
        merged[section] = {**merged[section], **value} if isinstance(value, dict) else value
    merged["train"] = {**merged["train"], **train_over}
    return LLMModulesConfig.from_dict(merged, where=f"experiment arm {name}")


def run_arm(arm: LLMModulesConfig, eval_examples: int, max_new_tokens: int, log=print):
    """Train one arm (resuming if it was interrupted), then evaluate its best checkpoint: held-out loss on every
    held-out example, greedy answers to the first `eval_examples`. Returns (results, model, data, feature cache)."""
    out = Path(arm.train.output_dir)
    t0 = time.perf_counter()
    progress = train(arm, resume=True, log=log)
    train_s = time.perf_counter() - t0
    model = prepare_for_cpu_decoding(LLMModules.from_pretrained(out / "best"))  # evaluated only
    data, _ = load_data(arm, model.large_tokenizer, model.tokenizer, log=lambda *a: None)
    cached = features_mod.available(arm, data) if arm.coupling == "stream" else None
    loss = heldout_loss(model, data.val, features=cached["val"] if cached else None)
    t1 = time.perf_counter()
    rows = answer_accuracy(model, data.val[:eval_examples], max_new_tokens=max_new_tokens)
    gen_s = time.perf_counter() - t1
    new_tokens = sum(len(model.tokenizer.encode(r["output"], add_special_tokens=False)) + 1 for r in rows)
    atomic_write_text(out / "answers.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    results = {
        "val_loss": loss.loss, "perplexity": loss.perplexity, "val_tokens": loss.tokens,
        "exact_match": sum(r["correct"] for r in rows), "answered": len(rows),
        "steps": progress.step, "best_step": progress.best_step, "train_seconds": train_s,
        "trainable_params": sum(p.numel() for _, p in model.trainable_named_parameters()),
        "answer_tokens_per_s": new_tokens / max(gen_s, 1e-9), "sample": rows[0] if rows else None,
    }
    return results, model, data, cached


def run_experiment(cfg: LLMModulesConfig, out: Path, *, budget: Optional[int], arms: list[str],
                   eval_examples: int = 24, max_new_tokens: int = 96, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _, tokenizer = load_data(cfg, log=log)
    results: dict[str, dict] = {}
    for name in arms:
        arm = arm_config(cfg, name, out, budget, len(tokenizer))
        log(f"\n=== arm {name} ({time.perf_counter() - t_start:.0f} s) ===")
        results[name], model, data, cached = run_arm(arm, eval_examples, max_new_tokens, log)
        if name == "combined" and cached is not None and cfg.large.layer == -1:
            from .distill import load_teacher_head
            from .probe import probe

            head = load_teacher_head(cfg)
            results["probe"] = probe(model.bridge, cached, data, head)
            results["large-alone"] = large_alone(cfg, data, cached, head, eval_examples, max_new_tokens)
        del model
    results["wall_seconds"] = time.perf_counter() - t_start
    write_report(results, arms, out, cfg, budget)
    return results


@torch.no_grad()
def large_alone(cfg, data, cached, head, eval_examples: int, max_new_tokens: int) -> dict:
    """The ceiling: the large model with its own head, on the same target tokens and questions."""
    from transformers import AutoModelForCausalLM

    from .backbones import quiet_transformers, resolve_path
    from .generate import prompt_batch
    from .backbones import load_model_tokenizer

    total, count = 0.0, 0
    for i, ex in enumerate(data.val):  # loss from the cached final states through the large model's own head
        states = cached["val"].get(i).float()
        labels = torch.tensor(ex.labels[1:])
        keep = labels != -100
        logits = states[:-1][keep] @ head.T
        total += float(F.cross_entropy(logits, labels[keep], reduction="sum"))
        count += int(keep.sum())
    if cfg.large.name_or_path is None:
        return {"val_loss": total / max(count, 1), "exact_match": None, "answered": 0}
    with quiet_transformers():
        lm = AutoModelForCausalLM.from_pretrained(resolve_path(cfg.large)).eval()
    tok = load_model_tokenizer(cfg)
    # prompt_batch reads only the tokenizers and the config's data format: prompts exactly as the arms see them.
    as_model = SimpleNamespace(tokenizer=tok, large_tokenizer=tok, config=cfg.replace(coupling="stream"))
    usable = [e for e in data.val[:eval_examples] if e.record is not None and len(e.record.messages) > 1]
    correct, t0, new_tokens = 0, time.perf_counter(), 0
    for start in range(0, len(usable), 8):
        chunk = usable[start:start + 8]
        convs = [e.record.messages[:-1] for e in chunk]
        ids, mask, _ = prompt_batch(as_model, convs)
        gen = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:]
        for e, row in zip(chunk, gen):
            text = tok.decode(row, skip_special_tokens=True)
            new_tokens += int((row != tok.pad_token_id).sum())
            correct += is_correct(extract_answer(text), extract_answer(e.record.messages[-1]["content"]))
    return {"val_loss": total / max(count, 1), "exact_match": correct, "answered": len(usable),
            "answer_tokens_per_s": new_tokens / max(time.perf_counter() - t0, 1e-9)}


def write_report(results: dict, arms: list[str], out: Path, cfg, budget) -> None:
    lines = ["| arm | held-out loss | perplexity | exact match | trainable params | steps | train s | "
             "answer tok/s |", "|---|---|---|---|---|---|---|---|"]
    for name in arms:
        r = results[name]
        lines.append(f"| {name} | {r['val_loss']:.3f} | {r['perplexity']:.2f} | {r['exact_match']}/{r['answered']} "
                     f"| {r['trainable_params']:,} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{r['answer_tokens_per_s']:.1f} |")
    if "large-alone" in results:
        r = results["large-alone"]
        em = f"{r['exact_match']}/{r['answered']}" if r.get("exact_match") is not None else "-"
        tps = f"{r['answer_tokens_per_s']:.1f}" if "answer_tokens_per_s" in r else "-"
        lines.append(f"| large alone (own head, not trained) | {r['val_loss']:.3f} | "
                     f"{math.exp(min(r['val_loss'], 50)):.2f} | {em} | 0 | 0 | 0 | {tps} |")
    table = "\n".join(lines)
    if "probe" in results:
        table += ("\n\nProbe: a ridge read-out from each bridge representation onto the large model's final state, "
                  "through the large model's own head, on held-out target positions.\n\n"
                  "| representation | width | top-1 agreement with the large model | KL(large ‖ read-out) |\n"
                  "|---|---|---|---|\n")
        table += "\n".join(f"| {p['representation']} | {p['width']} | {p['top1_agreement']:.3f} | "
                           f"{p['kl_large_to_readout']:.3f} |" for p in results["probe"])
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_json(out / "results.json", results)
    plot_metrics({n: out / n / "metrics.jsonl" for n in arms if (out / n / "metrics.jsonl").exists()},
                 out / "loss.png", title=f"held-out loss per arm ({budget} steps each)")
    print("\n" + table + f"\n\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'loss.png'}")
