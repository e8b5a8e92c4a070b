"""The experiment's report: tables (results.md), learning curves and accuracy-speed frontiers (PNG)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from .files import atomic_write, atomic_write_text
from .tasks import proportion

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
        rows = [{r["id"]: r for r in _rows(out / suite / arm / "eval" / f"{task}.jsonl")} for arm in (a, b)]
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
        rows = [{r["id"]: r for r in _rows(out / "facts" / name / "eval" / "facts.jsonl")}
                for name in (arm, large, small)]
        if not all(rows):
            continue
        for name, keep in subsets("facts"):
            ids = [i for i, r in rows[1].items() if keep(r) and r["correct"] and i in rows[2] and i in rows[0]
                   and not rows[2][i]["correct"]]
            carried = sum(rows[0][i]["correct"] for i in ids)
            lines.append(f"| {arm} | {large} | {small}: {len(ids)} ({name}) | {carried} |")
    return "\n".join(lines) if len(lines) > 2 else ""


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
    cols = ["arm", "trainable params", "train min", "peak GiB", *(
        ["facts, known relations", "facts, all relations", "facts, answers never seen in training"]
        if suite == "facts" else tasks),
        "decode tok/s b=1", "b=16"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in arms.items():
        accs = ([_acc(head[name]), _acc(r["eval"]["facts"]), _acc(r["eval"]["facts"]["unseen_answers"])]
                if suite == "facts"
                else [_acc(r["eval"][t]) if t in r["eval"] else "-" for t in tasks])
        train_min = f"{r['wall_seconds'] / 60:.1f}" if "wall_seconds" in r else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if "peak_memory_gib" in r else "-"
        lines.append(f"| {name} | {r['trainable_params']:,} | {train_min} | {mem} | " + " | ".join(accs)
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
        parts += paired_sections(results, out, suite)
        if suite == "facts" and (table := carried_table(out)):
            parts.append("Knowledge only the large model has, carried to the arm reading it:\n\n" + table)
        if any(r.get("curve") for r in results["suites"][suite].values()):
            parts.append("Learning curves:\n\n" + curve_table(results, suite))
            plot_curves(results, out, suite, out / f"curves-{suite}.png")
        plot_frontier(results, out, suite, out / f"frontier-{suite}.png")
    text = "\n\n".join(parts) + "\n"
    atomic_write_text(out / "results.md", text)
    print(text)
    return text
