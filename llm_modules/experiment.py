"""`llm-modules experiment`: does the small model get the large model's knowledge? Every arm, real benchmarks.

Suites (each trains every arm on the same data, batches, steps and seed, then evaluates it with `eval --task`):
  facts  train on the facts of the train subjects, test on held-out subjects (facts.py);
  gsm8k  train on a GSM8K train subset, test on GSM8K test; the checkpoints are also tested zero-shot on HellaSwag
         and ARC-Easy (whether what was learned generalizes beyond the training domain).
Arms: the large model alone (not trained: the ceiling), the combined model with the paper's initialization and with
the warm start (`bridge.init: large`), the small model alone and distilled, the prompt coupling with a pretrained
SmolLM2-135M-Instruct kept whole, that SmolLM2 fine-tuned alone, and LoRA on the large model with about the combined
model's trainable-parameter count (finetune.py).

Each arm trains in a process of its own (its wall time and peak memory are its own; a training run resumes if it was
interrupted), forked from a server that has imported the training code once (launch); every evaluation is written
once, as `eval --task` writes it, and found again by a rerun, which skips what is done. Layout: <out>/<suite>/<arm>/
(the arm's config `arm.yaml`, its training output, `train.json`, `eval/<tasks>.summary.json`,
`curve/step-<k>.summary.json`, `speed.json`; its step checkpoints are removed once the curve has read them, `best/`
stays), <out>/results.json, results.md and the plots. results.json gathers the suites and arms of every run in <out>
(with or without --quick, not mixed), so one suite or a few arms can be run at a time and the report covers them
all. docs/results.md is this command's report.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from .config import LLMModulesConfig
from .errors import UserError
from .files import atomic_write_json

SEGMENTS = "train.runs.jsonl"  # one line per training process of an arm: its wall time, peak memory, exit status
SMOLLM = {"name_or_path": "smollm2-135m-instruct", "config": None, "pretrained": True, "overrides": {}}
LARGE_1_5B = {"name_or_path": "qwen2.5-coder-1.5b-instruct"}  # the paper's large model size
# The paper's small model (EleutherAI/gpt-neo-125M's shape: 768 wide, 12 layers), random, built from an inline config.
GPT_NEO_125M = {"model_type": "gpt_neo", "vocab_size": 8, "bos_token_id": 0, "eos_token_id": 0, "hidden_size": 768,
                "num_layers": 12, "num_heads": 12, "attention_types": [[["global", "local"], 6]],
                "window_size": 256, "max_position_embeddings": 2048, "intermediate_size": 3072}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in (
            "config", "overrides") else v
    return out


# The warm start with the paper's small model shape, the base of the 768-wide arms.
WIDE = {"small": {"config": GPT_NEO_125M}, "bridge": {"num_heads": 8, "adapter_dim": 256, "init": "large"},
        "train": {"lr_bridge": 1.0e-4, "lr_small": 1.0e-4}}
# The prompt coupling's design case: SmolLM2-135M-Instruct kept whole, gated memory attention after every 6th block.
PROMPT = {"coupling": "prompt", "small": SMOLLM, "bridge": {"every": 6}, "train": {"lr_small": 5.0e-5}}
# Its gates free to open (their own learning rate), on whole-sentence facts answers.
PROMPT_OPEN = _merge(PROMPT, {"train": {"lr_gate": 1.0e-2}, "data": {"facts_answer": "sentence"}})
# The same reading the paper's large model size, whose memory holds more of the answers SmolLM2 lacks.
PROMPT_OPEN_1_5B = _merge(PROMPT_OPEN, {"large": LARGE_1_5B})
# Its two stages (LLaVA's): the memory attention alone for 120 steps, then 120 more with SmolLM2.
TWO_STAGE_1_5B = _merge(PROMPT_OPEN_1_5B, {"train": {"max_steps": 240, "small_from_step": 120}})
# The 768-wide warm start on whole-sentence facts answers, reading the 1.5B model.
WIDE_SENTENCE_1_5B = _merge(WIDE, {"large": LARGE_1_5B, "data": {"facts_answer": "sentence"}})


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "large" (evaluated only), "train" (llm-modules train), "finetune" (llm-modules finetune)
    over: dict = field(default_factory=dict)  # config overrides on top of the suite's config
    method: Optional[str] = None  # finetune: lora | full
    base: Optional[str] = None  # finetune: large | small
    curve: bool = False  # held-out accuracy at several steps
    note: str = ""
    followup: bool = False  # tests a hypothesis of docs/results.md; runs when named (or --arms all), not by default
    own_solutions: bool = False  # GSM8K: trains on the large model's own right solutions (own_solutions), not the set's
    # The arm whose fine-tuned small model (its best/) this arm's small model starts from: that arm (a full fine-tune
    # of the small model) is trained first (train_receiver); see the decisive facts suite below.
    starts_from: Optional[str] = None
    # Its part of a suite whose steps are split (Suite.memory_steps): a key of SHARES; None = all the suite's steps.
    share: Optional[str] = None
    # The baselines of issue 48 (facts only; see the block "The baselines" below): few-shot examples in the questions
    # (an untrained arm), and the arm (untrained, kind "large") whose answers are written into every question.
    shots: int = 0
    hints_from: Optional[str] = None


ARMS = {a.name: a for a in (
    Arm("large-alone", "large", note="the large model with its own head and chat template, not trained"),
    Arm("combined-paper", "train", curve=True, note="the paper: random small model, bridge and head"),
    Arm("combined-large", "train", {"bridge": {"init": "large"}, "train": {"lr_bridge": 1.0e-4, "lr_small": 1.0e-4}},
        curve=True, note="the warm start: begins at the large model's predictions (lr 1e-4)"),
    Arm("combined-large-wide", "train", WIDE, curve=True,
        note="the warm start with the paper's small model shape (768 wide, 12 layers; it keeps 766 of 896 directions)"),
    Arm("combined-large-wide-kd", "train", _merge(WIDE, {"train": {"distill_weight": 0.5}}), curve=True,
        note="the 768-wide warm start kept near the large model: + KL to its distribution (w = 0.5)"),
    Arm("combined-large-wide-kd0.7", "train", _merge(WIDE, {"train": {"distill_weight": 0.7}}),
        curve=True, followup=True,
        note="the 768-wide warm start kept near the large model: + KL to its distribution (w = 0.7)"),
    Arm("combined-large-wide-kd0.9", "train", _merge(WIDE, {"train": {"distill_weight": 0.9}}),
        curve=True, followup=True,
        note="the 768-wide warm start kept near the large model: + KL to its distribution (w = 0.9)"),
    Arm("combined-large-wide-kd0.9to0", "train",
        _merge(WIDE, {"train": {"distill_weight": 0.9, "distill_decay_from": 60, "distill_weight_end": 0.0}}),
        curve=True, followup=True,
        note="the 768-wide warm start kept near the large model: KL w = 0.9 to step 60, then linear to 0 at 120"),
    Arm("combined-large-wide-kd0.9-sentence", "train",
        _merge(WIDE, {"train": {"distill_weight": 0.9}, "data": {"facts_answer": "sentence"}}),
        curve=True, followup=True,
        note="KL w = 0.9, facts trained on whole-sentence answers (the large model's own form; GSM8K unchanged)"),
    Arm("combined-large-wide-kd-sentence", "train",
        _merge(WIDE, {"train": {"distill_weight": 0.5}, "data": {"facts_answer": "sentence"}}),
        curve=True, followup=True,
        note="KL w = 0.5, facts trained on whole-sentence answers (between the plain sentence arm and w = 0.9)"),
    Arm("combined-large-wide-sentence", "train", _merge(WIDE, {"data": {"facts_answer": "sentence"}}),
        curve=True, followup=True,
        note="the 768-wide warm start, facts trained on whole-sentence answers, no KL (the form alone)"),
    Arm("combined-large-wide-lr1e-5", "train", _merge(WIDE, {"train": {"lr_bridge": 1.0e-5, "lr_small": 1.0e-5}}),
        curve=True, followup=True,
        note="the 768-wide warm start kept near the large model: 10x smaller steps (lr 1e-5)"),
    Arm("combined-large-wide-head0", "train", _merge(WIDE, {"train": {"lr_head": 0.0}}), curve=True, followup=True,
        note="the 768-wide warm start kept near the large model: its head frozen at the warm start's read-out"),
    Arm("small-alone", "train", {"coupling": "none"}, curve=True, note="the same small model, its own embeddings"),
    Arm("distill", "train", {"coupling": "none", "train": {"distill_weight": 0.5}},
        note="small alone + KL to the large model's distribution (w = 0.5)"),
    Arm("small-alone-sentence", "train", {"coupling": "none", "data": {"facts_answer": "sentence"}}, curve=True,
        followup=True, note="the small model alone on whole-sentence facts answers (the sentence arms' baseline)"),
    Arm("distill-sentence", "train",
        {"coupling": "none", "train": {"distill_weight": 0.5}, "data": {"facts_answer": "sentence"}}, followup=True,
        note="the distilled small model on whole-sentence facts answers (the sentence arms' baseline)"),
    Arm("prompt-smollm", "train", PROMPT, note="prompt coupling, SmolLM2-135M-Instruct kept whole (its design case)"),
    Arm("prompt-smollm-sentence-lrgate", "train", PROMPT_OPEN,
        followup=True, note="the prompt coupling on whole-sentence facts answers, its tanh gates at lr 1e-2 (with "
                            "the memory attention's 1e-3 they had stayed within tanh(alpha) = 0.019 over 120 steps)"),
    Arm("prompt-smollm-sentence-lrgate-1.5b", "train", PROMPT_OPEN_1_5B,
        followup=True, note="the open-gate prompt arm reading the 1.5B model, whose memory holds more of the unseen "
                            "answers SmolLM2 lacks than the 0.5B model's (with it the gates closed again)"),
    Arm("prompt-smollm-sentence-frozen-1.5b", "train", _merge(PROMPT_OPEN_1_5B, {"train": {"lr_small": 0.0}}),
        followup=True,
        note="the open-gate 1.5B prompt arm with SmolLM2 and its head frozen (Flamingo's case): only the memory "
             "attention and its gates train, so the loss can fall only through what SmolLM2 reads (trained, "
             "SmolLM2 memorized the train subjects' answers itself and the gates closed)"),
    Arm("prompt-smollm-sentence-2stage-1.5b", "train", TWO_STAGE_1_5B,
        followup=True, note="the frozen arm's 120 steps, then 120 more in which SmolLM2 trains too, on a schedule of "
                            "its own (LLaVA's two stages): the memory attention trained first, where the gates open"),
    Arm("prompt-smollm-sentence-2stage-every3-1.5b", "train", _merge(TWO_STAGE_1_5B, {"bridge": {"every": 3}}),
        followup=True, note="the two-stage arm with memory attention after every 3rd of SmolLM2's 30 blocks (10 "
                            "layers, not 5): more places to read the memory, the rest unchanged"),
    Arm("prompt-smollm-sentence-2stage-every2-1.5b", "train", _merge(TWO_STAGE_1_5B, {"bridge": {"every": 2}}),
        followup=True, note="the two-stage arm with memory attention after every 2nd of SmolLM2's 30 blocks (15 "
                            "layers): whether the every-3 arm's gain grows with more layers"),
    Arm("prompt-smollm-sentence-2stage240-1.5b", "train",
        _merge(TWO_STAGE_1_5B, {"train": {"max_steps": 360, "small_from_step": 240}}),
        followup=True, note="the two-stage arm with a first stage twice as long (240 steps of the memory attention "
                            "alone, then the same 120 with SmolLM2): the memory trained further before SmolLM2 can "
                            "learn the answers itself"),
    Arm("smollm-ft", "finetune", {"small": SMOLLM, "train": {"lr_small": 5.0e-5}}, method="full", base="small",
        note="SmolLM2-135M-Instruct fine-tuned alone"),
    Arm("smollm-ft-sentence", "finetune", {"small": SMOLLM, "train": {"lr_small": 5.0e-5},
                                           "data": {"facts_answer": "sentence"}}, method="full", base="small",
        followup=True, note="SmolLM2-135M-Instruct fine-tuned alone on whole-sentence facts answers"),
    Arm("lora", "finetune", {"train": {"lr_small": 2.0e-4}}, method="lora", base="large",
        note="LoRA on the large model, rank chosen for the combined model's trainable count"),
    Arm("lora-sentence", "finetune", {"train": {"lr_small": 2.0e-4}, "data": {"facts_answer": "sentence"}},
        method="lora", base="large", followup=True, note="LoRA on the large model on whole-sentence facts answers"),
    Arm("combined-large-wide-sentence-1.5b", "train", WIDE_SENTENCE_1_5B,
        followup=True, note="the sentence arm reading the paper's large model size (Qwen2.5-Coder-1.5B-Instruct, "
                            "1536 wide; the 768-wide bridge keeps 766 of its 1536 directions); no curve, for time"),
    Arm("combined-large-wide-kd-sentence-1.5b", "train",
        _merge(WIDE_SENTENCE_1_5B, {"train": {"distill_weight": 0.5}}),
        followup=True, note="the 1.5B sentence arm with KL w = 0.5 to the 1.5B model's distribution (with the 0.5B "
                            "model, the term kept more unseen answers); no curve, for time"),
    Arm("combined-large-wide-own", "train", WIDE, followup=True, own_solutions=True,
        note="the 768-wide warm start trained on the large model's own GSM8K solutions that reach the right number "
             "(its form, as the sentence arms for facts), not the data set's; no curve, for time"),
    Arm("large-alone-1.5b", "large", {"large": LARGE_1_5B}, followup=True,
        note="the paper's large model size alone (Qwen2.5-Coder-1.5B-Instruct), not trained: the ceiling it offers"),
)}


def _seeded(arm: Arm, seed: int) -> Arm:
    """`arm` again with another seed: the random initialization (bridge, new head, a random small model) and the
    batches' order and dropout (bridge.seed, train.seed); the same data, held-out split and feature cache. Two runs of
    one arm are what says whether a difference between arms is larger than run-to-run spread."""
    return replace(arm, name=f"{arm.name}-seed{seed}", followup=True, note=f"{arm.note}; seed {seed}",
                   over=_merge(arm.over, {"bridge": {"seed": seed}, "train": {"seed": seed}}),
                   starts_from=arm.starts_from and f"{arm.starts_from}-seed{seed}")  # the receiver of its own seed


def _longer(arm: Arm, steps: int) -> Arm:
    """`arm` trained for `steps` optimizer steps instead of the suite's (its learning-rate schedule stretched to
    them); the same data, batches' order, seed and feature cache."""
    return replace(arm, name=f"{arm.name}-{steps}steps", followup=True, note=f"{arm.note}; {steps} steps",
                   over=_merge(arm.over, {"train": {"max_steps": steps}}))


# The closest comparison on facts (docs/results.md: level, 48 against 54 unseen answers), run again with seed 1 and
# with twice the steps.
ARMS.update((a.name, a) for name in ("combined-large-wide-sentence-1.5b", "smollm-ft-sentence")
            for a in (_seeded(ARMS[name], 1), _longer(ARMS[name], 240)))
# The prompt coupling's closest comparison (level with SmolLM2 fine-tuned, +1.5 points), run again with seed 1,
# and its 10-layer variant (+2.7 points, the largest gain of the prompt arms, within the intervals).
ARMS.update((a.name, a) for name in ("prompt-smollm-sentence-2stage-1.5b", "prompt-smollm-sentence-2stage-every3-1.5b")
            for a in (_seeded(ARMS[name], 1),))
DEFAULT_ARMS = [name for name, arm in ARMS.items() if not arm.followup]  # the arms


@dataclass(frozen=True)
class Suite:
    name: str
    data: dict  # data section overrides
    steps: int
    batch_size: int
    tests: dict  # task -> items, for every arm
    extra_tests: dict = field(default_factory=dict)  # task -> items, for `extra_arms` only
    extra_arms: tuple = ("large-alone", "combined-paper", "combined-large", "small-alone")
    curve_task: tuple = ("facts", 300)
    curve_points: int = 4  # evaluated at step 0 and at every steps / curve_points
    max_new_tokens: Optional[int] = None
    speed: tuple = (48, 2, 64)  # decode speed: new tokens per row, timed repeats, prompt tokens (tasks.decode_speed)
    solutions: Optional[str] = None  # own_solutions: the task whose first data.max_examples problems are answered
    # Split steps (the decisive suite): the memory's share; an arm's part is Arm.share (SHARES). None: not split.
    memory_steps: Optional[int] = None
    arms: tuple = ()  # the suite's own arms, run when --arms is not given (empty: DEFAULT_ARMS)
    named_only: bool = False  # run only when named with --suites (not by default)


SUITES = {
    "facts": Suite("facts", {"benchmarks": ["facts"], "reasoning_gym_tasks": [], "path": None,
                             "val_fraction": 0.05, "max_length": 256}, steps=120, batch_size=16,
                   tests={"facts": 600}, curve_task=("facts", 300)),
    "gsm8k": Suite("gsm8k", {"benchmarks": ["gsm8k"], "reasoning_gym_tasks": [], "path": None,
                             "max_examples": 400, "val_fraction": 0.05, "max_length": 512}, steps=40, batch_size=8,
                   tests={"gsm8k": 200}, extra_tests={"hellaswag": 500, "arc_easy": 500},
                   curve_task=("gsm8k", 30), curve_points=2, solutions="gsm8k_train"),
}
# --quick: every arm, the same code paths, small slices (minutes, not hours); curves of two points (step 0, the end).
# The slices hold twice the examples the steps read (the feature cache and the warm start read the whole slice
# through the large model); speed is timed on a 16-token prompt (the 64-token one's prefill at batch 16 through the
# large model was most of an arm's timing).
QUICK = {
    "facts": replace(SUITES["facts"], data={**SUITES["facts"].data, "max_examples": 80}, steps=4, batch_size=8,
                     tests={"facts": 16}, curve_task=("facts", 8), curve_points=1, speed=(8, 1, 16)),
    "gsm8k": replace(SUITES["gsm8k"], data={**SUITES["gsm8k"].data, "max_examples": 16}, steps=2, batch_size=4,
                     tests={"gsm8k": 4}, extra_tests={"hellaswag": 10, "arc_easy": 10}, curve_task=("gsm8k", 2),
                     curve_points=1, max_new_tokens=32, speed=(8, 1, 16)),
}


# ==== The decisive facts table (issue 48) ========================================================================
# Every trained arm gets the same optimizer steps (and batches): one full pass over the train facts, plus the memory
# attention's own steps, counted for every arm. The residual fusion (coupling: prompt on SmolLM2 fine-tuned, frozen)
# spends the pass on its receiver's fine-tuning and the rest on its memory attention; SmolLM2 fine-tuned continues
# from that same receiver for the same rest; the two-stage prompt arm trains its memory attention alone for the
# rest's length first, then SmolLM2 with it for a pass; the stream arm and the baselines' trained arms (the text hint,
# LoRA on the 1.5B model: the baselines' block below) train all the steps. All 2,912 held-out questions; seeds 0, 1, 2
# (`-seed1`, `-seed2`), one for the baselines (the 1.5B model alone, few-shot, the hint, LoRA; report.SUMMARY).
FACTS_TRAIN = 6607  # facts of the train subjects (6,955 after deduplication) less the 5% validation split (tested)
FACTS_HELD_OUT = 2912  # every question about a held-out subject (tested against the data)
DECISIVE_BATCH = 16
PASS = math.ceil(FACTS_TRAIN / DECISIVE_BATCH)  # 413 steps: each train fact once
MEMORY_STEPS = 120  # the memory attention's own steps: the two-stage arms' first stage, where their gates opened
SHARES = {  # Arm.share -> its train.* steps in a split suite (s.steps = one pass + s.memory_steps)
    "receiver": lambda s: {"max_steps": s.steps - s.memory_steps},  # a fine-tuned small model others start from
    "memory": lambda s: {"max_steps": s.memory_steps},  # on top of the receiver it starts from (Arm.starts_from)
    "two-stage": lambda s: {"max_steps": s.steps, "small_from_step": s.memory_steps},  # memory first, then both
}
# The residual fusion: SmolLM2 fine-tuned for one pass (its checkpoint, set by the experiment), frozen, with gated
# memory attention after every 2nd of its 30 blocks (15 layers: the 10- and 15-layer arms were level; 30 would cost
# about twice as much) reading a middle layer of the 1.5B model (factual recall peaks there) and its last; gates at
# 0, so at step 0 it answers exactly as the receiver does.
FUSION_1_5B = _merge(PROMPT_OPEN_1_5B, {"large": {"layers": [14, -1]}, "bridge": {"every": 2},
                                        "train": {"lr_small": 0.0}})
SMOLLM_FT_SENTENCE = ARMS["smollm-ft-sentence"].over
# The baselines of the same table, one seed each (defined in the baselines' block below; the hint arm reads the 1.5B
# model alone's answers, so that arm comes first).
DECISIVE_BASELINES = ("large-alone-1.5b", "large-alone-1.5b-5shot", "smollm-ft-sentence-hint-1.5b",
                      "lora-sentence-1.5b")
DECISIVE = (
    Arm("smollm-ft-receiver", "finetune", SMOLLM_FT_SENTENCE, method="full", base="small", share="receiver",
        followup=True, note="SmolLM2-135M-Instruct fine-tuned alone on the sentences for one pass: the receiver the "
                            "fusion and the matched SmolLM2 arm start from"),
    Arm("smollm-ft-matched", "finetune", SMOLLM_FT_SENTENCE, method="full", base="small", share="memory",
        starts_from="smollm-ft-receiver", followup=True,
        note="SmolLM2 fine-tuned: the receiver fine-tuned on for the fusion's memory steps (the same total steps)"),
    Arm("fusion-smollm-ft-1.5b", "train", FUSION_1_5B, share="memory", starts_from="smollm-ft-receiver",
        followup=True,
        note="residual fusion: SmolLM2 fine-tuned for one pass, frozen (lr 0: what it learned stays, at step 0 it is "
             "the receiver exactly, and trained SmolLM2 had closed the gates), with gated memory attention after every "
             "2nd block reading layers 14 and 28 of the 1.5B model"),
    replace(ARMS["prompt-smollm-sentence-2stage-every3-1.5b"], name="prompt-smollm-sentence-2stage-every3-1.5b-matched",
            share="two-stage", note="the best prompt recipe (two stages, 10 memory layers) on the decisive budget: "
                                    "the memory attention alone for the memory steps, then SmolLM2 too for a pass"),
    ARMS["combined-large-wide-sentence-1.5b"],  # the stream coupling reading the 1.5B model: the suite's steps
)
ARMS.update((a.name, a) for a in DECISIVE[:-1])
ARMS.update((a.name, a) for a in (_seeded(arm, seed) for arm in DECISIVE for seed in (1, 2)) if a.name not in ARMS)
SUITES["facts-decisive"] = replace(
    SUITES["facts"], name="facts-decisive", steps=PASS + MEMORY_STEPS, memory_steps=MEMORY_STEPS,
    batch_size=DECISIVE_BATCH, tests={"facts": FACTS_HELD_OUT}, named_only=True,
    arms=(*(f"{a.name}{s}" for a in DECISIVE[1:] for s in ("", "-seed1", "-seed2")), *DECISIVE_BASELINES))
QUICK["facts-decisive"] = replace(SUITES["facts-decisive"], data=QUICK["facts"].data, steps=4, memory_steps=2,
                                  batch_size=8, tests={"facts": 16}, curve_task=("facts", 8), curve_points=1,
                                  speed=(8, 1, 16))


def share_over(suite: Suite, arm: Arm, out: Path) -> dict:
    """What a split suite's arm changes on top of its own overrides: its share of the steps (Arm.share) and, for an
    arm that starts from another (Arm.starts_from), that arm's fine-tuned model (`<suite dir>/<arm>/best`) as its
    small model."""
    over: dict = {}
    if arm.share is not None:
        if suite.memory_steps is None:
            raise UserError(f"arm {arm.name} takes a share ({arm.share}) of split steps; suite {suite.name} does not "
                            "split them (no memory_steps): run it in the facts-decisive suite")
        over["train"] = SHARES[arm.share](suite)
    if arm.starts_from is not None:
        over["small"] = {"name_or_path": str((out.parent / arm.starts_from / "best").resolve())}
    return over


def train_receiver(base: LLMModulesConfig, suite: Suite, arm: Arm, suite_dir: Path, log=print) -> dict:
    """Train (or find trained) the arm `arm` starts from (Arm.starts_from), and what it starts from, first: its best/
    is `arm`'s small model. Returns its train_arm record with `total_steps`, its steps and its receiver's."""
    dep = ARMS.get(arm.starts_from)
    if dep is None or (dep.kind, dep.method, dep.base) != ("finetune", "full", "small"):
        raise UserError(f"arm {arm.name} starts from {arm.starts_from!r}, which is not an arm fine-tuning the small "
                        "model whole (kind finetune, method full, base small)")
    before = train_receiver(base, suite, dep, suite_dir, log) if dep.starts_from else {"total_steps": 0}
    log(f"  {arm.name} starts from {dep.name}: trained first")
    trained = prepare_arm(arm_config(base, suite, dep, suite_dir / dep.name), dep, None, log)[0]
    best = suite_dir / dep.name / "best"
    if not (best / "config.json").is_file():
        raise UserError(f"arm {arm.name} starts from {dep.name}, whose fine-tuned model {best} is missing; remove "
                        f"{suite_dir / dep.name} and run the experiment again to retrain it")
    return {**trained, "arm": dep.name, "total_steps": trained["steps"] + before["total_steps"]}


# ---- configs --------------------------------------------------------------------------------------------------
def arm_config(base: LLMModulesConfig, suite: Suite, arm: Arm, out: Path, solutions: Optional[Path] = None
               ) -> LLMModulesConfig:
    """The suite's data and budget on top of `base`, then the arm's own changes; checkpoints kept for the curve,
    the last one without optimizer state (an arm is never continued; 1.7 GB less to write for a 768-wide arm).
    `solutions`: a file of conversations (own_solutions) that replaces the suite's training data."""
    every = max(1, suite.steps // suite.curve_points)
    data = suite.data if solutions is None else {**suite.data, "benchmarks": [], "path": str(solutions)}
    d = _merge(base.to_dict(), {"data": data, "train": {
        "output_dir": str(out), "max_steps": suite.steps, "batch_size": suite.batch_size, "epochs": 1000,
        "eval_every": every, "save_every": every, "keep_every": every if arm.curve else None, "patience": None,
        "save_final_optimizer": False, "feature_cache": "auto"}})
    return LLMModulesConfig.from_dict(_merge(_merge(d, arm.over), share_over(suite, arm, out)),
                                      where=f"experiment arm {arm.name} ({suite.name})")


def trainable_count(cfg: LLMModulesConfig) -> int:
    """Trainable parameters of the model a config builds (the large model is not loaded)."""
    from .model import LLMModules

    model = LLMModules.from_config(cfg, load_large=False)
    return model.trained_count(cfg.train)


# ---- running one piece, resumably -------------------------------------------------------------------------------
# What the forkserver imports once for all the arms' processes (transformers imports each model's code on first use;
# not llm_modules.__main__ itself, which each process runs as its __main__).
PRELOAD = ["llm_modules.loading", "llm_modules.train", "llm_modules.finetune", "accelerate", "safetensors.torch",
           "peft", "transformers.models.qwen2.modeling_qwen2", "transformers.models.gpt_neo.modeling_gpt_neo",
           "transformers.models.llama.modeling_llama"]


def launch(argv: list[str], log_path: Path, peak=None):
    """`llm-modules ARGV` in a process of its own, its output appended to log_path, forked from a server that has
    imported torch, transformers and llm_modules once (multiprocessing's forkserver): it starts in milliseconds
    instead of paying 7 s of imports. Nothing has run in the server (no threads, no torch state), so the child is
    what `python -m llm_modules ARGV` would be. Returns the started multiprocessing.Process (exitcode: main's);
    `peak` (a shared double, optional) receives the child's own peak memory in GiB when main returns."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    child = ctx.Process(target=_cli_logged, args=(argv, str(log_path), peak), name=f"llm-modules {argv[0]}")
    child.start()
    return child


def _cli_logged(argv: list[str], log_path: str, peak) -> None:
    """The target of launch's process: stdout and stderr (the file descriptors: C libraries' output too) appended
    to log_path, then the command line run as `python -m llm_modules ARGV` runs it (the library does not import the
    CLI), its exit status the process's."""
    import runpy
    import threading

    from tqdm import tqdm

    from .finetune import peak_memory_gib

    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock, whose semaphore a SIGKILL would leak
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for std in (1, 2):
        os.dup2(fd, std)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.argv = ["llm-modules", *argv]
    try:
        runpy.run_module("llm_modules", run_name="__main__", alter_sys=True)  # ends in sys.exit(main())
    finally:  # measured by the process itself, to the end (run_process's polling misses its last 0.2 s)
        if peak is not None:
            peak.value = peak_memory_gib()


def run_process(argv: list[str], log_path: Path, log=print) -> None:
    """Run `llm-modules ARGV` in its own process (launch; output to log_path); its wall time, peak memory and exit
    status are appended to SEGMENTS beside the log however the process ends.
    SIGTERM / SIGINT to this process are passed on: the child saves where it is and stops, and so do we (with
    interrupt.Interrupted, the child's exit status); the same command later resumes it."""
    import multiprocessing

    from .finetune import resident_peak_gib
    from .interrupt import Interrupted, StopRequests

    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    own = multiprocessing.get_context("forkserver").RawValue("d", 0.0)
    peak = 0.0
    with StopRequests(first="passed on to the arm being trained, which saves and stops",
                      again="passed on already") as stops:
        child = launch(argv, log_path, own)
        passed = False
        while child.exitcode is None:
            # Read while it runs as well: a process killed before main returns reports nothing itself.
            peak = max(peak, resident_peak_gib(child.pid) or 0.0)
            if stops.signum and not passed:
                os.kill(child.pid, stops.signum)
                passed = True
            child.join(0.2)
    code = child.exitcode
    peak = max(peak, own.value)
    with open(log_path.parent / SEGMENTS, "a") as f:  # every run of the arm, interrupted or not, counts
        f.write(json.dumps({"wall_seconds": time.perf_counter() - t0, "peak_memory_gib": peak, "exit": code}) + "\n")
    if stops.signum:
        message = f"stopped: {log_path.parent} saved what it had; run the same command again to resume"
        log(message)
        raise Interrupted(stops.signum, message)
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise UserError(f"`llm-modules {' '.join(argv[:3])} ...` stopped with exit code {code}; the last lines of "
                        f"{log_path}:\n  " + "\n  ".join(tail))


def train_arm(cfg: LLMModulesConfig, arm: Arm, target_params: Optional[int], load: Callable[[], tuple],
              log=print) -> dict:
    """Train (or find trained) one arm; train.json holds what it cost. A killed run resumes where it stopped.
    `load`: gives the trained checkpoint (load_once), whose trainable parameters are counted."""
    out = Path(cfg.train.output_dir)
    done = out / "train.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(out / "arm.yaml")
    argv = ["train", "--config", str(out / "arm.yaml")] if arm.kind == "train" else [
        "finetune", "--config", str(out / "arm.yaml"), "--method", arm.method, "--base", arm.base,
        *(["--target-params", str(target_params)] if arm.method == "lora" else [])]
    log(f"  training {arm.name} ({'; '.join(argv[:1] + argv[3:])}) -> {out}")
    run_process(argv, out / "train.log", log)
    runs = [json.loads(ln) for ln in (out / SEGMENTS).read_text().splitlines() if ln.strip()]
    cost = {"wall_seconds": sum(r["wall_seconds"] for r in runs), "runs": len(runs),  # a resumed arm: all its runs
            "peak_memory_gib": max(r["peak_memory_gib"] for r in runs)}
    trainable = (load()[0].trained_count(cfg.train) if arm.kind == "train"
                 else json.loads((out / "best" / "finetune.json").read_text())["trainable_params"])
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    result = {**cost, "trainable_params": trainable, "steps": max(r["step"] for r in steps)}
    atomic_write_json(done, result)
    return result


def prepare_arm(cfg: LLMModulesConfig, arm: Arm, target_params: Optional[int], log=print
                ) -> tuple[dict, Path, bool, Callable[[], tuple]]:
    """An arm ready to evaluate in cfg.train.output_dir: trained (train_arm), or for the large model alone its
    arm.yaml written. Returns what training cost, the checkpoint, whether it is the large model alone, and its one
    load (load_once), shared by the parameter count, the evaluations, the speed and the curve."""
    d = Path(cfg.train.output_dir)
    checkpoint, large_only = (d / "arm.yaml", True) if arm.kind == "large" else (d, False)
    load = load_once(checkpoint, large_only)
    if arm.kind != "large":
        return train_arm(cfg, arm, target_params, load, log), checkpoint, large_only, load
    d.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(d / "arm.yaml")
    return {"trainable_params": 0, "steps": 0}, checkpoint, large_only, load


def evaluate_arm(checkpoint: Path, tasks: dict, out: Path, *, large_only: bool, batch_size: int,
                 max_new_tokens: Optional[int], load: Optional[Callable[[], tuple]] = None,
                 prompt: Optional[dict] = None, log=print) -> list[dict]:
    """`eval --task` for `tasks` ({task: items}), once: the summary file is what a rerun finds, and an interrupted
    generation task continues after its last finished batch. `load`: gives the loaded checkpoint (load_once).
    `prompt`: how the facts questions are asked, {"shots", "hints"} of evaluate_tasks (facts_prompt)."""
    from .tasks import evaluate_tasks, progress_path, summary_path, write_results

    summaries = []
    for task, limit in tasks.items():
        answers = out / f"{task}.jsonl"
        if not summary_path(answers).is_file():
            rows, summary = evaluate_tasks(str(checkpoint), [task], large_only=large_only, limit=limit,
                                           batch_size=batch_size, max_new_tokens=max_new_tokens, resume_dir=out,
                                           loaded=load() if load else None, log=log,
                                           **(prompt if prompt and task == "facts" else {}))
            write_results(answers, rows, summary)
            progress_path(out, task).unlink(missing_ok=True)
        summaries += json.loads(summary_path(answers).read_text())
    return summaries


def speed_arm(load: Callable[[], tuple], out: Path, *, large_only: bool, speed: tuple) -> dict:
    """Decode tokens/s at batch 1 and 16 (tasks.decode_speed; `speed`: new tokens, timed repeats, prompt tokens) of
    the checkpoint `load` gives (load_once), once."""
    path = out / "speed.json"
    if not path.is_file():
        from .tasks import decode_speed, generator_for

        model, tok, cfg, _ = load()
        gen = generator_for(model.eval(), tok, cfg, large_only)
        new_tokens, repeats, prompt_tokens = speed
        atomic_write_json(path, {f"batch_{b}": decode_speed(gen, b, prompt_tokens, new_tokens, repeats)
                                 for b in (1, 16)})
    return json.loads(path.read_text())


def curve_arm(out: Path, suite: Suite, load: Callable[[], tuple], log=print) -> list[dict]:
    """Held-out accuracy of the kept checkpoints (step 0 and every steps / curve_points); a point evaluated
    earlier is read back, its checkpoint no longer needed (the experiment removes them). `load`: the arm's loaded
    model (load_once), into which each point's trained weights are put (with_weights)."""
    task, limit = suite.curve_task
    points = []
    steps = {int(p.name.removeprefix("step-")) for d in ("checkpoints", "curve") for p in (out / d).glob("step-*")}
    for step in sorted(steps):
        checkpoint = out / "checkpoints" / f"step-{step:08d}"
        (summary,) = evaluate_arm(checkpoint, {task: limit}, out / "curve" / f"step-{step:08d}", large_only=False,
                                  batch_size=16, max_new_tokens=suite.max_new_tokens,
                                  load=with_weights(load, checkpoint), log=log)
        points.append({"step": step, **{k: summary[k] for k in ("accuracy", "ci95", "n", "unseen_answers")
                                         if k in summary}})
    return points


def load_once(checkpoint: Path, large_only: bool) -> Callable[[], tuple]:
    """load_for_eval(checkpoint, large_only) on the first call, the same objects after: an arm's evaluations and
    its speed share one load (the 0.5B model takes seconds to load, a --quick evaluation about as long)."""
    from functools import cache

    from .loading import load_for_eval

    return cache(lambda: load_for_eval(checkpoint, large_only))


def with_weights(load: Callable[[], tuple], checkpoint: Path) -> Callable[[], tuple]:
    """load(), with the trained weights of `checkpoint` (a checkpoint of the same run) copied into its model: a
    curve point costs a read of the trained tensors, not another load of the frozen large model."""
    def swapped() -> tuple:
        model, *rest = load()
        model.load_weights_from(checkpoint)
        return (model, *rest)

    return swapped


def own_solutions(base: LLMModulesConfig, suite: Suite, out: Path, log=print) -> Path:
    """The large model's own solutions to the suite's training problems (the first data.max_examples, those the
    other arms train on) that reach the right answer (rejection sampling: its form, right), as conversations to
    train on; answered once by the large-alone arm (its eval/<task>.jsonl, resumable as every evaluation), the file
    written once beside them."""
    from .files import atomic_write_text

    task, n = suite.solutions, suite.data["max_examples"]
    large = ARMS["large-alone"]
    cfg = arm_config(base, suite, large, out / large.name)
    _, checkpoint, _, load = prepare_arm(cfg, large, None, log)
    path = out / large.name / f"{task}.solutions.jsonl"
    if not path.is_file():
        log(f"  the large model's own solutions: {n} {task} problems")
        evaluate_arm(checkpoint, {task: n}, out / large.name / "eval", large_only=True, batch_size=16,
                     max_new_tokens=suite.max_new_tokens, load=load, log=log)
        rows = [json.loads(ln) for ln in (out / large.name / "eval" / f"{task}.jsonl").read_text().splitlines()]
        right = [r for r in rows if r["correct"]]
        if not right:
            raise UserError(f"{out / large.name / 'eval' / f'{task}.jsonl'}: the large model answered none of {n} "
                            f"{task} problems right, so there is no own solution to train on")
        atomic_write_text(path, "".join(json.dumps({"messages": [
            {"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["output"]}]}) + "\n"
            for r in right))
    return path


# ==== The baselines (issue 48, items 5-7) ======================================================================
# What a practitioner would try before LLM Modules, each on the facts suites' data, steps and questions:
#   the 1.5B model few-shot: 5 train facts of the question's relation as earlier chat turns, no training;
#   the text hint: SmolLM2 fine-tuned (as smollm-ft-sentence) with the 1.5B model's own answer to each question in
#       its prompt, in training (its answers to the train facts, answered once) and in the test (large-alone-1.5b's
#       answers, the same file as that arm's evaluation);
#   LoRA on the 1.5B model (as lora-sentence; the rank for the combined model's trainable count, reported).
HINTS_FROM = "large-alone-1.5b"
BASELINES = (
    Arm("large-alone-1.5b-5shot", "large", {"large": LARGE_1_5B}, followup=True, shots=5,
        note="the 1.5B model alone, not trained, each question after 5 train facts of its relation answered (few-shot "
             "as chat turns; the same examples every run)"),
    Arm("smollm-ft-sentence-hint-1.5b", "finetune", ARMS["smollm-ft-sentence"].over, method="full", base="small",
        followup=True, hints_from=HINTS_FROM,
        note="SmolLM2 fine-tuned on whole-sentence answers, every question (train and test) followed by the 1.5B "
             "model's own answer to it (the text hint; its decode speed leaves out the 1.5B model's answer)"),
    Arm("lora-sentence-1.5b", "finetune", _merge(ARMS["lora-sentence"].over, {"large": LARGE_1_5B}), method="lora",
        base="large", followup=True, note="LoRA on the 1.5B model on whole-sentence facts answers (the rank for the "
                                          "combined model's trainable count)"),
)
ARMS.update((a.name, a) for a in BASELINES)
ARMS.update((a.name, a) for a in (_seeded(ARMS[n], s) for n in ("smollm-ft-sentence-hint-1.5b", "lora-sentence-1.5b")
                                  for s in (1, 2)))


def hint_source(arm: Arm) -> Arm:
    source = ARMS.get(arm.hints_from)
    if source is None or source.kind != "large" or source.shots:
        raise UserError(f"arm {arm.name} takes its hints from {arm.hints_from!r}, which is not an arm of the large "
                        "model alone asked the plain questions (kind large, no shots)")
    return source


def hinted_records(base: LLMModulesConfig, suite: Suite, arm: Arm, suite_dir: Path, log=print) -> Path:
    """The training conversations of a hint arm: the suite's train facts (the first data.max_examples, in the order
    every facts arm reads them), each question followed by the large model's answer to it (Fact.question), answered
    in the arm's data.facts_answer form. The large model (the arm's hints_from) answers the train facts once (task
    facts_train, resumable as every evaluation) and the suite's test questions too (its own evaluation, which
    facts_prompt reads back), both in its directory; the file is written once beside them."""
    from .benchmark_data import facts_split, find_data_dir
    from .files import atomic_write_text
    from .tasks import read_hints

    source = hint_source(arm)
    cfg = arm_config(base, suite, source, suite_dir / source.name)
    _, checkpoint, _, load = prepare_arm(cfg, source, None, log)
    form = arm_config(base, suite, arm, suite_dir / arm.name).data.facts_answer
    n = suite.data.get("max_examples")
    path = suite_dir / source.name / f"facts_train.hinted-{form}{'' if n is None else f'-{n}'}.jsonl"
    if not path.is_file():
        log(f"  the hints of {arm.name}: {source.name} answers {n or 'all'} train facts and the "
            f"{suite.tests['facts']} test questions")
        evaluate_arm(checkpoint, {"facts_train": n, "facts": suite.tests["facts"]}, suite_dir / source.name / "eval",
                     large_only=True, batch_size=16, max_new_tokens=suite.max_new_tokens, load=load, log=log)
        said = read_hints(suite_dir / source.name / "eval" / "facts_train.jsonl")
        train, _ = facts_split(find_data_dir(cfg.data.benchmark_dir, ["facts"]))
        hinted = [f.messages(form, said[f"facts_train/{f.relation}/{f.subject}"]) for f in train[:n]]
        atomic_write_text(path, "".join(json.dumps({"messages": m}) + "\n" for m in hinted))
    return path


def facts_prompt(arm: Arm, suite_dir: Path) -> Optional[dict]:
    """How `arm`'s facts questions are asked (evaluate_arm's `prompt`): its few-shot examples, its hints (the
    answers of its hints_from arm to the same questions, written by hinted_records); None: the plain questions."""
    if not (arm.shots or arm.hints_from):
        return None
    from .tasks import read_hints

    hints = read_hints(suite_dir / hint_source(arm).name / "eval" / "facts.jsonl") if arm.hints_from else None
    return {"shots": arm.shots, "hints": hints}
# ==== end of the baselines =====================================================================================


# ---- the experiment -------------------------------------------------------------------------------------------
def skip_reason(arm: Arm, suite: Suite) -> Optional[str]:
    """Why `arm` does not run in `suite` (it needs something the suite lacks), or None."""
    if arm.own_solutions and suite.solutions is None:
        return "it trains on the large model's own solutions, which this suite does not define"
    if arm.share is not None and suite.memory_steps is None:
        return "it takes a share of split steps, which this suite does not split; the facts-decisive suite does"
    if (arm.shots or arm.hints_from) and "facts" not in suite.tests:
        return "its few-shot examples or hints are for facts questions, which this suite does not test"
    return None


def _earlier_results(path: Path) -> Optional[dict]:
    """The results.json of earlier runs in the same output directory, if it can be read."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) and isinstance(earlier.get("suites"), dict) else None


def run_experiment(base: LLMModulesConfig, out: Path, *, suites: list[str], arms: Optional[list[str]],
                   quick: bool = False, log=print) -> dict:
    """Train, evaluate and report `arms` (None: each suite's own arms, else DEFAULT_ARMS) in every suite named."""
    t_start = time.perf_counter()
    table = QUICK if quick else SUITES
    earlier = _earlier_results(out / "results.json")
    if earlier is not None and earlier.get("quick") != quick:
        raise UserError(f"{out} holds {'--quick' if earlier.get('quick') else 'full'} results; run "
                        f"{'--quick' if quick else 'the full experiment'} in another --output-dir")
    results: dict = {"quick": quick, "suites": earlier["suites"] if earlier else {}, "arm_order": list(ARMS)}
    for name in suites:
        suite = table[name]
        log(f"\n=== suite {name}: {suite.steps} steps of batch {suite.batch_size}; tests {suite.tests} ===")
        target = trainable_count(arm_config(base, suite, ARMS["combined-paper"], out / name / "combined-paper"))
        per_arm = results["suites"].setdefault(name, {})  # the suite's arms from earlier runs stay
        for arm_name in arms if arms is not None else list(suite.arms) or DEFAULT_ARMS:
            arm = ARMS[arm_name]
            d = out / name / arm_name
            if reason := skip_reason(arm, suite):
                log(f"\n--- {name} / {arm_name}: skipped ({reason}) ---")
                continue
            receiver = train_receiver(base, suite, arm, out / name, log) if arm.starts_from else None
            solutions = own_solutions(base, suite, out / name, log) if arm.own_solutions else None
            if arm.hints_from:
                solutions = hinted_records(base, suite, arm, out / name, log)
            cfg = arm_config(base, suite, arm, d, solutions)
            log(f"\n--- {name} / {arm_name} ({time.perf_counter() - t_start:.0f} s) ---")
            trained, checkpoint, large_only, load = prepare_arm(cfg, arm, target, log)
            r: dict = {"note": arm.note, **trained}
            if receiver is not None:  # the steps and time of the fine-tuning it starts from count too
                r["starts_from"] = receiver
                r["total_steps"] = trained["steps"] + receiver["total_steps"]
            tests = {**suite.tests, **(suite.extra_tests if arm_name in suite.extra_arms else {})}
            r["eval"] = {s["task"]: s for s in evaluate_arm(checkpoint, tests, d / "eval", large_only=large_only,
                                                            batch_size=16, max_new_tokens=suite.max_new_tokens,
                                                            load=load, prompt=facts_prompt(arm, out / name),
                                                            log=log)}
            r["speed"] = speed_arm(load, d, large_only=large_only, speed=suite.speed)
            if arm.curve:
                r["curve"] = curve_arm(d, suite, load, log)
            del load
            # The step checkpoints (model and optimizer state, 7 GB for a 768-wide arm's five) have served the curve
            # once its points are written; best/ stays. Kept, they filled the disk before the last arms of a suite.
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
            per_arm[arm_name] = r
            atomic_write_json(out / "results.json", results)  # what is done so far
    results["wall_seconds"] = time.perf_counter() - t_start
    atomic_write_json(out / "results.json", results)
    from .report import write_report

    write_report(results, out)
    return results
