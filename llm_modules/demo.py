"""`llm-modules demo`: the main job end to end on real pretrained weights.

Fetch the large model's weights, build the data, train the combined model and, for the same steps, the small model
alone (its own token embeddings, same size); evaluate both on held-out examples (loss on target tokens and
exact-match accuracy of the final answer); print the comparison; generate one answer; plot both loss curves.
"""
from __future__ import annotations

import time
from pathlib import Path

from .checkpoint import atomic_write_json, atomic_write_text
from .config import LLMModulesConfig
from .experiment import run_arm
from .plots import plot_metrics


def arms(cfg: LLMModulesConfig, out: Path) -> dict[str, LLMModulesConfig]:
    return {
        "combined": cfg.replace(train={"output_dir": str(out / "combined")}),
        "small-alone": cfg.replace(coupling="none", train={"output_dir": str(out / "small-alone")}),
    }


def run_demo(cfg: LLMModulesConfig, out: Path, *, eval_examples: int = 24, max_new_tokens: int = 96,
             log=print) -> dict:
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for name, arm in arms(cfg, out).items():
        log(f"\n=== {name}: training, then evaluating its best checkpoint ({time.perf_counter() - t0:.0f} s) ===")
        results[name], model, _, _ = run_arm(arm, eval_examples, max_new_tokens, log)
        del model
    sample = results["combined"]["sample"]
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
                     f"{r['exact_match']}/{r['answered']} | {r['trainable_params']:,} | {r['steps']} |")
    return "\n".join(lines)
