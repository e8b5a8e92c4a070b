"""Facts: (subject, relation, object) triples from the shared data, split by subject, asked as short questions.

Sources under `<data dir>/facts/`: the 26 factual relations of evandez/relations (`relations/factual/*.json`:
`samples: [{subject, object}]`, `prompt_templates: ["The capital city of {} is", ...]`) and the country -> capital
table (`country_capital.tsv`, rows where both packages agree), asked with the country_capital_city templates.

The split is by subject, the same for every relation: a subject is held out when a hash of (seed, normalized
subject) falls below `test_fraction`. So no held-out subject appears in training under any relation, and a
subject's side does not depend on which other facts exist. A (relation, subject) with several objects in the data
accepts each of them (aliases).
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError

SPLIT_SEED = 0
TEST_FRACTION = 0.3
# The question asked for every fact, in every arm and for the large model alone: an instruction and the relation's
# own sentence to complete. The training records of the train subjects use the same words.
INSTRUCTION = "Complete the sentence with the missing words only."
CAPITAL_TABLE = "country_capital"  # the relation name of country_capital.tsv
# The text hint baseline: the large model's own answer to the same question, added to the question it is asked.
HINT = "A larger model answered: {}"


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    objects: tuple[str, ...]  # the object and its aliases (all accepted)
    templates: tuple[str, ...]  # the relation's sentences, "{}" where the subject goes

    def sentence(self) -> str:
        """The sentence to complete: one of the relation's templates, the same one for a subject every time."""
        pick = int(hashlib.sha256(f"{self.relation}/{self.subject}".encode()).hexdigest(), 16) % len(self.templates)
        return self.templates[pick].format(self.subject)

    def question(self, hint: Optional[str] = None) -> str:
        """The instruction and the sentence; with `hint` (a larger model's answer to the same question), that answer
        on a line of its own after them (HINT), the same words in training and in the test."""
        asked = f"{INSTRUCTION}\n{self.sentence()}"
        return asked if hint is None else f"{asked}\n{HINT.format(' '.join(hint.split()) or '(nothing)')}"

    def messages(self, answer: str = "object", hint: Optional[str] = None) -> list[dict]:
        """The conversation of a training record: the question, then the object as the whole answer ("object") or
        the sentence completed by it ("sentence": "Rio de Janeiro is part of Brazil.", how the large model answers;
        `extract` reads the object back out of either)."""
        obj = self.objects[0]
        reply = obj if answer == "object" else f"{self.sentence()} {obj}{'' if obj.endswith('.') else '.'}"
        return [{"role": "user", "content": self.question(hint)}, {"role": "assistant", "content": reply}]


def normalize(text: Optional[str]) -> str:
    """Lower case, accents and punctuation removed, a leading article dropped, whitespace collapsed:
    "The Washington, D.C." -> "washington dc", "São Paulo" -> "sao paulo"."""
    if text is None:
        return ""
    t = unicodedata.normalize("NFKD", text)
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = re.sub(r"[^\w\s]", "", t.replace("-", " "))
    t = " ".join(t.split())
    return re.sub(r"^(the|a|an) ", "", t)


def extract(output: str, fact: Fact) -> str:
    """The answer in a model's output: its first non-empty line, less a restated sentence
    ("The capital city of France is Paris." -> "paris", already normalized in that case)."""
    line = next((ln.strip() for ln in output.splitlines() if ln.strip()), "")
    stated, got = normalize(fact.sentence()), normalize(line)
    return got[len(stated):].strip() if got.startswith(stated + " ") else line


def is_correct(answer: str, fact: Fact) -> bool:
    """Normalized exact match with the object or one of its aliases."""
    got = normalize(answer)
    return bool(got) and any(got == normalize(o) for o in fact.objects)


def answer_priors(train: list[Fact]) -> dict[str, tuple[set, str]]:
    """Per relation, what its training facts already teach without any knowledge of a subject: the set of its
    train answers (normalized) and the most frequent one. A held-out fact whose answer is no train answer of its
    relation can only be answered from knowledge of the subject; the most frequent answer is the floor a model
    reaches by learning the relation's prior alone."""
    counts: dict[str, dict[str, int]] = {}
    seen: dict[str, set] = {}
    for f in train:
        c = counts.setdefault(f.relation, {})
        key = normalize(f.objects[0])
        c[key] = c.get(key, 0) + 1
        seen.setdefault(f.relation, set()).update(normalize(o) for o in f.objects)
    return {rel: (seen[rel], max(c, key=lambda k: (c[k], k))) for rel, c in counts.items()}


def prior_flags(fact: Fact, priors: dict[str, tuple[set, str]]) -> dict:
    """{"answer_in_train": the answer (or an alias) is a train answer of the relation, "prior_correct": the
    relation's most frequent train answer is right for this fact}."""
    seen, top = priors.get(fact.relation, (set(), ""))
    names = {normalize(o) for o in fact.objects}
    return {"answer_in_train": bool(names & seen), "prior_correct": top in names}


def shots(train: list[Fact], k: int) -> Callable[[Fact], list[Fact]]:
    """Few-shot examples: for a question, `k` train facts of its relation (never its own subject), the same ones
    every run: the relation's train facts ordered by a hash of (the question's subject, theirs), the first k. A
    relation with fewer than k other train facts gives them all."""
    by_rel: dict[str, list[Fact]] = {}
    for f in train:
        by_rel.setdefault(f.relation, []).append(f)

    def pick(fact: Fact) -> list[Fact]:
        own = normalize(fact.subject)
        pool = [f for f in by_rel.get(fact.relation, []) if normalize(f.subject) != own]
        return sorted(pool, key=lambda f: hashlib.sha256(f"{fact.subject}/{f.subject}".encode()).hexdigest())[:k]

    return pick


def load_facts(root: Path) -> list[Fact]:
    """Every fact under `root` (the `facts/` folder of the data dir), grouped by (relation, subject)."""
    rel_dir = root / "relations" / "factual"
    files = sorted(rel_dir.glob("*.json"))
    if not files:
        raise UserError(f"facts: no relation files in {rel_dir}; point --data-dir (or $LLM_MODULES_DATA) at the "
                        "folder that holds facts/relations/factual/*.json")
    grouped: dict[tuple[str, str], list[str]] = {}
    templates: dict[str, tuple[str, ...]] = {}
    for f in files:
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
            templates[f.stem] = tuple(d["prompt_templates"])
            pairs = [(s["subject"], s["object"]) for s in d["samples"]]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{f}: not a relation file ({e.__class__.__name__}: {e}); expected samples: "
                            "[{subject, object}] and prompt_templates") from None
        for subject, obj in pairs:
            objects = grouped.setdefault((f.stem, subject), [])
            if obj not in objects:
                objects.append(obj)
    table = root / "country_capital.tsv"
    if table.is_file() and "country_capital_city" in templates:
        templates[CAPITAL_TABLE] = templates["country_capital_city"]
        with open(table, encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                if row.get("agree") == "True":
                    grouped.setdefault((CAPITAL_TABLE, row["country_geonames"]), [row["capital_geonames"]])
    return [Fact(rel, subj, tuple(objs), templates[rel]) for (rel, subj), objs in sorted(grouped.items())]


def is_test_subject(subject: str, seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION) -> bool:
    h = int(hashlib.sha256(f"{seed}/{normalize(subject)}".encode()).hexdigest()[:15], 16) / 16**15
    return h < test_fraction


def split(facts: list[Fact], seed: int = SPLIT_SEED, test_fraction: float = TEST_FRACTION
          ) -> tuple[list[Fact], list[Fact]]:
    """(train, test) by subject; each side ordered so that any prefix mixes the relations evenly (round robin over
    relations, each relation's facts in a seeded order), so `--limit N` is a fair sample."""
    train = [f for f in facts if not is_test_subject(f.subject, seed, test_fraction)]
    test = [f for f in facts if is_test_subject(f.subject, seed, test_fraction)]
    return _interleave(train, seed), _interleave(test, seed)


def _interleave(facts: list[Fact], seed: int) -> list[Fact]:
    by_rel: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    for rel, fs in by_rel.items():
        fs.sort(key=lambda f: hashlib.sha256(f"{seed}/{rel}/{f.subject}".encode()).hexdigest())
    out, rank = [], 0
    while len(out) < len(facts):
        out += [fs[rank] for _, fs in sorted(by_rel.items()) if rank < len(fs)]
        rank += 1
    return out
