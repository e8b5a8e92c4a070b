"""`llm-modules demo`: the main job end to end on real pretrained weights.

Fetch the large model's weights, build the data, train the combined model and, for the same steps, the small model
alone (its own token embeddings, same size); evaluate both on held-out examples (loss on target tokens and
exact-match accuracy of the final answer); print the comparison; generate one answer; plot both loss curves.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import atomic_write_json, atomic_write_text
from .config import LLMModulesConfig
from .evaluate import answer_accuracy, heldout_loss
from .model import LLMModules
from .plots import plot_metrics
from .train import load_data, train


def arms(cfg: LLMModulesConfig, out: Path) -> dict[str, LLMModulesConfig]:
    return {
        "combined": cfg.replace(train={"output_dir": str(out / "combined")}),
        "small-alone": cfg.replace(coupling="none", train={"output_dir": str(out / "small-alone")}),
    }


def run_demo(cfg: LLMModulesConfig, out: Path, *, eval_examples: int = 24, max_new_tokens: int = 96,
             log=print) -> dict:
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    data, sample = None, None
    for name, arm in arms(cfg, out).items():
        log(f"\n=== {name}: training ({time.perf_counter() - t0:.0f} s) ===")
        progress = train(arm, resume=True, log=log)
        best = Path(arm.train.output_dir) / "best"
        log(f"=== {name}: evaluating {best} ===")
        model = LLMModules.from_pretrained(best).eval()
        if data is None or arm.coupling == "prompt":
            data, _ = load_data(arm, model, log=lambda *a: None)
        loss = heldout_loss(model, data.val)
        rows = answer_accuracy(model, data.val[:eval_examples], max_new_tokens=max_new_tokens)
        results[name] = {"val_loss": loss.loss, "perplexity": loss.perplexity, "val_tokens": loss.tokens,
                         "accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)), "answered": len(rows),
                         "steps": progress.step, "best_step": progress.best_step,
                         "trainable_params": sum(p.numel() for _, p in model.trainable_named_parameters())}
        atomic_write_text(out / f"{name}-answers.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        if name == "combined":
            sample = rows[0] if rows else None
        del model
    results["wall_seconds"] = time.perf_counter() - t0
    table = comparison_table(results)
    log("\n" + table)
    if sample is not None:
        log(f"\ncombined model, held-out question: {sample['prompt']}\nanswer: {sample['output']}\n"
            f"(gold {sample['gold']}, {'correct' if sample['correct'] else 'wrong'})")
    plot_metrics({n: out / n / "metrics.jsonl" for n in ("combined", "small-alone")}, out / "loss.png")
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table + "\n")
    log(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'loss.png'} "
        f"({results['wall_seconds']:.0f} s in all)")
    return results


def comparison_table(results: dict) -> str:
    lines = ["| arm | held-out loss (nats/token) | perplexity | exact match | trainable params | steps |",
             "|---|---|---|---|---|---|"]
    for name in ("combined", "small-alone"):
        r = results[name]
        lines.append(f"| {name} | {r['val_loss']:.3f} | {r['perplexity']:.2f} | "
                     f"{r['accuracy'] * r['answered']:.0f}/{r['answered']} | {r['trainable_params']:,} | "
                     f"{r['steps']} |")
    return "\n".join(lines)
