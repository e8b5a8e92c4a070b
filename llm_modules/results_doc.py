"""The generated parts of docs/results.md and README.md, rendered from docs/results/measured.json.

Every measured figure lives once, in the data file (k of n for each accuracy; the paired counts); the tables, the
glossary of arm names (from experiment.ARMS), the cited paired tests and the plots are rendered from it, between
marker comments, so the prose around them is written by hand and no number is typed twice:

    <!-- generated: summary-table -->
    ...
    <!-- /generated -->

    python -m llm_modules.results_doc            # rewrite the blocks and redraw the plots in docs/
    python -m llm_modules.results_doc --check    # exit 1 if a block differs from what the data renders
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .experiment import ARMS, GPT_NEO_125M, SMOLLM, Arm
from .report import plot_curves, plot_frontier, sign_test
from .tasks import proportion, proportion_text, wilson

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "results" / "measured.json"
FILES = (ROOT / "docs" / "results.md", ROOT / "docs" / "warm-start.md", ROOT / "README.md")
BLOCK = re.compile(r"(<!-- generated: ([a-z0-9-]+) -->\n)(.*?)(<!-- /generated -->)", re.S)

FAMILIES = ("large alone", "stream combined", "prompt coupling", "SmolLM2 fine-tuned", "LoRA", "small alone / distill")
SUBSETS = {"all": "all", "unseen": "never-seen answers"}
# The paired comparisons docs/results.md's findings rest on, by the id the prose cites: (suite, arm, its seed, the
# arm it is compared with, that one's seed). The appendix shows each on every subset the data holds for it.
CITED = {
    "P1": ("facts", "combined-large-wide-sentence-1.5b", 0, "smollm-ft-sentence", 0),
    "P2": ("facts", "combined-large-wide-sentence-1.5b", 1, "smollm-ft-sentence", 1),
    "P3": ("facts", "prompt-smollm-sentence-2stage-1.5b", 0, "smollm-ft-sentence", 0),
    "P4": ("facts", "prompt-smollm-sentence-2stage-every3-1.5b", 1, "smollm-ft-sentence", 1),
    "P5": ("facts", "combined-large-wide-sentence-1.5b-240steps", 0, "smollm-ft-sentence-240steps", 0),
    "P6": ("facts", "combined-large-wide", 0, "large-alone", 0),
    "P7": ("facts", "combined-large-wide-sentence", 0, "large-alone", 0),
    "P8": ("facts", "combined-large-wide-sentence-1.5b", 0, "combined-large-wide-sentence", 0),
    "P9": ("gsm8k", "combined-large-wide-own", 0, "large-alone", 0),
    "P10": ("gsm8k", "combined-large-wide-untrained", 0, "combined-large-wide", 0),
}


# ---- the data ---------------------------------------------------------------------------------------------------
def load(path: Path = DATA) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def arm_of(name: str, data: dict) -> Arm:
    """The experiment arm a row's name stands for (a name outside ARMS: the arm it was made from)."""
    return ARMS[name] if name in ARMS else ARMS[data["outside_arms"][name]["base"]]


def family(arm: Arm) -> str:
    """The one definition of an arm's family, from what it trains and how it couples."""
    if arm.kind == "large":
        return "large alone"
    if arm.kind == "finetune":
        return "LoRA" if arm.method == "lora" else "SmolLM2 fine-tuned"
    return {"prompt": "prompt coupling", "none": "small alone / distill"}.get(arm.over.get("coupling", "stream"),
                                                                                  "stream combined")


def rows(data: dict, suite: str) -> list[dict]:
    """The suite's rows grouped by family, each family in the experiment's arm order, seeds in order."""
    order = {name: i for i, name in enumerate(ARMS)}
    key = (lambda r: (FAMILIES.index(family(arm_of(r["arm"], data))), order.get(r["arm"], len(order)), r["seed"],
                      r.get("run", 1)))
    return sorted(data["suites"][suite]["rows"], key=key)


def acc(p: dict) -> str:
    k, n = p["k"], p["n"]
    return proportion_text({"correct": k, "n": n, "accuracy": k / n, "ci95": wilson(k, n)})


def num(x, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(head: list[str], body: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(r) + " |" for r in body])


def seed_text(r: dict) -> str:
    return f"{r['seed']}" + (", again" if r.get("run", 1) > 1 else "")


# ---- blocks -----------------------------------------------------------------------------------------------------
def summary_picks(data: dict) -> list[tuple[str, dict, dict | None]]:
    """One (family, facts row, GSM8K row) per family: its best arm on held-out facts (all questions, seed 0; the
    large model alone at both sizes) and the family's best trained GSM8K arm."""
    facts, gsm = rows(data, "facts"), rows(data, "gsm8k")
    out = []
    for fam in FAMILIES:
        mine = [r for r in facts if family(arm_of(r["arm"], data)) == fam and r["seed"] == 0 and "run" not in r]
        picks = mine if fam == "large alone" else [max(mine, key=lambda r: r["all"]["k"])]
        g = [r for r in gsm if family(arm_of(r["arm"], data)) == fam and not r.get("outside_experiment")]
        for r in picks:
            best = next((x for x in g if x["arm"] == r["arm"]), None) if fam == "large alone" else max(
                g, key=lambda x: x["gsm8k"]["k"])
            out.append((fam, r, best))
    return out


def summary_table(data: dict) -> str:
    body = []
    for fam, r, best in summary_picks(data):
        cell = "-" if best is None else acc(best["gsm8k"]) + ("" if best["arm"] == r["arm"] else f" (`{best['arm']}`)")
        body.append([fam, f"`{r['arm']}`", acc(r["all"]), acc(r["unseen"]), cell, num(r["tok_s_b1"]),
                     num(r["tok_s_b16"]), f"{r['trainable_params']:,}"])
    return table(["family", "arm (best on facts)", "held-out facts, all", "facts, never-seen answers",
                  "GSM8K (the family's best trained arm)", "decode tok/s b=1", "b=16", "trainable params"], body)


def facts_table(data: dict) -> str:
    body, last = [], None
    for r in rows(data, "facts"):
        fam = family(arm_of(r["arm"], data))
        train = num(r["train_min"]) + (f" ({r['train_note']})" if r.get("train_note") else "")
        body.append([f"**{fam}**" if fam != last else "", f"`{r['arm']}`", seed_text(r),
                     f"{r['trainable_params']:,}", train, num(r["peak_gib"]), acc(r["known"]), acc(r["all"]),
                     acc(r["unseen"]), num(r["tok_s_b1"]), num(r["tok_s_b16"])])
        last = fam
    prior = data["suites"]["facts"]["prior"]
    return table(["family", "arm", "seed", "trainable params", "train min", "peak GiB", "known relations", "all",
                  "never-seen answers", "tok/s b=1", "b=16"], body) + (
        f"\n\nNo model, the relation's most frequent train answer every time: {acc(prior['known'])} on the known "
        f"relations, {acc(prior['all'])} on all, 0 never-seen answers.")


def gsm8k_table(data: dict) -> str:
    body, last = [], None
    for r in rows(data, "gsm8k"):
        fam = family(arm_of(r["arm"], data))
        body.append([f"**{fam}**" if fam != last else "", f"`{r['arm']}`" + ("²" if r.get("outside_experiment")
                                                                              else ""),
                     f"{r['trainable_params']:,}", num(r["train_min"]), num(r["peak_gib"]), acc(r["gsm8k"]),
                     *(acc(r[t]) if t in r else "-" for t in ("hellaswag", "arc_easy")),
                     num(r["tok_s_b1"]), num(r["tok_s_b16"])])
        last = fam
    return table(["family", "arm", "trainable params", "train min", "peak GiB", "GSM8K", "HellaSwag", "ARC-Easy",
                  "tok/s b=1", "b=16"], body) + (
        "\n\n² run by hand outside `llm-modules experiment`, from an arm's `arm.yaml`: "
        + "; ".join(f"`{name}` is `{o['base']}` with {o['differs']}" for name, o in data["outside_arms"].items())
        + "; `combined-large-wide-kd0.9` trained with `llm-modules train` and answered with `llm-modules eval`.")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if v == SMOLLM:
            out[prefix + k] = "SmolLM2-135M-Instruct (pretrained)"
        elif v == GPT_NEO_125M:
            out[prefix + k] = "GPT-Neo-125M shape (768 x 12, random)"
        elif isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _settings(arm: Arm) -> dict:
    return {**_flat(arm.over), **({"own_solutions": True} if arm.own_solutions else {})}


def shown(data: dict) -> set[str]:
    """Every arm name the data's tables and comparisons show."""
    names = {r["arm"] for suite in data["suites"].values() for r in suite["rows"]}
    names |= {p[k] for p in data["paired"] for k in ("a", "b")} | {r["arm"] for r in data["carried"]}
    return names


def _parent(arm: Arm, among: set[str]) -> tuple[str, dict]:
    """The earlier arm of the same family this one differs least from (fewest settings it lacks, then fewest that
    differ, then fewest it adds; the first of equals), or the suite's config when no arm is closer; and the
    settings that differ."""
    mine = _settings(arm)
    best, score = ("the suite's config", mine), (0, len(mine), len(mine))
    for other in ARMS.values():
        if other.name == arm.name:
            break
        if family(other) != family(arm) or other.name not in among:
            continue
        theirs = _settings(other)
        diff = {k: mine.get(k, "default") for k in {*mine, *theirs} if mine.get(k, "default") != theirs.get(k,
                                                                                                            "default")}
        s = (sum(k not in mine for k in diff), len(diff), sum(k not in theirs for k in diff))
        if s < score:
            best, score = (f"`{other.name}`", diff), s
    return best


def glossary(data: dict) -> str:
    body, names = [], shown(data)
    for arm in ARMS.values():
        if arm.name not in names:
            continue  # not measured here (a seed is a row of its arm)
        parent, diff = _parent(arm, names)
        changes = ", ".join(f"`{k}: {v}`" for k, v in sorted(diff.items())) or "-"
        kind = {"large": "evaluated only", "train": "llm-modules train",
                "finetune": f"llm-modules finetune ({arm.method}, {arm.base})"}[arm.kind]
        body.append([f"`{arm.name}`", family(arm), kind, parent, changes, arm.note])
    for name, o in data["outside_arms"].items():
        body.append([f"`{name}`", family(arm_of(name, data)), "by hand", f"`{o['base']}`", o["differs"], ""])
    seeds = sorted({r["seed"] for suite in data["suites"].values() for r in suite["rows"]} - {0})
    return table(["arm", "family", "how", "base", "what differs from it", "note"], body) + (
        f"\n\nA row with seed {', '.join(map(str, seeds))} is the arm with `bridge.seed` and `train.seed` set to it "
        "(`ARM-seedN` in `--arms`): the initialization, the batches' order and dropout drawn again.")


def _pairs(data: dict, key: tuple) -> list[dict]:
    return [p for p in data["paired"] if (p["suite"], p["a"], p["a_seed"], p["b"], p["b_seed"]) == key]


def p_text(p: float) -> str:
    return "< 0.0001" if p < 0.0001 else f"{p:.4f}"


def paired_tests(data: dict) -> str:
    body = []
    for cid, key in CITED.items():
        found = _pairs(data, key)
        if not found:
            raise ValueError(f"{cid}: no paired counts for {key} in {DATA.name}")
        for p in found:
            body.append([cid, p["suite"], f"`{p['a']}` (seed {p['a_seed']})", f"`{p['b']}` (seed {p['b_seed']})",
                         f"{SUBSETS[p['subset']]} ({p['n']})", str(p["a_only"]), str(p["b_only"]),
                         p_text(sign_test(p["a_only"], p["b_only"]))])
    return table(["id", "suite", "arm", "compared with", "items", "right only in the arm", "right only in the other",
                  "p (exact sign test, two-sided)"], body)


def carried_table(data: dict) -> str:
    body = [[f"`{r['arm']}`", str(r["seed"]), num(r["of_54"], "{}"), str(r["of_24_unseen"])] for r in data["carried"]]
    return table(["arm reading the 1.5B model", "seed", "of the facts only the 1.5B model knows",
                  "of them never-seen answers"], body)


def cost_table(data: dict) -> str:
    body = [[c["suite"], str(c["arms"]), num(c["train_min"]), num(c["test_eval_min"]), num(c["curve_min"]),
             num(c["hours"])] for c in data["cost"]]
    every = {s: sum(r["train_min"] or 0 for r in data["suites"][s]["rows"]) for s in data["suites"]}
    return table(["suite", "arms (the default set)", "training min", "test evaluation min", "curve points min",
                  "hours of the 2 cores, all in"], body) + (
        "\n\nTraining minutes of every row of the tables above, follow-up arms and seeds included: "
        + ", ".join(f"{s} {m:.0f}" for s, m in every.items()) + ".")


def warm_start_table(data: dict) -> str:
    w = data["warm_start"]
    body = [[s["config"], s["widths"], s["fitted_on"], s["init"], f"{s['top1']:.3f}", f"{s['kl_nats']:.2f}",
             num(s["seconds"])] for s in w["step0"]]
    facts = {r["arm"]: r for r in data["suites"]["facts"]["rows"] if r["seed"] == 0}
    train = [[t["init"], f"`{t['arm']}`", " / ".join(f"{x:.2f}" for x in t["val_loss"]),
              acc(facts[t["arm"]]["all"]), acc(facts[t["arm"]]["unseen"])] for t in w["training"]]
    steps = " / ".join(map(str, w["val_loss_steps"]))
    return (f"On {w['measured_on']} (`{w['command']}`):\n\n"
            + table(["config", "widths (large -> small)", "fitted on", "bridge.init", "top-1 agreement",
                     "KL (nats)", "fit s"], body)
            + "\n\nTrained (the facts suite, 256 wide):\n\n"
            + table(["bridge.init", "arm", f"validation loss at step {steps}", "held-out facts, all",
                     "never-seen answers"], train))


def ablations_table(data: dict) -> str:
    a = data["ablations"]
    body = [[f"`{r['arm']}`", f"{r['loss']:.3f}", f"{r['exact']['k']}/{r['exact']['n']}",
             f"{r['trainable_params']:,}", str(r["steps"]), num(r["train_s"], "{:.0f}"), num(r["answer_tok_s"])]
            for r in a["arms"]]
    probe = ", ".join(f"{p['representation']} ({p['width']}) {p['top1']:.3f}" for p in a["probe"])
    return (f"`{a['command']}` ({a['scale']}; {a['wall']}):\n\n"
            + table(["arm", "held-out loss (nats/token)", "exact match", "trainable params", "steps", "train s",
                     "answer tok/s"], body)
            + f"\n\nProbe (a ridge read-out of each bridge representation through the large model's head; top-1 "
              f"agreement with the large model on held-out positions): {probe}.")


def measured_arms(data: dict) -> list[str]:
    """Every experiment arm of the tables as `--arms` names it (seed N: ARM-seedN), in the experiment's order."""
    names = {r["arm"] + (f"-seed{r['seed']}" if r["seed"] else "") for suite in data["suites"].values()
             for r in suite["rows"] if not r.get("outside_experiment")}
    return [a for a in ARMS if a in names]


def provenance(data: dict) -> str:
    p = data["provenance"]
    return (f"Measured on {p['machine']}. Every experiment arm of the tables ({len(measured_arms(data))}, seeds "
            "included), both suites, resumable (a rerun skips what is done):\n\n```bash\n"
            'llm-modules experiment --output-dir runs/experiment --arms "$(python -m llm_modules.results_doc '
            '--arms)"\n```')


# Block name -> its renderer. README's answer table and docs/results.md's summary table are the same table.
BLOCKS = {"summary-table": summary_table, "answer-table": summary_table, "provenance": provenance,
          "glossary": glossary, "facts-table": facts_table, "gsm8k-table": gsm8k_table, "paired-tests": paired_tests,
          "carried": carried_table, "cost": cost_table, "warm-start": warm_start_table, "ablations": ablations_table}


# ---- plots (report's, on the data in the shape of an experiment's results.json) ----------------------------------
def _proportion(p: dict) -> dict:
    return proportion([True] * p["k"] + [False] * (p["n"] - p["k"]))


def _results(data: dict, suite: str, task: str, arms: list[str], value) -> dict:
    """{"suites": {suite: arm -> {"eval": {task: ...}, "speed", "curve"}}} for report's plots, seed 0 rows."""
    curves: dict = {}
    for c in data["curves"].get(suite, []):
        if c["seed"] == 0:
            curves.setdefault(c["arm"], []).append({"step": c["step"], **_proportion(c["all"]),
                                                    "unseen_answers": _proportion(c["unseen"])})
    out = {}
    for r in rows(data, suite):
        if r["arm"] in arms and r["seed"] == 0 and "run" not in r and r["arm"] not in out:
            out[r["arm"]] = {"eval": {task: value(r)}, "speed": {"batch_1": r["tok_s_b1"], "batch_16": r["tok_s_b16"]},
                             **({"curve": curves[r["arm"]]} if r["arm"] in curves else {})}
    return {"suites": {task: out}, "arm_order": arms}


def plot(data: dict, docs: Path) -> list[Path]:
    """The facts curves (the default arms, then the follow-up arms) and the accuracy-speed frontiers."""
    facts = lambda r: {**_proportion(r["all"]), "unseen_answers": _proportion(r["unseen"])}  # noqa: E731
    curved = [a for a in ARMS if a in {c["arm"] for c in data["curves"]["facts"]}]
    written = []
    for name, arms in (("results-curves-facts.png", [a for a in curved if not ARMS[a].followup]),
                       ("results-curves-facts-followups.png", [a for a in curved if ARMS[a].followup])):
        plot_curves(_results(data, "facts", "facts", ["large-alone", *arms], facts), docs, "facts", docs / name)
        written.append(docs / name)
    summary = [r["arm"] for _, r, _ in summary_picks(data)]
    task = "held-out facts, all questions"
    plot_frontier(_results(data, "facts", task, summary, lambda r: _proportion(r["all"])), docs, task,
                  docs / "results-frontier-facts.png")
    gsm = [r["arm"] for r in rows(data, "gsm8k") if r["tok_s_b1"] is not None]
    plot_frontier(_results(data, "gsm8k", "gsm8k", gsm, lambda r: _proportion(r["gsm8k"])), docs, "gsm8k",
                  docs / "results-frontier-gsm8k.png")
    return [*written, docs / "results-frontier-facts.png", docs / "results-frontier-gsm8k.png"]


# ---- the files --------------------------------------------------------------------------------------------------
def render(text: str, data: dict) -> str:
    """`text` with every generated block rendered anew from `data`; the rest untouched."""
    def block(m: re.Match) -> str:
        if m[2] not in BLOCKS:
            raise ValueError(f"unknown generated block {m[2]!r}; known: {', '.join(BLOCKS)}")
        return f"{m[1]}\n{BLOCKS[m[2]](data)}\n\n{m[4]}"
    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_modules.results_doc", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated block is stale, write nothing")
    parser.add_argument("--no-plots", action="store_true", help="rewrite the text blocks only")
    parser.add_argument("--arms", action="store_true", help="print the measured experiment arms, comma-separated")
    args = parser.parse_args(argv)
    data, stale = load(), []
    if args.arms:
        print(",".join(measured_arms(data)))
        return 0
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        if not BLOCK.search(text):
            print(f"{path.relative_to(ROOT)}: no <!-- generated: NAME --> markers, skipped")
            continue
        new = render(text, data)
        if new == text:
            print(f"{path.relative_to(ROOT)}: up to date")
        elif args.check:
            stale.append(path)
            print(f"{path.relative_to(ROOT)}: stale; run python -m llm_modules.results_doc")
        else:
            path.write_text(new, encoding="utf-8")
            print(f"{path.relative_to(ROOT)}: rewritten")
    if not args.check and not args.no_plots:
        for path in plot(data, ROOT / "docs"):
            print(f"{path.relative_to(ROOT)}: drawn")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
