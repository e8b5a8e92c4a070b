"""Benchmarks nobody here wrote, offline, for any arm and for the large model alone (`llm-modules eval --task`).

Generation tasks, scored here: `facts` (held-out subjects, facts.py), `gsm8k`, `math500`. Greedy, batched; the
prompt is one user turn, formatted as the arm was trained (prompts.py) or, for the large model alone, by its own
chat template. Log-likelihood tasks, scored by lm-evaluation-harness (`acc`, `acc_norm`): `hellaswag`,
`arc_easy`, `arc_challenge`, through task YAMLs shipped in llm_modules/lm_eval_tasks/ that read the local files
(`--data-dir hub` runs lm-eval's standard tasks of the same names instead). The protocols are written down in
docs/benchmarks-tasks.md; this file is the code that implements them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import facts as facts_mod
from .benchmark_data import HUB, data_file, facts_split, find_data_dir, hub_rows, read_jsonl
from .errors import UserError
from .files import atomic_write_json

LM_EVAL_TASKS = Path(__file__).parent / "lm_eval_tasks"


# ---- generation tasks ----------------------------------------------------------------------------------------
@dataclass
class Item:
    id: str
    question: str  # the user turn
    gold: str
    meta: dict = field(default_factory=dict)  # written with each answer (e.g. the relation of a fact)
    fact: Optional[facts_mod.Fact] = None
    context: list = field(default_factory=list)  # turns before the question: few-shot examples (user, assistant)

    def conversation(self) -> list[dict]:
        return [*self.context, {"role": "user", "content": self.question}]


@dataclass(frozen=True)
class GenerationTask:
    name: str
    metric: str
    max_new_tokens: int
    stop: tuple[str, ...]
    load: Callable[[Optional[Path]], list[Item]]  # data dir (None: the hub) -> items, in a fixed order
    judge: Callable[[str, Item], tuple[Optional[str], bool]]  # model output -> (extracted answer, correct)


def _gsm8k_items(root: Optional[Path], split: str = "test") -> list[Item]:
    from .evaluate import extract_answer

    rows = (hub_rows("openai/gsm8k", "main", split) if root is None
            else read_jsonl(data_file(root, f"gsm8k/{split}.jsonl", "gsm8k")))
    name = "gsm8k" if split == "test" else f"gsm8k_{split}"
    return [Item(f"{name}/{i}", r["question"], extract_answer(r["answer"]) or "") for i, r in enumerate(rows)]


def _gsm8k_judge(output: str, item: Item) -> tuple[Optional[str], bool]:
    from .evaluate import extract_answer, is_correct

    answer = extract_answer(output)
    return answer, is_correct(answer, item.gold)


def _math500_items(root: Optional[Path]) -> list[Item]:
    rows = (hub_rows("HuggingFaceH4/MATH-500", None, "test") if root is None
            else read_jsonl(data_file(root, "math500/test.jsonl", "math500")))
    return [Item(r.get("unique_id", f"math500/{i}"), r["problem"], r["answer"],
                 {"subject": r.get("subject"), "level": r.get("level")}) for i, r in enumerate(rows)]


def _math500_judge(output: str, item: Item) -> tuple[Optional[str], bool]:
    """Math-Verify (Hugging Face's checker): the last boxed / LaTeX answer, compared with the gold symbolically."""
    from math_verify import parse, verify

    predicted = parse(output)
    answer = predicted[-1] if predicted and isinstance(predicted[-1], str) else None
    return answer, bool(predicted) and bool(verify(parse(f"${item.gold}$"), predicted))


def _facts_items(root: Optional[Path], shots: int = 0, hints: Optional[dict[str, str]] = None,
                 limit: Optional[int] = None) -> list[Item]:
    """The held-out facts. `shots`: that many train facts of the question's relation before it, as earlier turns
    answered with their objects (facts.shots; lm-eval's num_fewshot, as multi-turn chat); `hints`: {item id: a
    larger model's answer}, added to each question (Fact.question). Neither: the questions every arm is asked.
    `limit`: the first that many questions (only those need a hint)."""
    train, test = facts_split(root)
    priors = facts_mod.answer_priors(train)
    examples = facts_mod.shots(train, shots) if shots else None
    items = []
    for f in test[:limit]:
        item_id = f"facts/{f.relation}/{f.subject}"
        item = Item(item_id, f.question(_hint(hints, item_id)), f.objects[0],
                    {"relation": f.relation, "aliases": list(f.objects), **facts_mod.prior_flags(f, priors)}, f)
        if examples is not None:
            chosen = examples(f)
            item.context = [m for e in chosen for m in e.messages("object")]
            item.meta["shots"] = [e.subject for e in chosen]
        items.append(item)
    return items


def _facts_train_items(root: Optional[Path]) -> list[Item]:
    """The train facts asked as the held-out ones are (not a benchmark: the large model's answers to them are the
    text hint arm's training hints, experiment.hinted_records)."""
    train, _ = facts_split(root)
    return [Item(f"facts_train/{f.relation}/{f.subject}", f.question(), f.objects[0],
                 {"relation": f.relation, "aliases": list(f.objects)}, f) for f in train]


def _hint(hints: Optional[dict[str, str]], item_id: str) -> Optional[str]:
    if hints is None:
        return None
    if item_id not in hints:
        raise UserError(f"facts hints: no answer for {item_id}; the hints file must answer every question asked "
                        "(evaluate the large model on at least as many questions, same --limit or more)")
    return hints[item_id]


def read_hints(path: Path) -> dict[str, str]:
    """{item id: output} of an answers file written by `eval --task facts` (its JSONL): a larger model's answers,
    the text hint arm's hints."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"facts hints: {path} does not exist; write it with `llm-modules eval --task facts "
                        f"--large-only --checkpoint CONFIG --out {path}` (the experiment's large-alone-1.5b arm "
                        "writes <out>/facts/large-alone-1.5b/eval/facts.jsonl)")
    rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return {r["id"]: r["output"] for r in rows if "output" in r}


def _facts_judge(output: str, item: Item) -> tuple[Optional[str], bool]:
    answer = facts_mod.extract(output, item.fact)
    return answer, facts_mod.is_correct(answer, item.fact)


GENERATION_TASKS = {
    "facts": GenerationTask("facts", "exact match (normalized) on held-out subjects", 32, ("\n",), _facts_items,
                            _facts_judge),
    "gsm8k": GenerationTask("gsm8k", "exact match of the final number", 256, (), _gsm8k_items, _gsm8k_judge),
    # GSM8K's train problems under the same protocol: not a benchmark, the way to a model's own solutions to train
    # on (experiment.own_solutions: the large model's answers that reach the right number, rejection sampling).
    "gsm8k_train": GenerationTask("gsm8k_train", "exact match of the final number (GSM8K train problems)", 256, (),
                                  functools.partial(_gsm8k_items, split="train"), _gsm8k_judge),
    # The train subjects' facts under the same protocol: not a benchmark (see _facts_train_items).
    "facts_train": GenerationTask("facts_train", "exact match (normalized) on the train subjects", 32, ("\n",),
                                  _facts_train_items, _facts_judge),
    "math500": GenerationTask("math500", "Math-Verify equivalence of the final answer", 512, (), _math500_items,
                              _math500_judge),
}
# Log-likelihood tasks: our name -> (shipped YAML task over local files, lm-eval's standard task for the hub).
LOGLIKELIHOOD_TASKS = {
    "hellaswag": ("hellaswag_local", "hellaswag"),
    "arc_easy": ("arc_easy_local", "arc_easy"),
    "arc_challenge": ("arc_challenge_local", "arc_challenge"),
}
TASK_NAMES = (*GENERATION_TASKS, *LOGLIKELIHOOD_TASKS)


def parse_task_names(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASK_NAMES]
    if unknown or not names:
        raise UserError(f"--task: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(TASK_NAMES)} "
                        "(several comma-separated)")
    return list(dict.fromkeys(names))


# ---- who answers -------------------------------------------------------------------------------------------
def _decode(tokenizer, row: list[int]) -> tuple[str, int]:
    """(text, tokens) a row really generated: up to and including its eos (finished rows are padded after it)."""
    eos = tokenizer.eos_token_id
    n = row.index(eos) + 1 if eos is not None and eos in row else len(row)
    return tokenizer.decode(row[:n], skip_special_tokens=True), n


class ArmGenerator:
    """An LLMModules model answering prompts formatted exactly as its training formatted them."""

    def __init__(self, model):
        self.model, self.tokenizer = model, model.tokenizer

    def encode(self, conversation: list[dict]) -> list[int]:
        from .generate import prompt_batch

        return prompt_batch(self.model, [conversation])[0][0].tolist()

    def generate(self, conversations: list[list[dict]], max_new_tokens: int, stop: Sequence[str],
                 ignore_eos: bool = False) -> list[tuple[str, int]]:
        from .generate import prompt_batch

        ids, mask, extra = prompt_batch(self.model, conversations)
        never = {"eos_token_id": []} if ignore_eos else {}  # decode speed: every row runs max_new_tokens
        new = self.model.generate(ids, mask, max_new_tokens=max_new_tokens, stop=list(stop), model_kwargs=extra,
                                  **never)
        return [_decode(self.tokenizer, row) for row in new.tolist()]


class HFGenerator:
    """A Hugging Face causal LM answering through `transformers` `generate`: the large model alone with its
    tokenizer's own chat template (`training_format` None), or a fine-tuned baseline with the prompt format it was
    trained with (`training_format` = its data config)."""

    def __init__(self, lm, tokenizer, training_format=None):
        self.model, self.tokenizer, self.data = lm, tokenizer, training_format

    def encode(self, conversation: list[dict]) -> list[int]:
        if self.data is None:
            return list(self.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                                           return_dict=False))
        from .prompts import encode_prompt, with_system_prompt

        return encode_prompt(with_system_prompt(conversation, self.data.system_prompt), self.data.format,
                             self.tokenizer)

    def generate(self, conversations: list[list[dict]], max_new_tokens: int, stop: Sequence[str],
                 ignore_eos: bool = False) -> list[tuple[str, int]]:
        from .backbones import quiet_transformers
        from .vocab import pad

        tok = self.tokenizer
        ids, mask = pad([self.encode(c) for c in conversations], tok.pad_token_id)
        with quiet_transformers():  # the checkpoint's sampling defaults do not apply to greedy decoding
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      min_new_tokens=max_new_tokens if ignore_eos else None,
                                      do_sample=False, temperature=None, top_p=None, top_k=None,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      stop_strings=list(stop) or None, tokenizer=tok)
        return [_decode(tok, row) for row in out[:, ids.shape[1]:].tolist()]


def generator_for(model, tokenizer, cfg, large_only: bool):
    """Who answers: an LLMModules arm in its training format, the large model alone through its chat template, or
    a fine-tuned baseline (a plain Hugging Face model) in its training format."""
    from .model import LLMModules

    if isinstance(model, LLMModules):
        return ArmGenerator(model)
    return HFGenerator(model, tokenizer, None if large_only else cfg.data)


def speed_prompt(generator, tokens: int) -> list[dict]:
    """A user turn that this generator's prompt format turns into about `tokens` tokens (plain English words)."""
    words = "the quick brown fox jumps over the lazy dog and then it runs back home again".split()
    for n in range(1, 4 * tokens):
        conv = [{"role": "user", "content": " ".join(words[i % len(words)] for i in range(n))}]
        if len(generator.encode(conv)) >= tokens:
            return conv
    return conv


@torch.no_grad()
def decode_speed(generator, batch_size: int, prompt_tokens: int = 64, new_tokens: int = 48, repeats: int = 2
                 ) -> float:
    """Decode tokens/s of greedy generation: `batch_size` prompts of about `prompt_tokens` tokens, every row made
    to generate `new_tokens` (eos ignored), prefill included; the best of `repeats` runs after a warm-up. The
    warm-up is short (one prompt, 2 new tokens: the first call's one-time costs); a whole run at batch 16 as warm-up
    cost as much as the timing itself (5 s through the 0.5B model on 2 cores) and changed the first timed run by
    about 4%."""
    conv = speed_prompt(generator, prompt_tokens)
    generator.generate([conv], 2, (), ignore_eos=True)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generator.generate([conv] * batch_size, new_tokens, (), ignore_eos=True)
        best = min(best, time.perf_counter() - t0)
    return batch_size * new_tokens / best


def progress_path(resume_dir: Path, task: str) -> Path:
    """Where run_generation records the finished batches of `task` (see its `progress`)."""
    return Path(resume_dir) / f"{task}.progress.json"


def _finished_batches(progress: Optional[Path], key: dict) -> list[dict]:
    """The batches a progress file records for the same task, items, batch size and budget; none otherwise."""
    if progress is None or not progress.is_file():
        return []
    try:
        saved = json.loads(progress.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return saved.get("batches", []) if isinstance(saved, dict) and {k: saved.get(k) for k in key} == key else []


@torch.no_grad()
def run_generation(task: GenerationTask, generator, items: list[Item], batch_size: int,
                   max_new_tokens: Optional[int] = None, progress: Optional[Path] = None,
                   model: Optional[dict] = None) -> tuple[list[dict], dict]:
    """Every item answered (length-sorted batches, answers put back in item order) and judged; (rows, timing).
    With `progress`, each finished batch is recorded there (rewritten atomically), and a rerun with the same
    `model` (what identifies who answers), items, batch size and budget continues after the last finished batch:
    the batches are those of one uninterrupted run, so are the answers, and the timing sums both runs' batches.
    The caller removes the file once it has written the answers."""
    budget = max_new_tokens or task.max_new_tokens
    order = sorted(range(len(items)), key=lambda i: -sum(len(m["content"]) for m in items[i].conversation()))
    key = {"task": task.name, "model": model, "ids": [items[i].id for i in order], "batch_size": batch_size,
           "budget": budget}
    if any(item.context or item.question != (item.fact.question() if item.fact else item.question)
           for item in items):  # few-shot or hinted prompts: a progress file of plain ones is not theirs
        key["prompts"] = hashlib.sha256(json.dumps([i.conversation() for i in items]).encode()).hexdigest()
    done = _finished_batches(progress, key)
    position = {item.id: i for i, item in enumerate(items)}
    rows: list[Optional[dict]] = [None] * len(items)
    for r in (r for batch in done for r in batch["rows"]):
        rows[position[r["id"]]] = r
    starts = range(len(done) * batch_size, len(order), batch_size)
    for start in tqdm(starts, desc=task.name, leave=False, initial=len(done), total=len(done) + len(starts)):
        idx, t0 = order[start:start + batch_size], time.perf_counter()
        outs = generator.generate([items[i].conversation() for i in idx], budget, task.stop)
        for i, (text, n) in zip(idx, outs):
            answer, correct = task.judge(text, items[i])
            rows[i] = {"task": task.name, "id": items[i].id, "question": items[i].question, "output": text,
                       "answer": answer, "gold": items[i].gold, "correct": bool(correct), **items[i].meta}
        done.append({"rows": [rows[i] for i in idx], "tokens": sum(n for _, n in outs),
                     "seconds": time.perf_counter() - t0})
        if progress is not None:
            atomic_write_json(progress, {**key, "batches": done})
    seconds, tokens = sum(b["seconds"] for b in done), sum(b["tokens"] for b in done)
    return rows, {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9)}


# ---- scoring summaries -----------------------------------------------------------------------------------------
def wilson(correct: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion (sensible at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def proportion(flags: list) -> dict:
    """{"n", "correct", "accuracy", "ci95"} of a list of verdicts."""
    n, k = len(flags), sum(map(bool, flags))
    return {"n": n, "correct": k, "accuracy": k / n if n else 0.0, "ci95": wilson(k, n)}


def proportion_text(p: dict) -> str:
    """A proportion() as "k/n = accuracy [lo, hi]"."""
    return f"{p['correct']}/{p['n']} = {p['accuracy']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"


def summarize(task: str, metric: str, flags: list[bool], **extra) -> dict:
    return {"task": task, "metric": metric, **proportion(flags), **extra}


def facts_extra(rows: list[dict]) -> dict:
    """What a facts summary adds: per-relation and macro accuracy; the accuracy on the questions whose answer is no
    train answer of their relation (knowledge of the subject is the only way to them); the accuracy of answering
    every question with its relation's most frequent train answer (the floor a model reaches with the prior alone)."""
    rel = per_relation(rows)
    return {"per_relation": rel, "macro_accuracy": sum(r["accuracy"] for r in rel.values()) / max(len(rel), 1),
            "unseen_answers": proportion([r["correct"] for r in rows if not r["answer_in_train"]]),
            "prior_baseline": proportion([r["prior_correct"] for r in rows])}


def per_relation(rows: list[dict]) -> dict:
    groups: dict[str, list[bool]] = {}
    for r in rows:
        groups.setdefault(r["relation"], []).append(r["correct"])
    return {rel: proportion(v) for rel, v in sorted(groups.items())}


# ---- log-likelihood tasks through lm-evaluation-harness --------------------------------------------------------
@functools.cache
def task_manager(root: Optional[Path]):
    """lm-eval's TaskManager: its own tasks (root None), or ours reading the local copies under `root`. Built once
    per process (it indexes every task file lm-eval ships, about 10 s), since each evaluation builds fresh tasks."""
    from lm_eval.tasks import TaskManager

    return TaskManager() if root is None else TaskManager(include_path=str(LM_EVAL_TASKS),
                                                           metadata={"data_dir": str(root)})


def run_loglikelihood(names: list[str], lm, root: Optional[Path], limit: Optional[int]) -> dict[str, tuple]:
    """{name: (rows, summary fields)} for hellaswag / arc_* through lm-eval with `lm` (a harness.LLMModulesLM)."""
    import lm_eval

    lm_names = {n: LOGLIKELIHOOD_TASKS[n][0 if root is not None else 1] for n in names}
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=list(lm_names.values()), limit=limit,
                                  task_manager=task_manager(root), log_samples=True, bootstrap_iters=0)
    seconds = time.perf_counter() - t0
    total = sum(len(res["samples"][t]) for t in lm_names.values())
    out = {}
    for name, lm_name in lm_names.items():
        rows = [{"task": name, "id": f"{name}/{s['doc_id']}", "gold": s["target"],
                 "acc": bool(s["acc"]), "acc_norm": bool(s["acc_norm"]), "correct": bool(s["acc_norm"])}
                for s in sorted(res["samples"][lm_name], key=lambda s: s["doc_id"])]
        share = seconds * len(rows) / max(total, 1)  # one harness run: its time shared by item count
        out[name] = (rows, {"acc": sum(r["acc"] for r in rows) / max(len(rows), 1),
                            "acc_ci95": wilson(sum(r["acc"] for r in rows), len(rows)),
                            "seconds": share, "items_per_s": len(rows) / max(share, 1e-9),
                            "lm_eval_task": lm_name})
    return out


# ---- the command -----------------------------------------------------------------------------------------------
def evaluate_tasks(checkpoint: str, names: list[str], *, large_only: bool = False, data_dir: Optional[str] = None,
                   limit: Optional[int] = None, batch_size: int = 16, max_new_tokens: Optional[int] = None,
                   resume_dir: Optional[Path] = None, loaded: Optional[tuple] = None, shots: int = 0,
                   hints: Optional[dict[str, str]] = None, log=print) -> tuple[list[dict], list[dict]]:
    """Run benchmark `names` on a checkpoint (or its large model alone); (per-item rows, one summary per task).
    `max_new_tokens` replaces the generation tasks' own budgets (facts 32, gsm8k 256, math500 512). With
    `resume_dir`, the generation tasks record their finished batches there (progress_path) and continue after them.
    `loaded`: load_for_eval(checkpoint, large_only) done already (a caller evaluating one model several times).
    `shots`, `hints`: the facts task's few-shot examples and text hints (_facts_items)."""
    from .loading import load_for_eval

    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give a positive number of items per task")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: give a positive integer")
    if shots < 0:
        raise UserError(f"--num-fewshot {shots}: give 0 or a positive number of examples")
    if (shots or hints is not None) and names != ["facts"]:
        raise UserError(f"--num-fewshot and hints are for --task facts alone (asked: {', '.join(names)}); run the "
                        "other tasks in a command of their own")
    root = find_data_dir(data_dir, names)
    loaded = loaded or load_for_eval(checkpoint, large_only)
    generator = generator_for(loaded[0].eval(), loaded[1], loaded[2], large_only)
    rows: list[dict] = []
    summaries: list[dict] = []
    for name in [n for n in names if n in GENERATION_TASKS]:
        task = GENERATION_TASKS[name]
        items = (task.load(root, shots, hints, limit) if shots or hints is not None else task.load(root)[:limit])
        log(f"{name}: {len(items)} items, greedy, at most {max_new_tokens or task.max_new_tokens} new tokens, "
            f"batch {batch_size}")
        got, timing = run_generation(task, generator, items, batch_size, max_new_tokens,
                                     progress_path(resume_dir, name) if resume_dir is not None else None,
                                     model={"checkpoint": str(checkpoint), "large_only": large_only})
        extra = facts_extra(got) if name == "facts" else {}
        summaries.append(summarize(name, task.metric, [r["correct"] for r in got], **timing, **extra))
        rows += got
    mc = [n for n in names if n in LOGLIKELIHOOD_TASKS]
    if mc:
        log(f"{', '.join(mc)}: log-likelihood of each choice through lm-evaluation-harness, batch {batch_size}")
        try:
            from .harness import LLMModulesLM
        except ImportError as e:  # lm-eval is an optional extra
            raise UserError(str(e)) from None
        # large_only=True: a plain Hugging Face causal LM (the large model alone, or a fine-tuned baseline)
        lm = LLMModulesLM(loaded=loaded, large_only=isinstance(generator, HFGenerator), batch_size=batch_size)
        for name, (got, extra) in run_loglikelihood(mc, lm, root, limit).items():
            summaries.append(summarize(name, "acc_norm (lm-eval; acc also given)", [r["correct"] for r in got],
                                       **extra))
            rows += got
    order = {n: i for i, n in enumerate(names)}
    summaries.sort(key=lambda s: order[s["task"]])
    for s in summaries:
        s.update(model=str(checkpoint), large_only=large_only, data=str(root) if root else HUB, limit=limit,
                 batch_size=batch_size)
    return rows, summaries


def table(summaries: list[dict]) -> str:
    lines = ["| task | n | metric | accuracy | 95% CI | speed |", "|---|---|---|---|---|---|"]
    for s in summaries:
        speed = (f"{s['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in s else f"{s['items_per_s']:.2f} items/s")
        lines.append(f"| {s['task']} | {s['n']} | {s['metric']} | {s['accuracy']:.3f} | "
                     f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | {speed} |")
    for s in summaries:
        if "acc" in s:
            lines.append(f"\n{s['task']}: acc {s['acc']:.3f} [{s['acc_ci95'][0]:.3f}, {s['acc_ci95'][1]:.3f}]")
        if "unseen_answers" in s:
            lines.append(f"\nfacts whose answer is no train answer of the relation: "
                         f"{proportion_text(s['unseen_answers'])}; the relation's most frequent train answer for "
                         f"every question: {proportion_text(s['prior_baseline'])}")
        if "per_relation" in s:
            lines.append(f"\nfacts per relation (macro accuracy {s['macro_accuracy']:.3f}):")
            lines += [f"  {rel}: {r['accuracy']:.3f} of {r['n']}" for rel, r in s["per_relation"].items()]
    return "\n".join(lines)


def default_out(checkpoint: str, large_only: bool) -> Path:
    label = re.sub(r"[^\w.-]+", "_", str(Path(checkpoint)).strip("./")) or "model"
    return Path("runs") / "eval" / f"{label}{'-large-only' if large_only else ''}.jsonl"


def summary_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


def write_results(out: Path, rows: list[dict], summaries: list[dict]) -> None:
    """The per-item answers (JSONL at `out`) and the summaries (summary_path(out)), each written atomically."""
    from .files import atomic_write_json, atomic_write_text

    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(summary_path(out), summaries)
