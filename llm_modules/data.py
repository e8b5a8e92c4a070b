"""Datasets: records -> conversations -> (input_ids, labels), a fixed train/val split, collation, batching.

Records come from local .json / .jsonl / .parquet files, Hugging Face dataset ids, or reasoning-gym generators,
in four shapes, all normalized to [{"role": "system" | "user" | "assistant", "content": str}]:
  ShareGPT / Bespoke-Stratos  {"system"?, "conversations": [{"from": human|user|gpt|assistant|system, "value"}]}
  OpenAI                      {"messages": [{"role", "content"}]}
  GSM8K                       {"question", "answer"} (the answer keeps its "#### N" final line)
  plain text                  {"text"} (the whole text is a target)
Labels are not shifted (the model shifts, Hugging Face convention); every assistant turn ends with eos, which
keeps its label even when pad id == eos id, because tokens are masked by position, never by id.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

import torch

from .config import DataConfig, LLMModulesConfig
from .errors import UserError
from .prompts import TemplateRejected, encode_prompt, encode_segments, render_training, with_system_prompt
from .reasoning_tasks import reasoning_gym_items
from .vocab import pad

IGNORE_INDEX = -100
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
ROLE_ALIASES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# Generators whose problems come from an evaluation set: training on them leaks the test set.


class Record(NamedTuple):
    source: str  # file, dataset id or "reasoning-gym:TASK"
    line: int  # line of a .json/.jsonl file, 1-based row of a parquet file / dataset, item number of a generator
    messages: list


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken; not shifted
    record: Optional[Record] = None  # where it came from (evaluation regenerates answers from its messages)
    memory_ids: Optional[list[int]] = None  # coupling "prompt": the prompt in the large model's tokenizer

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataBundle:
    train: list[Example]
    val: list[Example]
    stats: dict
    skipped: list[tuple[str, int, str]]  # (source, line, problem) of each malformed record skipped


class BadRecord(ValueError):
    """A problem with one record; the caller adds where it is."""


# ---- reading ------------------------------------------------------------------------------------------------
def read_records(path: str, *, hub_subset: Optional[str] = None, hub_split: str = "train",
                 skip_bad: bool = False, skipped: Optional[list] = None) -> list[Record]:
    """Normalized records of a local file or a Hugging Face dataset id ("id" or "id:split").

    A malformed record raises UserError("{file}:{line}: {problem}"), or with `skip_bad` is appended to
    `skipped` as (file, line, problem).
    """
    skipped = [] if skipped is None else skipped
    source, rows = _open_source(path, hub_subset, hub_split)
    out = []
    for line, row in rows:
        try:
            if isinstance(row, BadRecord):
                raise row
            out.append(Record(source, line, normalize(row)))
        except BadRecord as e:
            _bad(source, line, str(e), skip_bad, skipped)
    return out


def _bad(source: str, line: int, problem: str, skip_bad: bool, skipped: list) -> None:
    if not skip_bad:
        raise UserError(f"{source}:{line}: {problem}; fix the record, or set data.skip_bad: true to skip bad records")
    skipped.append((source, line, problem))


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists() or Path(path).suffix.lower() in LOCAL_SUFFIXES or path[:1] in "/.~"


def _open_source(path: str, subset: Optional[str], split: str) -> tuple[str, Iterable]:
    if not _is_local(path):
        name, _, explicit = path.partition(":")
        split = explicit or split
        return f"{name}[{split}]", _hub_rows(name, subset, split)
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: file does not exist; check data.path / data.val_path")
    suffix = p.suffix.lower()
    if p.is_dir() or suffix not in LOCAL_SUFFIXES:
        raise UserError(f"{path}: unsupported file type {suffix or '(directory)'}; give a .json, .jsonl or .parquet "
                        "file, or a Hugging Face dataset id")
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}
    return str(path), readers[suffix](p)


def _jsonl_rows(p: Path) -> Iterator[tuple[int, object]]:
    with open(p, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, BadRecord(f"not valid UTF-8 (byte {e.start + 1} of the line); save the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                yield n, json.loads(text)
            except json.JSONDecodeError as e:
                yield n, BadRecord(f"invalid JSON ({e.msg} at column {e.colno})")


def _json_rows(p: Path) -> Iterator[tuple[int, object]]:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{p}:{line}: not valid UTF-8; save the file as UTF-8") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        return _array_items(text, _key_value_start(text, "data"))
    if not isinstance(doc, list):
        raise UserError(f"{p}:1: expected a list of records or {{\"data\": [...]}}, got a JSON {type(doc).__name__}")
    return _array_items(text, _skip_ws(text, 0))


_DECODER = json.JSONDecoder()


def _skip_ws(text: str, i: int) -> int:
    while text[i] in " \t\r\n":
        i += 1
    return i


def _key_value_start(text: str, key: str) -> int:
    # Walk the (already validated) top-level object to where `key`'s value starts.
    i = _skip_ws(text, _skip_ws(text, 0) + 1)
    while True:
        name, i = _DECODER.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ':'
        if name == key:
            return i
        _, i = _DECODER.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past ','


def _array_items(text: str, i: int) -> Iterator[tuple[int, object]]:
    # Decode the array starting at text[i] == "[" item by item, to know each record's line.
    i, line, counted = _skip_ws(text, i + 1), 1, 0
    while text[i] != "]":
        line, counted = line + text.count("\n", counted, i), i
        value, i = _DECODER.raw_decode(text, i)
        yield line, value
        i = _skip_ws(text, i)
        i = _skip_ws(text, i + 1) if text[i] == "," else i


def _parquet_rows(p: Path) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged or non-parquet file
        raise UserError(f"{p}: not a readable parquet file ({e})") from None
    return enumerate(rows, 1)


def _hub_rows(name: str, subset: Optional[str], split: str) -> Iterator[tuple[int, object]]:
    try:
        import datasets

        rows = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # offline, unknown id / subset / split: all for the user to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{name}: could not load Hugging Face dataset (subset={subset}, split={split}): {first}; "
                        "check the id, data.hub_subset, data.hub_split and network access, or give a local "
                        "file") from None
    return enumerate(rows, 1)


# ---- record shapes ------------------------------------------------------------------------------------------
def normalize(record: object) -> list[dict]:
    """One record of any supported shape -> [{"role", "content"}]; raises BadRecord with the problem."""
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        messages = _turns(record["conversations"], "conversations", "from", "value")
        if record.get("system") is not None:
            messages = [{"role": "system", "content": _text(record, "system", allow_empty=True)}] + messages
    elif "messages" in record:
        messages = _turns(record["messages"], "messages", "role", "content")
    elif "question" in record or "answer" in record:
        messages = [{"role": "user", "content": _text(record, "question", allow_empty=True)},
                    {"role": "assistant", "content": _text(record, "answer")}]
    elif "text" in record:
        messages = [{"role": "assistant", "content": _text(record, "text")}]
    else:
        raise BadRecord(f"missing field: has {sorted(record)}, needs one of conversations, messages, "
                        "question + answer, text")
    messages = [m for m in messages if not (m["role"] == "system" and not m["content"])]
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn, so nothing to learn")
    return messages


def _text(obj: dict, key: str, where: str = "", allow_empty: bool = False) -> str:
    name = repr(where + key)
    if key not in obj:
        raise BadRecord(f"missing field {name}")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord(f"{name} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRecord(f"empty {name}")
    return value


def _turns(turns: object, name: str, role_key: str, content_key: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"{name!r} must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        where = f"{name}[{i}]."
        if not isinstance(turn, dict):
            raise BadRecord(f"{name}[{i}] must be an object with {role_key!r} and {content_key!r}")
        raw = _text(turn, role_key, where)
        role = ROLE_ALIASES.get(raw.lower())
        if role is None:
            raise BadRecord(f"unknown role {raw!r} in {name}[{i}]; allowed: {', '.join(ROLE_ALIASES)}")
        if role == "assistant" and isinstance(turn.get(content_key), str) and not turn[content_key].strip():
            raise BadRecord(f"empty assistant turn {name}[{i}]")
        out.append({"role": role, "content": _text(turn, content_key, where, allow_empty=True)})
    return out



# ---- tokenization -------------------------------------------------------------------------------------------
def tokenize(messages: list[dict], tokenizer, *, style: str = "paper", system_prompt: str = "paper",
             loss_on: str = "assistant") -> Example:
    """One conversation -> Example. The record's own system turn wins over `system_prompt`; labels are
    IGNORE_INDEX on every token outside an assistant turn (none masked when loss_on == "all")."""
    segments = render_training(with_system_prompt(messages, system_prompt), style, tokenizer)
    ids, flags = encode_segments(segments, style, tokenizer)
    labels = [t if f or loss_on == "all" else IGNORE_INDEX for t, f in zip(ids, flags, strict=True)]
    return Example(ids, labels)


# ---- datasets -----------------------------------------------------------------------------------------------
def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Fixed (train, val) record indices: one permutation drawn from `seed`, never re-drawn."""
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 and n > 1 else 0
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def build_datasets(cfg: DataConfig, tokenizer, *, log: Callable[[str], None] = print,
                   allow_test_derived: bool = False, memory_tokenizer=None) -> DataBundle:
    """Read, normalize, split (by `cfg.seed`, once) and tokenize; drop examples over `cfg.max_length` tokens.

    `allow_test_derived` (or a `cfg.allow_test_derived` field) permits gsm_symbolic / GSM8K test in training.
    With `memory_tokenizer` (coupling "prompt") each example also carries the prompt in that tokenizer and takes
    its loss on the final answer only (earlier turns are in the memory).
    """
    allow = allow_test_derived or getattr(cfg, "allow_test_derived", False)
    skipped: list[tuple[str, int, str]] = []
    records = _training_records(cfg, skipped, allow)
    records, duplicates = _dedupe(records)
    if cfg.max_examples is not None:
        records = records[: cfg.max_examples]
    if cfg.val_path:
        train_recs = records
        val_recs = read_records(cfg.val_path, hub_subset=cfg.hub_subset, hub_split="validation",
                                skip_bad=cfg.skip_bad, skipped=skipped)
    elif cfg.reasoning_gym_val_tasks:  # split by template: whole tasks held out, none of their items trained on
        overlap = set(cfg.reasoning_gym_val_tasks) & set(cfg.reasoning_gym_tasks)
        if overlap:
            raise UserError(f"data.reasoning_gym_val_tasks: {', '.join(sorted(overlap))} also in "
                            "data.reasoning_gym_tasks; a held-out task must not be trained on")
        train_recs = records
        val_recs = [Record(*item) for item in reasoning_gym_items(
            list(cfg.reasoning_gym_val_tasks), cfg.reasoning_gym_size, cfg.seed, allow_test_derived=True)]
    else:
        train_idx, val_idx = split_indices(len(records), cfg.val_fraction, cfg.seed)
        train_recs, val_recs = [records[i] for i in train_idx], [records[i] for i in val_idx]
    train, train_long, longest = _examples(train_recs, tokenizer, cfg, skipped, memory_tokenizer)
    val, val_long, _ = _examples(val_recs, tokenizer, cfg, skipped, memory_tokenizer)
    stats = {"records": len(records), "duplicates": duplicates, "malformed": len(skipped), "train": len(train),
             "train_too_long": train_long, "val": len(val), "val_too_long": val_long,
             "longest_train_tokens": longest, "max_length": cfg.max_length,
             "train_tokens": sum(map(len, train)),
             "train_target_tokens": sum(sum(t != IGNORE_INDEX for t in e.labels) for e in train)}
    log(f"data: {len(records)} records ({duplicates} duplicates dropped, {len(skipped)} malformed skipped); "
        f"train {len(train)} kept, {train_long} over max_length={cfg.max_length}; "
        f"val {len(val)} kept, {val_long} over max_length")
    if not train:
        raise UserError(f"data: no training examples left: {len(train_recs)} training records, {train_long} longer "
                        f"than data.max_length={cfg.max_length} tokens (longest {longest}), {len(skipped)} "
                        "malformed; raise data.max_length or use shorter examples")
    return DataBundle(train, val, stats, skipped)


def _training_records(cfg: DataConfig, skipped: list, allow: bool) -> list[Record]:
    if not cfg.path and not cfg.reasoning_gym_tasks and not cfg.benchmarks:
        raise UserError("data: no training data; set data.path (a file or dataset id), data.reasoning_gym_tasks or "
                        "data.benchmarks")
    records = []
    if cfg.path:
        if not allow and _is_gsm8k_test(cfg.path, cfg.hub_split):
            raise UserError(f"data.path: {cfg.path} is GSM8K test, the evaluation set; train on GSM8K train "
                            "(or set data.allow_test_derived: true if GSM8K test is not your evaluation)")
        records += read_records(cfg.path, hub_subset=cfg.hub_subset, hub_split=cfg.hub_split,
                                skip_bad=cfg.skip_bad, skipped=skipped)
    if cfg.reasoning_gym_tasks:
        items = reasoning_gym_items(list(cfg.reasoning_gym_tasks), cfg.reasoning_gym_size, cfg.seed,
                                    allow_test_derived=allow)
        records += [Record(*item) for item in items]
    if cfg.benchmarks:
        from .benchmark_data import train_records

        records += [Record(*r) for r in train_records(list(cfg.benchmarks), cfg.benchmark_dir, cfg.facts_answer)]
    return records


def _is_gsm8k_test(path: str, hub_split: str) -> bool:
    if "gsm8k" not in path.lower():
        return False
    if _is_local(path):
        return Path(path).name.startswith("test")
    return (path.partition(":")[2] or hub_split) == "test"


def _dedupe(records: list[Record]) -> tuple[list[Record], int]:
    # Identical conversations would otherwise land on both sides of the split.
    seen, out = set(), []
    for r in records:
        key = json.dumps(r.messages, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out, len(records) - len(out)


def _examples(records: list[Record], tokenizer, cfg: DataConfig, skipped: list,
              memory_tokenizer=None) -> tuple[list[Example], int, int]:
    out, too_long, longest = [], 0, 0
    for r in records:
        try:
            ex = tokenize(r.messages, tokenizer, style=cfg.format, system_prompt=cfg.system_prompt,
                          loss_on=cfg.loss_on)
            if memory_tokenizer is not None:
                add_memory(ex, r.messages, tokenizer, memory_tokenizer, cfg)
        except TemplateRejected as e:
            _bad(r.source, r.line, str(e), cfg.skip_bad, skipped)
            continue
        ex.record = r
        longest = max(longest, len(ex))
        if len(ex) > cfg.max_length:
            too_long += 1
        else:
            out.append(ex)
    return out, too_long, longest


def add_memory(ex: Example, messages: list[dict], tokenizer, memory_tokenizer, cfg: DataConfig) -> None:
    """The prompt coupling's memory: everything before the final answer, in the large model's tokenizer; the loss
    is kept on that final answer only, since the memory already shows the earlier turns to every position."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = with_system_prompt(messages[:last], cfg.system_prompt) if last else []
    # A plain text has no prompt: its memory is the single eos token (nothing to read, nothing leaked).
    ex.memory_ids = (encode_prompt(prompt, cfg.format, memory_tokenizer) if prompt
                     else [memory_tokenizer.eos_token_id])
    if last:
        start = len(encode_prompt(prompt, cfg.format, tokenizer))  # where the final answer begins
        ex.labels = [IGNORE_INDEX] * start + ex.labels[start:]


# ---- batching -----------------------------------------------------------------------------------------------
def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded LongTensors input_ids / attention_mask / labels (labels padded with IGNORE_INDEX)."""
    input_ids, attention_mask = pad([e.input_ids for e in examples], pad_id, left=False)
    out = {"input_ids": input_ids, "attention_mask": attention_mask,
           "labels": pad([e.labels for e in examples], IGNORE_INDEX, left=False)[0]}
    if examples[0].memory_ids is not None:  # coupling "prompt": the prompts in the large tokenizer, right-padded
        # id 0: any vocabulary has it; masked anyway
        out["memory_ids"], out["memory_mask"] = pad([e.memory_ids for e in examples], 0, left=False)
    return out


class LengthGroupedBatches:
    """Batches of indices with similar lengths, so little compute goes to padding.

    Each epoch: shuffle all indices, sort by length inside mega-chunks of `chunk_batches` batches, cut into
    batches, shuffle the batch order. Deterministic given (seed, epoch); every index once per epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, chunk_batches: int = 50):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.chunk = batch_size * chunk_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        out = []
        for c in range(0, len(order), self.chunk):
            chunk = sorted(order[c : c + self.chunk], key=lambda i: -self.lengths[i])
            out += [chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch))

    def iter_from(self, epoch: int, k: int) -> Iterator[list[int]]:
        """The batches of `epoch` after its first `k` (resume mid-epoch exactly)."""
        return iter(self.batches(epoch)[k:])


def load_data(cfg: LLMModulesConfig, tokenizer=None, text_tokenizer=None, log=print) -> tuple[DataBundle, object]:
    """The tokenized data and the large model's tokenizer (coupling "prompt": the text in the small model's
    tokenizer `text_tokenizer`, the prompt memory in the large one's); tokenizers not given come from the config."""
    from .backbones import load_model_tokenizer, load_small_tokenizer
    from .couplings import COUPLINGS

    tokenizer = load_model_tokenizer(cfg) if tokenizer is None else tokenizer
    if tokenizer is None:
        raise UserError("training needs a tokenizer: set `tokenizer` (e.g. byte-level) or name the large model")
    if COUPLINGS[cfg.coupling].memory:  # the text in the small model's tokenizer, the memory in the large one's
        text_tokenizer = load_small_tokenizer(cfg) if text_tokenizer is None else text_tokenizer
        return build_datasets(cfg.data, text_tokenizer, log=log, memory_tokenizer=tokenizer), tokenizer
    return build_datasets(cfg.data, tokenizer, log=log), tokenizer
