"""Where the benchmark data files are and how their records are read: local files (../shared/data, --data-dir,
$LLM_MODULES_DATA) or, with --data-dir hub, the usual dataset ids. Used by the benchmarks (tasks.py, the lm-eval
task YAMLs) and by training on benchmark train splits (data.benchmarks)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from . import facts as facts_mod
from .errors import UserError

DATA_ENV = "LLM_MODULES_DATA"
HUB = "hub"  # --data-dir hub: the usual dataset ids instead of local files
REPO_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # a checkout beside the project's shared/


# ---- where the data is ---------------------------------------------------------------------------------------
def find_data_dir(given: Optional[str] = None) -> Optional[Path]:
    """The folder holding gsm8k/, hellaswag/, arc/, facts/, math500/: `given` (--data-dir), else $LLM_MODULES_DATA,
    else ../shared/data from the working directory, else shared/data beside this checkout. None for `hub`."""
    if given == HUB:
        return None
    if given:
        candidates = [("--data-dir", Path(given))]
    else:
        candidates = ([(f"${DATA_ENV}", Path(os.environ[DATA_ENV]))] if os.environ.get(DATA_ENV) else [])
        candidates += [("the default", Path.cwd().parent / "shared" / "data"), ("the default", REPO_DATA)]
    for _, path in candidates:
        if path.expanduser().is_dir():
            return path.expanduser().resolve()
    looked = ", ".join(f"{p} ({how})" for how, p in candidates)
    raise UserError(f"benchmark data not found: looked in {looked}. Point --data-dir (or ${DATA_ENV}) at the folder "
                    "that holds gsm8k/, hellaswag/, arc/, facts/ and math500/, or use --data-dir hub with hub access")


def data_file(root: Path, relative: str, task: str) -> Path:
    path = root / relative
    if not path.exists():
        raise UserError(f"{task}: {path} not found in the data dir {root}; point --data-dir (or ${DATA_ENV}) at "
                        "the folder that holds it, or use --data-dir hub with hub access")
    return path


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def hub_rows(dataset: str, subset: Optional[str], split: str) -> list[dict]:
    import datasets

    try:
        return list(datasets.load_dataset(dataset, subset, split=split))
    except Exception as e:  # offline or unknown id: datasets raises many kinds
        raise UserError(f"--data-dir hub: cannot load {dataset} ({e.__class__.__name__}: {str(e).splitlines()[0]}); "
                        "without hub access give --data-dir DIR with local files") from None


def facts_split(root: Optional[Path]) -> tuple[list[facts_mod.Fact], list[facts_mod.Fact]]:
    if root is None:
        raise UserError("facts: there is no hub copy of the facts (evandez/relations is a GitHub repository); give "
                        "--data-dir DIR with facts/relations/factual/*.json")
    return facts_mod.split(facts_mod.load_facts(data_file(root, "facts", "facts")))


def train_records(names: list[str], data_dir: Optional[str], facts_answer: str = "object"
                  ) -> list[tuple[str, int, list[dict]]]:
    """(source, number, messages) of the train splits of benchmarks `names` (data.benchmarks): the facts of the train
    subjects, asked exactly as `--task facts` asks the held-out ones (answered in `facts_answer` form: Fact.messages),
    and GSM8K train."""
    root = find_data_dir(data_dir)
    out = []
    for name in names:
        if name == "facts":
            train, _ = facts_split(root)
            out += [(f"facts:{f.relation}", n, f.messages(facts_answer)) for n, f in enumerate(train, 1)]
        elif name == "gsm8k":
            rows = (hub_rows("openai/gsm8k", "main", "train") if root is None
                    else read_jsonl(data_file(root, "gsm8k/train.jsonl", "gsm8k")))
            out += [("gsm8k:train", n, [{"role": "user", "content": r["question"]},
                                        {"role": "assistant", "content": r["answer"]}]) for n, r in enumerate(rows, 1)]
    return out
