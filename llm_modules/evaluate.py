"""Evaluation: held-out loss / perplexity on target tokens, final-answer extraction and exact-match accuracy."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import torch
from tqdm.auto import tqdm

from .data import Example, collate
from .generate import prompt_batch

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?"


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a worked solution: `#### N` (GSM8K), `\\boxed{...}`, the text inside
    <|begin_of_solution|>...<|end_of_solution|>, else the last number."""
    m = re.search(r"####\s*([^\n]+)", text)
    if m:
        return m.group(1).strip()
    boxed = text.rfind("\\boxed{")
    if boxed >= 0:
        depth, start = 0, boxed + len("\\boxed{")
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth < 0:
                return text[start:i].strip()
    m = re.search(r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", text, re.S)
    if m:
        inner = extract_answer(m.group(1)) if ("####" in m.group(1) or "\\boxed{" in m.group(1)) else None
        return inner or m.group(1).strip()
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None


def normalize(answer: Optional[str]) -> Optional[str]:
    """Canonical form for comparison: numbers by value (1,000 == 1000.0 == $1000; 2/4 == 1/2), else trimmed text."""
    if answer is None:
        return None
    a = answer.strip().rstrip(".").replace(",", "").replace("$", "").strip()
    try:
        value = Fraction(a)
        return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    except (ValueError, ZeroDivisionError):
        return " ".join(a.lower().split())


def is_correct(predicted: Optional[str], gold: Optional[str]) -> bool:
    return predicted is not None and gold is not None and normalize(predicted) == normalize(gold)


@dataclass
class LossResult:
    loss: float  # mean nats per target token
    perplexity: float
    tokens: int


@torch.no_grad()
def heldout_loss(model, examples: list[Example], *, batch_size: int = 8, features=None) -> LossResult:
    """Token-weighted mean next-token loss over target (label != -100) tokens; `features` = SplitFeatures."""
    model.eval()
    pad = model.tokenizer.pad_token_id
    total, count = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="held-out loss", leave=False):
        idx = list(range(start, min(start + batch_size, len(examples))))
        batch = collate([examples[i] for i in idx], pad)
        source = features.batch(idx, batch["input_ids"].shape[1]) if features is not None else None
        memory = {k: batch[k] for k in ("memory_ids", "memory_mask") if k in batch}  # coupling "prompt"
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], source_states=source,
                    return_logits=False, **memory)
        total += float(out.loss_sum)
        count += out.num_targets
    loss = total / max(1, count)
    return LossResult(loss, math.exp(min(loss, 50.0)), count)


def _prompt_and_gold(example: Example) -> tuple[list[dict], Optional[str]]:
    messages = example.record.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], extract_answer(messages[last]["content"])


@torch.no_grad()
def answer_accuracy(model, examples: list[Example], *, max_new_tokens: int = 128, batch_size: int = 8,
                    stop: tuple[str, ...] = ()) -> list[dict]:
    """Greedy answers to held-out prompts (formatted as in training), one dict per example with the verdict."""
    model.eval()
    tok = model.tokenizer
    rows = []
    usable = [e for e in examples if e.record is not None and len(e.record.messages) > 1]
    for start in tqdm(range(0, len(usable), batch_size), desc="answers", leave=False):
        chunk = usable[start:start + batch_size]
        prompts = [_prompt_and_gold(e) for e in chunk]
        input_ids, mask, extra = prompt_batch(model, [p for p, _ in prompts])
        new = model.generate(input_ids, mask, max_new_tokens=max_new_tokens, stop=list(stop), model_kwargs=extra)
        for (messages, gold), out, record in zip(prompts, new, (e.record for e in chunk)):
            text = tok.decode([t for t in out.tolist() if t != tok.pad_token_id], skip_special_tokens=True)
            pred = extract_answer(text)
            row = {"prompt": messages[-1]["content"], "output": text, "answer": pred, "gold": gold,
                   "correct": is_correct(pred, gold)}
            if record.source.startswith("reasoning-gym:") and pred is not None:
                from .reasoning_tasks import reasoning_gym_score

                data = model.config.data  # the task's own verdict (e.g. numeric tolerance, set equality)
                row["task_score"] = reasoning_gym_score(record.source, record.line, pred, data.reasoning_gym_size,
                                                        data.seed)
            rows.append(row)
    return rows
