"""Datasets of the shipped lm-eval tasks, read from the local data dir instead of the hub.

The data dir is the task metadata's `data_dir` (set by `llm-modules eval --data-dir` / `--metadata` on lm-eval's
command line), else what llm_modules.benchmark_data.find_data_dir finds ($LLM_MODULES_DATA, ../shared/data, ...).
"""
from __future__ import annotations

from typing import Optional

import datasets


def _rows(relative: str, task: str, data_dir: Optional[str]) -> list[dict]:
    from llm_modules.benchmark_data import data_file, find_data_dir, read_jsonl

    return read_jsonl(data_file(find_data_dir(data_dir), relative, task))


def hellaswag(data_dir: Optional[str] = None, **metadata) -> datasets.DatasetDict:
    """HellaSwag validation (rowanz's format: ctx_a, ctx_b, endings, label, activity_label) through lm-eval's own
    preprocessing (query = activity label + context, cleaned endings), applied once here."""
    from lm_eval.tasks.hellaswag.utils import process_docs

    rows = _rows("hellaswag/val.jsonl", "hellaswag", data_dir)
    keep = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label")
    docs = datasets.Dataset.from_list([{k: r[k] for k in keep} for r in rows])
    return datasets.DatasetDict({"validation": process_docs(docs)})


def _arc(level: str, data_dir: Optional[str]) -> datasets.DatasetDict:
    rows = _rows(f"arc/{level}_test.jsonl", f"arc_{level}", data_dir)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"query": r["query"], "choices": list(r["choices"]), "gold": int(r["gold"])} for r in rows])})


def arc_easy(data_dir: Optional[str] = None, **metadata) -> datasets.DatasetDict:
    return _arc("easy", data_dir)


def arc_challenge(data_dir: Optional[str] = None, **metadata) -> datasets.DatasetDict:
    return _arc("challenge", data_dir)
