"""Where the benchmark data files are and how their records are read. The lookup order (docs/data.md): --data-dir,
else $LLM_MODULES_DATA, else ../shared/data from the working directory, else shared/data beside this checkout; with
--data-dir hub, the usual dataset ids. The facts also ship inside the package (llm_modules/data/facts, MIT): they are
read from there when the folder found has no facts/ of its own, or when none is found and only facts are asked for.
Used by the benchmarks (tasks.py, the lm-eval task YAMLs) and by training on benchmark train splits
(data.benchmarks)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional

from . import facts as facts_mod
from .errors import UserError

DATA_ENV = "LLM_MODULES_DATA"
HUB = "hub"  # --data-dir hub: the usual dataset ids instead of local files
REPO_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # a checkout beside the project's shared/
PACKAGE_DATA = Path(__file__).resolve().parent / "data"  # what ships with the package: facts/ only
SHIPPED = {"facts", "facts_train"}  # tasks read from the shipped facts alone
HUB_IDS = "openai/gsm8k, Rowan/hellaswag, allenai/ai2_arc, HuggingFaceH4/MATH-500"


# ---- where the data is ---------------------------------------------------------------------------------------
def _candidates(given: Optional[str]) -> list[tuple[str, Path]]:
    """(how it was chosen, folder) in lookup order, each folder once."""
    if given:
        return [("--data-dir", Path(given).expanduser())]
    found = [(f"${DATA_ENV}", Path(os.environ[DATA_ENV]).expanduser())] if os.environ.get(DATA_ENV) else []
    found += [("../shared/data from the working directory", Path.cwd().parent / "shared" / "data"),
              ("shared/data beside this checkout", REPO_DATA)]
    unique: list[tuple[str, Path]] = []
    for how, path in found:
        if all(path.resolve() != other.resolve() for _, other in unique):
            unique.append((how, path))
    return unique


def find_data_dir(given: Optional[str] = None, tasks: Iterable[str] = ()) -> Optional[Path]:
    """The folder holding gsm8k/, hellaswag/, arc/, facts/, math500/, the first found in lookup order; None for
    `hub`. When none is found and every one of `tasks` ships with the package (facts), the package's own data."""
    if given == HUB:
        return None
    candidates = _candidates(given)
    for _, path in candidates:
        if path.is_dir():
            return path.resolve()
    tasks = set(tasks)
    if tasks and tasks <= SHIPPED and not given:
        return PACKAGE_DATA
    looked = ", ".join(f"{p} ({how})" for how, p in candidates)
    raise UserError(f"benchmark data not found: looked in {looked}. Only the facts ship with the package; for the "
                    f"others, with hub access use --data-dir hub (the dataset ids {HUB_IDS}), or point --data-dir "
                    f"(or ${DATA_ENV}) at a folder that holds gsm8k/, hellaswag/, arc/ and math500/ (docs/data.md)")


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
    """(train, test) facts from `root`/facts, or from the copy shipped with the package when `root` (None: hub, which
    has no copy of evandez/relations) has no facts/ of its own."""
    folder = root / "facts" if root is not None and (root / "facts").is_dir() else PACKAGE_DATA / "facts"
    return facts_mod.split(facts_mod.load_facts(folder))


def train_records(names: list[str], data_dir: Optional[str], facts_answer: str = "object"
                  ) -> list[tuple[str, int, list[dict]]]:
    """(source, number, messages) of the train splits of benchmarks `names` (data.benchmarks): the facts of the train
    subjects, asked exactly as `--task facts` asks the held-out ones (answered in `facts_answer` form: Fact.messages),
    and GSM8K train."""
    root = find_data_dir(data_dir, names)
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
