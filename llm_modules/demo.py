"""`llm-modules demo`: the main job end to end on real weights: knowledge the small model cannot have on its own.

The facts of the train subjects teach the question format (facts.py); the test asks about held-out subjects, whose
answers appear nowhere in training. The combined model (the config's large model, the paper's 768-wide small model
shape, `bridge.init: large`, KL to the large model, whole-sentence answers: DEMO_ARMS, picked among the candidates of
benchmarks/demo_candidates.py) and the same small model alone train for the same steps on the same batches; both,
and the large model alone, then answer the same held-out questions. The table gives their accuracy with its
interval, over all questions and over those whose answer is no train answer of their relation, beside the floor of
answering with the relation's most frequent train answer; then the first five held-out questions (the head of the
fixed held-out order, not picked) with each model's answer and the reference.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from .files import atomic_write_json, atomic_write_text
from .config import LLMModulesConfig
from .experiment import ARMS, GPT_NEO_125M, SUITES, Arm, arm_config, evaluate_arm, prepare_arm
from .plots import plot_metrics
from .tasks import proportion_text

# Sized for 15 minutes on 2 CPU cores from a fresh clone and an empty cache (docs/demo.md): one pass over 480 of the
# 6,955 train facts (30 steps of 16), whose sentences the large model reads once into the feature cache.
DEMO = replace(SUITES["facts"], data={**SUITES["facts"].data, "max_examples": 480}, steps=30, batch_size=16,
               tests={"facts": 160}, curve_points=1)
SHOWN = 5
# The same small model (the paper's 768-wide GPT-Neo shape) with its own token embeddings and no large model.
SMALL_ALONE_WIDE = Arm("small-alone-wide-sentence", "train",
                       {"coupling": "none", "small": {"config": GPT_NEO_125M}, "data": {"facts_answer": "sentence"},
                        "train": {"lr_small": 1.0e-4}},
                       note="the same 768-wide small model alone, its own embeddings, on whole-sentence answers")
# The demo's models: the candidate that carried the most held-out knowledge within the 15 minutes (docs/demo.md).
DEMO_ARMS = {"combined": ARMS["combined-large-wide-kd-sentence"], "small-alone": SMALL_ALONE_WIDE,
             "large-alone": ARMS["large-alone"]}


def run_demo(cfg: LLMModulesConfig, out: Path, *, questions: int = DEMO.tests["facts"], steps: int = DEMO.steps,
             arms: dict = DEMO_ARMS, log=print) -> dict:
    t0 = time.perf_counter()
    suite = replace(DEMO, tests={"facts": questions}, steps=steps)
    results: dict[str, dict] = {}
    for name, arm in arms.items():
        log(f"\n=== {name}: {arm.note} ({time.perf_counter() - t0:.0f} s) ===")
        d = out / name
        results[name], checkpoint, large_only, load = prepare_arm(arm_config(cfg, suite, arm, d), arm, None, log)
        (summary,) = evaluate_arm(checkpoint, suite.tests, d / "eval", large_only=large_only, batch_size=16,
                                  max_new_tokens=None, load=load, log=log)
        del load  # the model goes before the next arm trains
        results[name]["facts"] = summary
    results["wall_seconds"] = time.perf_counter() - t0
    table = comparison_table(results, arms)
    shown = examples(out, arms)
    log("\n" + table + "\n\n" + shown)
    plot_metrics({n: out / n / "metrics.jsonl" for n in arms if (out / n / "metrics.jsonl").exists()},
                 out / "loss.png", title="held-out loss per target token (facts, train subjects' val split)")
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table + "\n\n" + shown + "\n")
    log(f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'loss.png'} "
        f"({results['wall_seconds']:.0f} s in all)")
    return results


def comparison_table(results: dict, arms: dict) -> str:
    """Each model's held-out accuracy, all questions and those whose answer no training fact of the relation has
    (only knowledge of the subject reaches them), and the floor of answering with the relation's prior alone."""
    lines = ["| model | held-out facts right (95% CI) | of them, answers never seen in training | trainable params "
             "| steps |", "|---|---|---|---|---|"]
    for name, arm in arms.items():
        r, s = results[name], results[name]["facts"]
        lines.append(f"| {name} ({arm.note}) | {proportion_text(s)} | {proportion_text(s['unseen_answers'])} "
                     f"| {r['trainable_params']:,} | {r['steps']} |")
    facts = results[next(iter(arms))]["facts"]
    lines.append(f"| the relation's most frequent train answer, every time (no model) | "
                 f"{proportion_text(facts['prior_baseline'])} | 0/{facts['unseen_answers']['n']} (never a new answer) "
                 "| 0 | 0 |")
    return "\n".join(lines)


def examples(out: Path, arms: dict) -> str:
    """The first SHOWN held-out questions, each model's answer, the reference."""
    answers = {n: [json.loads(ln) for ln in (out / n / "eval" / "facts.jsonl").read_text().splitlines()][:SHOWN]
               for n in arms}
    lines = []
    for i, row in enumerate(answers[next(iter(arms))]):
        lines.append(f"Q{i + 1}. {row['question'].splitlines()[-1]} ...   (reference: {row['gold']})")
        for n in arms:
            a = answers[n][i]
            lines.append(f"    {n:12s} {'right' if a['correct'] else 'wrong'}: {a['output'].strip()[:80]!r}")
    return "\n".join(lines)
