"""The experiment's report: tables (results.md), learning curves and accuracy-speed frontiers (PNG)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .files import atomic_write, atomic_write_text
from .tasks import proportion, proportion_text

FACTS_FLOOR = 0.10  # facts: relations where the large model alone scores above this are the headline
# The two-stage prompt arm and its variants (llm_modules.experiment), each compared with SmolLM2 fine-tuned (for 120
# and 240 steps; a -seed1 arm: of its own seed, then seed 0) and with the arm it changes one thing of: arm -> (that
# arm, the SmolLM2 baselines).
_STEPS = ("smollm-ft-sentence", "smollm-ft-sentence-240steps")
_SEED1 = ("smollm-ft-sentence-seed1", "smollm-ft-sentence")
TWO_STAGE = {"prompt-smollm-sentence-2stage-1.5b": ("prompt-smollm-sentence-frozen-1.5b", _STEPS),
             "prompt-smollm-sentence-2stage-1.5b-seed1": ("prompt-smollm-sentence-2stage-1.5b", _SEED1),
             "prompt-smollm-sentence-2stage-every3-1.5b": ("prompt-smollm-sentence-2stage-1.5b", _STEPS),
             "prompt-smollm-sentence-2stage240-1.5b": ("prompt-smollm-sentence-2stage-1.5b", _STEPS),
             "prompt-smollm-sentence-2stage-every2-1.5b": ("prompt-smollm-sentence-2stage-every3-1.5b", _STEPS),
             "prompt-smollm-sentence-2stage-every3-1.5b-seed1": ("prompt-smollm-sentence-2stage-every3-1.5b", _SEED1)}
# Arms compared item by item (the same questions), when both have been evaluated: (arm, the arm it is compared with).
PAIRS = (("combined-large", "large-alone"), ("combined-large", "small-alone"), ("combined-large", "combined-paper"),
         ("combined-large", "distill"), ("combined-large", "lora"), ("combined-large", "smollm-ft"),
         ("smollm-ft", "lora"),
         ("combined-large-wide-kd", "combined-large-wide"), ("combined-large-wide", "combined-large"),
         ("combined-large-wide", "lora"), ("combined-large-wide", "smollm-ft"), ("combined-large-wide", "large-alone"),
         ("combined-large-wide-kd", "large-alone"), ("combined-large-wide-kd", "lora"),
         ("combined-large-wide-kd", "smollm-ft"), ("lora", "large-alone"), ("prompt-smollm", "smollm-ft"),
         ("combined-large-wide-lr1e-5", "large-alone"), ("combined-large-wide-lr1e-5", "combined-large-wide"),
         ("combined-large-wide-lr1e-5", "lora"), ("combined-large-wide-head0", "large-alone"),
         ("combined-large-wide-head0", "combined-large-wide"), ("combined-large-wide-head0", "lora"),
         ("combined-large-wide-kd0.9", "large-alone"), ("combined-large-wide-kd0.9", "combined-large-wide-kd"),
         ("combined-large-wide-kd0.9", "lora"), ("combined-large-wide-head0", "combined-large-wide-kd0.9"),
         ("combined-large-wide-kd0.7", "large-alone"), ("combined-large-wide-kd0.7", "combined-large-wide-kd0.9"),
         ("combined-large-wide-kd0.7", "combined-large-wide-kd"),
         ("combined-large-wide-kd0.9to0", "large-alone"), ("combined-large-wide-kd0.9to0", "combined-large-wide-kd0.9"),
         ("combined-large-wide-kd0.9to0", "combined-large-wide-kd0.7"),
         ("combined-large-wide-kd0.9-sentence", "large-alone"),
         ("combined-large-wide-kd0.9-sentence", "combined-large-wide-kd0.9"),
         ("combined-large-wide-sentence", "large-alone"), ("combined-large-wide-sentence", "combined-large-wide"),
         ("combined-large-wide-kd0.9-sentence", "combined-large-wide-sentence"),
         ("combined-large-wide-sentence", "small-alone-sentence"), ("combined-large-wide-sentence", "distill-sentence"),
         ("combined-large-wide-kd0.9-sentence", "small-alone-sentence"),
         ("combined-large-wide-sentence", "smollm-ft-sentence"), ("smollm-ft-sentence", "large-alone"),
         ("combined-large-wide-kd0.9-sentence", "smollm-ft-sentence"),
         ("combined-large-wide-sentence", "lora-sentence"), ("lora-sentence", "large-alone"),
         ("smollm-ft-sentence", "lora-sentence"), ("combined-large-wide-kd0.9-sentence", "lora-sentence"),
         ("large-alone-1.5b", "large-alone"),
         ("smollm-ft-sentence", "large-alone-1.5b"), ("lora-sentence", "large-alone-1.5b"),
         ("combined-large-wide-kd-sentence", "large-alone"),
         ("combined-large-wide-kd-sentence", "combined-large-wide-sentence"),
         ("combined-large-wide-kd-sentence", "combined-large-wide-kd0.9-sentence"),
         ("combined-large-wide-kd-sentence", "smollm-ft-sentence"),
         ("combined-large-wide-sentence-1.5b", "large-alone-1.5b"),
         ("combined-large-wide-sentence-1.5b", "combined-large-wide-sentence"),
         ("combined-large-wide-sentence-1.5b", "smollm-ft-sentence"),
         ("combined-large-wide-kd-sentence-1.5b", "combined-large-wide-sentence-1.5b"),
         ("combined-large-wide-kd-sentence-1.5b", "large-alone-1.5b"),
         ("combined-large-wide-kd-sentence-1.5b", "smollm-ft-sentence"),
         ("prompt-smollm-sentence-lrgate", "smollm-ft-sentence"), ("prompt-smollm-sentence-lrgate", "large-alone"),
         ("prompt-smollm-sentence-lrgate-1.5b", "smollm-ft-sentence"),
         ("prompt-smollm-sentence-lrgate-1.5b", "prompt-smollm-sentence-lrgate"),
         ("prompt-smollm-sentence-lrgate-1.5b", "large-alone-1.5b"),
         ("prompt-smollm-sentence-frozen-1.5b", "smollm-ft-sentence"),
         ("prompt-smollm-sentence-frozen-1.5b", "prompt-smollm-sentence-lrgate-1.5b"),
         *((arm, other) for arm, (parent, baselines) in TWO_STAGE.items() for other in (*baselines, parent)),
         ("combined-large-wide-sentence-1.5b-seed1", "smollm-ft-sentence-seed1"),
         ("combined-large-wide-sentence-1.5b-seed1", "smollm-ft-sentence"),
         ("combined-large-wide-sentence-1.5b-seed1", "combined-large-wide-sentence-1.5b"),
         ("combined-large-wide-sentence-1.5b-seed1", "large-alone-1.5b"),
         ("smollm-ft-sentence-seed1", "smollm-ft-sentence"),
         ("combined-large-wide-sentence-1.5b-240steps", "smollm-ft-sentence"),
         ("combined-large-wide-sentence-1.5b-240steps", "combined-large-wide-sentence-1.5b-seed1"),
         ("combined-large-wide-sentence-1.5b-240steps", "smollm-ft-sentence-240steps"),
         ("smollm-ft-sentence-240steps", "smollm-ft-sentence"),
         ("combined-large-wide-own", "large-alone"), ("combined-large-wide-own", "combined-large-wide"),
         ("combined-large-wide-own", "combined-large-wide-kd"), ("combined-large-wide-own", "lora"))

# What the method is for, item by item: of the facts the large model alone gets right and a small model fine-tuned
# alone misses (knowledge the small model lacks), how many the arm reading that large model gets: (arm, large, small).
CARRIED = tuple((arm, "large-alone-1.5b", "smollm-ft-sentence") for arm in (
    "combined-large-wide-sentence-1.5b", "combined-large-wide-sentence-1.5b-seed1",
    "combined-large-wide-sentence-1.5b-240steps", "prompt-smollm-sentence-lrgate-1.5b",
    "prompt-smollm-sentence-frozen-1.5b", *TWO_STAGE))


def facts_relations(out: Path) -> list[str]:
    """Relations of the facts suite on which the large model alone is right more than FACTS_FLOOR of the time."""
    rows = _rows(out / "facts" / "large-alone" / "eval" / "facts.jsonl")
    by_rel: dict[str, list[bool]] = {}
    for r in rows:
        by_rel.setdefault(r["relation"], []).append(r["correct"])
    return sorted(rel for rel, v in by_rel.items() if sum(v) / len(v) > FACTS_FLOOR)


def ordered(results: dict, suite: str) -> dict:
    """The suite's arms in the experiment's order (results["arm_order"]; results.json stores arms sorted by name)."""
    arms = results["suites"][suite]
    return {a: arms[a] for a in [*results.get("arm_order", []), *sorted(arms)] if a in arms}


def evaluated_tasks(results: dict, suite: str) -> list[str]:
    """Every task the suite's arms were evaluated on, in the order the arms (ordered) first have them."""
    return list(dict.fromkeys(t for r in ordered(results, suite).values() for t in r["eval"]))


def _rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _answers(out: Path, suite: str, arm: str, task: str) -> dict[str, dict]:
    """{item id: answer row} of an arm's evaluation on `task` (empty if it has none)."""
    return {r["id"]: r for r in _rows(out / suite / arm / "eval" / f"{task}.jsonl")}


def restricted(out: Path, suite: str, arm: str, relations: list[str], field: str = "correct") -> dict:
    """Facts accuracy of an arm over `relations` only, with its interval (`field`: "prior_correct" gives the floor
    of the relations' most frequent train answers on the same questions)."""
    rows = _rows(out / suite / arm / "eval" / "facts.jsonl")
    return proportion([r[field] for r in rows if r["relation"] in relations])


def headline(results: dict, out: Path, suite: str) -> dict[str, dict]:
    """The accuracy each arm is judged by in a suite (facts: the relations the large model knows)."""
    arms = results["suites"][suite]
    if suite == "facts":
        rels = facts_relations(out)
        return {a: restricted(out, suite, a, rels) for a in arms}
    return {a: r["eval"][suite] for a, r in arms.items() if suite in r["eval"]}


def sign_test(a_only: int, b_only: int) -> float:
    """Two-sided exact p of the paired sign test (exact McNemar): how often a split of the discordant items at
    least this uneven happens when neither arm is better."""
    n, k = a_only + b_only, min(a_only, b_only)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def subsets(task: str) -> list:
    """The item subsets the paired tables count: all, and for facts the answers never seen in training."""
    out = [("all", lambda r: True)]
    if task == "facts":
        out.append(("answers never seen in training", lambda r: not r["answer_in_train"]))
    return out


def paired_table(out: Path, suite: str, task: str) -> str:
    """PAIRS compared on the same items of `task`: items only the first arm gets right, only the second, and the
    sign test's p (for facts, also on the answers never seen in training)."""
    lines = ["| arm | compared with | items | right only in the arm | right only in the other | p (exact, two-sided) |",
             "|---|---|---|---|---|---|"]
    for a, b in PAIRS:
        rows = [_answers(out, suite, arm, task) for arm in (a, b)]
        if not rows[0] or not rows[1]:
            continue
        for name, keep in subsets(task):
            ids = [i for i, r in rows[0].items() if keep(r) and i in rows[1]]
            a_only = sum(rows[0][i]["correct"] and not rows[1][i]["correct"] for i in ids)
            b_only = sum(rows[1][i]["correct"] and not rows[0][i]["correct"] for i in ids)
            lines.append(f"| {a} | {b} | {name} ({len(ids)}) | {a_only} | {b_only} | {sign_test(a_only, b_only):.4f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def carried_table(out: Path) -> str:
    """CARRIED on the facts items: those only the large model knows (right with it, wrong with the small model
    fine-tuned alone) and how many of them the arm gets right, on all questions and on the answers never seen in
    training."""
    lines = ["| arm | reading | items right with it and wrong with | of them right with the arm |", "|---|---|---|---|"]
    for arm, large, small in CARRIED:
        rows = [_answers(out, "facts", name, "facts") for name in (arm, large, small)]
        if not all(rows):
            continue
        for name, keep in subsets("facts"):
            ids = [i for i, r in rows[1].items() if keep(r) and r["correct"] and i in rows[2] and i in rows[0]
                   and not rows[2][i]["correct"]]
            carried = sum(rows[0][i]["correct"] for i in ids)
            lines.append(f"| {arm} | {large} | {small}: {len(ids)} ({name}) | {carried} |")
    return "\n".join(lines) if len(lines) > 2 else ""


# ---- the summary table's statistics (issue 48): paired over seeds, Holm over the table ---------------------------
# The decisive suite's arms (experiment.DECISIVE: SmolLM2 fine-tuned on matched steps is smollm-ft-matched there) and
# the baselines, each with what it is compared with on the same facts questions; a row appears where both arms were
# evaluated in the suite, and Holm's family is the rows that appear. An arm's seeds are rows of that arm:
# ARM is seed 0, ARM-seedN seed N (experiment._seeded); an untrained arm (no train.json: the large model alone,
# few-shot or not) answers alike every time, so its one run is paired with each seed of the other arm.
SUMMARY = (("fusion-smollm-ft-1.5b", "smollm-ft-matched"), ("fusion-smollm-ft-1.5b", "large-alone-1.5b"),
           ("fusion-smollm-ft-1.5b", "lora-sentence-1.5b"),
           ("prompt-smollm-sentence-2stage-every3-1.5b-matched", "smollm-ft-matched"),
           ("combined-large-wide-sentence-1.5b", "smollm-ft-matched"),
           ("smollm-ft-sentence-hint-1.5b", "smollm-ft-matched"), ("lora-sentence-1.5b", "smollm-ft-matched"),
           ("lora-sentence-1.5b", "large-alone-1.5b"), ("lora-sentence-1.5b", "smollm-ft-sentence"),
           ("large-alone-1.5b-5shot", "large-alone-1.5b"), ("large-alone-1.5b-5shot", "smollm-ft-sentence"),
           ("smollm-ft-sentence-hint-1.5b", "smollm-ft-sentence"),
           ("smollm-ft-sentence-hint-1.5b", "large-alone-1.5b"))
# The union ceiling: right with the small model fine-tuned alone or with the large model alone, item by item (the
# facts suite's SmolLM2 fine-tuned, the decisive suite's).
UNIONS = (("smollm-ft-sentence", "large-alone-1.5b"), ("smollm-ft-matched", "large-alone-1.5b"))
# Arms set against that ceiling, item by item (does LoRA on the 1.5B model, or the fusion, already reach it?).
TO_CEILING = ("lora-sentence-1.5b", "fusion-smollm-ft-1.5b")


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest p times (m - i + 1), made
    non-decreasing along that order and capped at 1 (family-wise error over the m tests; no assumption about how
    the tests depend on one another)."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def paired_difference(a_only: int, b_only: int, both: int, neither: int, z: float = 1.96) -> tuple[float, list]:
    """(accuracy of A - accuracy of B, its 95% interval) from paired verdicts: Newcombe's square-and-add interval
    for paired proportions (Newcombe 1998, method 10; Fagerland, Lydersen & Laake 2013, ch. 8): the Wilson intervals
    of the two accuracies combined with the estimated correlation of the pairs (phi, corrected towards 0 by n/2 as
    Newcombe does). It keeps its coverage near 95% with few discordant pairs, where the Wald interval does not.
    Checked against the book's example (Cavo et al. 2012: -0.0621 [-0.1186, -0.0046])."""
    from .tasks import wilson

    n = a_only + b_only + both + neither
    if n == 0:
        return 0.0, [-1.0, 1.0]
    x1, x2 = both + a_only, both + b_only
    p1, p2 = x1 / n, x2 / n
    (l1, u1), (l2, u2) = wilson(x1, n, z), wilson(x2, n, z)
    spread = x1 * (n - x1) * x2 * (n - x2)
    cross = both * neither - a_only * b_only
    phi = (0.0 if spread == 0 or 0 <= cross <= n / 2
           else (cross - n / 2 if cross > n / 2 else cross) / math.sqrt(spread))
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)))
    hi = d + math.sqrt(max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1)))
    return d, [max(-1.0, lo), min(1.0, hi)]


def seed_runs(out: Path, suite: str, arm: str, task: str) -> dict[int, str]:
    """{seed: arm name} of the runs of `arm` whose `task` answers exist: the arm itself (seed 0), ARM-seedN."""
    found = {0: arm} if (out / suite / arm / "eval" / f"{task}.jsonl").is_file() else {}
    for path in (out / suite).glob(f"{arm}-seed*/eval/{task}.jsonl"):
        tail = path.parent.parent.name.removeprefix(f"{arm}-seed")
        if tail.isdigit():
            found[int(tail)] = f"{arm}-seed{tail}"
    return dict(sorted(found.items()))


def pooled_pairs(out: Path, suite: str, task: str, a: str, b: str, keep=lambda r: True) -> dict:
    """The verdicts of A and B on the same items (`keep`: a subset), seed s of A with seed s of B, pooled over the
    seeds both have: {"seeds", "n", "both", "a_only", "b_only", "neither", "a_correct", "b_correct"}, and per question
    the mean over seeds of (A right) - (B right): "questions", "a_better" / "b_better" (questions whose mean is above /
    below 0), "cluster_ci" (questions_interval). An untrained arm's single run is paired with every seed of the
    other."""
    runs = [seed_runs(out, suite, arm, task) for arm in (a, b)]
    for i, arm in enumerate((a, b)):
        if list(runs[i]) == [0] and not (out / suite / arm / "train.json").is_file():  # not trained
            runs[i] = {s: runs[i][0] for s in runs[1 - i]} or runs[i]
    seeds = sorted(set(runs[0]) & set(runs[1]))
    c = {"seeds": seeds, "n": 0, "both": 0, "a_only": 0, "b_only": 0, "neither": 0}
    per_question: dict[str, list[int]] = {}
    for s in seeds:
        ra, rb = (_answers(out, suite, runs[k][s], task) for k in (0, 1))
        for i in (i for i, r in ra.items() if keep(r) and i in rb):
            x, y = bool(ra[i]["correct"]), bool(rb[i]["correct"])
            c["n"] += 1
            c["both" if x and y else "a_only" if x else "b_only" if y else "neither"] += 1
            per_question.setdefault(i, []).append(x - y)
    means = [sum(d) / len(d) for d in per_question.values()]
    c.update(a_correct=c["both"] + c["a_only"], b_correct=c["both"] + c["b_only"], questions=len(means),
             a_better=sum(m > 0 for m in means), b_better=sum(m < 0 for m in means),
             cluster_ci=questions_interval(means))
    return c


def questions_interval(means: list[float], z: float = 1.96) -> list[float]:
    """95% interval of the mean of per-question differences (each question's mean over seeds): mean +- z * their
    standard deviation / sqrt(questions), questions as the unit (a question's seeds are not independent draws, so
    this is the interval to read when there are several seeds; with one seed it is the paired Wald interval)."""
    q = len(means)
    if q < 2:
        return [-1.0, 1.0]
    m = sum(means) / q
    half = z * math.sqrt(sum((x - m) ** 2 for x in means) / (q - 1) / q)
    return [max(-1.0, m - half), min(1.0, m + half)]


def summary_stats(out: Path, suite: str, task: str, comparisons=SUMMARY) -> list[dict]:
    """One row per (comparison, subset) with both arms evaluated: the pooled pairs (pooled_pairs), the difference
    in points with its 95% interval from the pooled pairs (paired_difference, Newcombe's; pooling treats the seeds'
    pairs as independent draws) and with questions as the unit (questions_interval), the exact sign test's p over
    questions (those A does better on, over its seeds, against those B does; with one seed, the discordant pairs:
    exact McNemar) and Holm's adjusted p over every row of the table (holm)."""
    rows = []
    for a, b in comparisons:
        for name, keep in subsets(task):
            c = pooled_pairs(out, suite, task, a, b, keep)
            if not c["seeds"] or not c["n"]:
                continue
            d, ci = paired_difference(c["a_only"], c["b_only"], c["both"], c["neither"])
            rows.append({"arm": a, "compared_with": b, "subset": name, **c, "difference": d, "ci95": ci,
                         "p": sign_test(c["a_better"], c["b_better"])})
    for r, p in zip(rows, holm([r["p"] for r in rows])):
        r["p_holm"] = p
    return rows


def summary_table(out: Path, suite: str, task: str = "facts", comparisons=SUMMARY) -> str:
    """summary_stats as markdown."""
    rows = summary_stats(out, suite, task, comparisons)
    if not rows:
        return ""
    lines = ["| arm | compared with | items (questions x seeds) | seeds | arm right | other right | difference, points "
             "[95% CI, pooled pairs] | [95% CI, questions as units] | questions better with the arm | with the other "
             "| p (sign test over questions) | p (Holm) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pts = [f"{100 * x:+.1f}" for x in (r["difference"], *r["ci95"], *r["cluster_ci"])]
        lines.append(f"| {r['arm']} | {r['compared_with']} | {r['subset']} ({r['n']}) | "
                     f"{', '.join(map(str, r['seeds']))} | {r['a_correct'] / r['n']:.3f} | "
                     f"{r['b_correct'] / r['n']:.3f} | {pts[0]} [{pts[1]}, {pts[2]}] | [{pts[3]}, {pts[4]}] | "
                     f"{r['a_better']} | {r['b_better']} | {r['p']:.4f} | {r['p_holm']:.4f} |")
    return "\n".join(lines)


def union_line(out: Path, suite: str, task: str = "facts", pair=UNIONS[0]) -> str:
    """The union ceiling: the share of items right with either arm of `pair` (seed 0 of each), all and by subset:
    what a model that had both would answer."""
    rows = [_answers(out, suite, arm, task) for arm in pair]
    if not all(rows):
        return ""
    parts = []
    for name, keep in subsets(task):
        ids = [i for i, r in rows[0].items() if keep(r) and i in rows[1]]
        either = proportion([rows[0][i]["correct"] or rows[1][i]["correct"] for i in ids])
        parts.append(f"{name}: {proportion_text(either)}")
    return f"The union ceiling (right with {pair[0]} or with {pair[1]}, item by item): " + "; ".join(parts) + "."


def ceiling_line(out: Path, suite: str, arm: str, task: str = "facts", pair=UNIONS[0]) -> str:
    """`arm` (seed 0) against the union ceiling of `pair` on the same items: the difference in points with its
    paired 95% interval (paired_difference) and the exact sign test's p, on all items and by subset."""
    rows = [_answers(out, suite, name, task) for name in (arm, *pair)]
    if not all(rows):
        return ""
    parts = []
    for name, keep in subsets(task):
        ids = [i for i, r in rows[0].items() if keep(r) and i in rows[1] and i in rows[2]]
        got = [(bool(rows[0][i]["correct"]), bool(rows[1][i]["correct"] or rows[2][i]["correct"])) for i in ids]
        a_only, b_only = sum(x and not y for x, y in got), sum(y and not x for x, y in got)
        both = sum(x and y for x, y in got)
        d, (lo, hi) = paired_difference(a_only, b_only, both, len(got) - a_only - b_only - both)
        parts.append(f"{name} ({len(got)}): {100 * d:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}], right only "
                     f"with it {a_only}, only in the ceiling {b_only}, p = {sign_test(a_only, b_only):.4f}")
    return f"{arm} against that ceiling ({pair[0]} or {pair[1]}): " + "; ".join(parts) + "."


def hints_cost_line(out: Path, suite: str) -> str:
    """What the text hint arms' training hints cost: the large model answering the train facts (task facts_train,
    experiment.hinted_records), which their train minutes leave out; their test hints are that model's own
    evaluation, in its row."""
    parts = []
    for path in sorted((out / suite).glob("*/eval/facts_train.summary.json")):
        (s,) = json.loads(path.read_text())
        parts.append(f"{path.parent.parent.name} answered {s['n']} train facts in {s['seconds'] / 60:.1f} min")
    return ("The text hint's training hints (not in the hint arms' train minutes): " + "; ".join(parts) + "."
            if parts else "")


def cost_line(results: dict, suite: str) -> str:
    """The suite's measured time, summed over its arms and over every sitting each ran in."""
    arms = results["suites"][suite].values()
    train = sum(r.get("wall_seconds", 0) for r in arms) / 60
    tests = sum(s.get("seconds", 0) for r in arms for s in r["eval"].values()) / 60
    return (f"Time: training {train:.1f} min and test evaluations {tests:.1f} min ({train + tests:.1f} min, "
            f"{len(arms)} arms; curve points, decode-speed timing and model loads come on top).")


def paired_sections(results: dict, out: Path, suite: str) -> list[str]:
    """paired_table for each task the suite's arms were evaluated on, the suite's own task first."""
    tasks = sorted(evaluated_tasks(results, suite), key=lambda t: t != suite)
    return [f"Paired comparisons on the same {task} items:\n\n" + table
            for task in tasks if (table := paired_table(out, suite, task))]


def _acc(s: dict) -> str:
    return f"{s['accuracy']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] (n={s['n']})"


def suite_table(results: dict, out: Path, suite: str) -> str:
    arms = ordered(results, suite)
    head = headline(results, out, suite)
    tasks = evaluated_tasks(results, suite)
    cols = ["arm", "trainable params", "train min", "eval min", "peak GiB", *(
        ["facts, known relations", "facts, all relations", "facts, answers never seen in training"]
        if suite == "facts" else tasks),
        "decode tok/s b=1", "b=16"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in arms.items():
        accs = ([_acc(head[name]), _acc(r["eval"]["facts"]), _acc(r["eval"]["facts"]["unseen_answers"])]
                if suite == "facts"
                else [_acc(r["eval"][t]) if t in r["eval"] else "-" for t in tasks])
        train_min = f"{r['wall_seconds'] / 60:.1f}" if "wall_seconds" in r else "-"
        eval_min = f"{sum(s.get('seconds', 0) for s in r['eval'].values()) / 60:.1f}"  # test evaluations
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        lines.append(f"| {name} | {r['trainable_params']:,} | {train_min} | {eval_min} | {mem} | " + " | ".join(accs)
                     + f" | {r['speed']['batch_1']:.1f} | {r['speed']['batch_16']:.1f} |")
    if suite == "facts":
        prior = next(iter(arms.values()))["eval"]["facts"]["prior_baseline"]
        lines.append(f"\nThe floor of the relation's prior (its most frequent train answer for every question, no "
                     f"model): {_acc(prior)} over all relations.")
    return "\n".join(lines)


def curve_table(results: dict, suite: str) -> str:
    """The learning curves as numbers: held-out accuracy per kept step (facts: also on answers never seen)."""
    arms = {n: r["curve"] for n, r in ordered(results, suite).items() if r.get("curve")}
    lines = ["| arm | step | held-out accuracy | answers never seen in training |", "|---|---|---|---|"]
    for name, pts in arms.items():
        lines += [f"| {name} | {p['step']} | {_acc(p)} | "
                  f"{_acc(p['unseen_answers']) if 'unseen_answers' in p else '-'} |" for p in pts]
    return "\n".join(lines)


def plot_curves(results: dict, out: Path, suite: str, path: Path) -> None:
    """Held-out accuracy against training steps, one line per arm with a curve; on facts a second panel for the
    answers never seen in training (where knowledge of held-out subjects shows, not the relations' prior)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ordered(results, suite)
    curves = {n: r["curve"] for n, r in arms.items() if r.get("curve")}
    panels = [("held-out accuracy", lambda s: s)]
    if any("unseen_answers" in p for pts in curves.values() for p in pts):
        panels.append(("answers never seen in training", lambda s: s["unseen_answers"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (what, pick) in zip(axes[0], panels):
        for i, (name, pts) in enumerate(curves.items()):
            acc = [pick(p) for p in pts]
            ys = [a["accuracy"] for a in acc]
            err = [[y - a["ci95"][0] for y, a in zip(ys, acc)], [a["ci95"][1] - y for y, a in zip(ys, acc)]]
            ax.errorbar([p["step"] for p in pts], ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=name)
        if "large-alone" in arms:
            task = next(iter(arms["large-alone"]["eval"]))
            ax.axhline(pick(arms["large-alone"]["eval"][task])["accuracy"], ls="--", color="gray",
                       label="large alone (test items)")
        n = next((pick(pts[0])["n"] for pts in curves.values()), 0)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"{what} ({n} items, 95% CI)")
        ax.set_title(f"{suite}: learning curves, {what}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def plot_frontier(results: dict, out: Path, suite: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ordered(results, suite)
    head = headline(results, out, suite)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, r) in enumerate(arms.items()):
        s = head.get(name)
        if s is None:
            continue
        x = r["speed"]["batch_1"]
        ax.errorbar([x], [s["accuracy"]], yerr=[[s["accuracy"] - s["ci95"][0]], [s["ci95"][1] - s["accuracy"]]],
                    marker="o", capsize=3, color=f"C{i}")
        ax.annotate(name, (x, s["accuracy"]), textcoords="offset points", xytext=(5, 5 if i % 2 else -12),
                    fontsize=8)  # alternate above / below: neighbouring arms often sit at similar speeds
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens/s at batch 1 (log scale)")
    ax.set_ylabel("held-out accuracy (95% CI)")
    ax.set_title(f"{suite}: accuracy against decode speed")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def write_report(results: dict, out: Path) -> str:
    parts = []
    for suite in (s for s, arms in results["suites"].items() if arms):  # a suite whose arms were all skipped: none
        parts.append(f"## {suite}\n\n" + suite_table(results, out, suite))
        if suite == "facts" and (out / "facts" / "large-alone" / "eval" / "facts.jsonl").is_file():
            rels = facts_relations(out)
            parts.append("Known relations (the large model alone above 10%): " + ", ".join(rels) + ". The floor of "
                         "their prior on the same questions: "
                         + _acc(restricted(out, suite, "large-alone", rels, "prior_correct")) + ".")
        parts.append(cost_line(results, suite))
        if line := hints_cost_line(out, suite):
            parts.append(line)
        parts += paired_sections(results, out, suite)
        if suite == "facts" and (table := carried_table(out)):
            parts.append("Knowledge only the large model has, carried to the arm reading it:\n\n" + table)
        if "facts" in evaluated_tasks(results, suite):
            if table := summary_table(out, suite):
                parts.append("The summary comparisons, paired on the same facts questions (seed s of an arm with "
                             "seed s of the other; Newcombe's paired 95% interval on the pooled pairs, and the "
                             "interval with questions as units; exact sign test over questions, Holm over the "
                             "table):\n\n" + table)
            for pair in UNIONS:
                if line := union_line(out, suite, pair=pair):
                    parts.append(line)
                    parts += [line for arm in TO_CEILING if (line := ceiling_line(out, suite, arm, pair=pair))]
        if any(r.get("curve") for r in results["suites"][suite].values()):
            parts.append("Learning curves:\n\n" + curve_table(results, suite))
            plot_curves(results, out, suite, out / f"curves-{suite}.png")
        plot_frontier(results, out, suite, out / f"frontier-{suite}.png")
    text = "\n\n".join(parts) + "\n"
    atomic_write_text(out / "results.md", text)
    print(text)
    return text
