"""One-off: the measured figures of the lab-notebook docs/results.md (commit SOURCE) into docs/results/measured.json.

The experiment's raw outputs (runs/experiment/results.json and the answer files) are gone with the machines that
ran it; the figures survive only in that document's tables and text. This script parses the tables (every accuracy
becomes k of n, and k is accepted only if the project's own Wilson interval of k/n prints as the table did), copies
the paired counts the text reports (each checked against the p it printed, where it printed one) and writes the data
file once. Kept for provenance: rerunning it rewrites the same file.

    python scripts/extract_results.py
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from llm_modules.report import sign_test  # noqa: E402
from llm_modules.tasks import wilson  # noqa: E402

SOURCE = "591e982"  # the last commit of the lab-notebook docs/results.md
OUT = ROOT / "docs" / "results" / "measured.json"


def doc() -> str:
    return subprocess.run(["git", "show", f"{SOURCE}:docs/results.md"], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout


def table(text: str, header_start: str) -> list[list[str]]:
    """The rows (cells stripped) of the first markdown table whose header line starts with `header_start`."""
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.strip().startswith(header_start))
    rows = []
    for ln in lines[i + 2:]:
        if not ln.strip().startswith("|"):
            break
        rows.append([c.strip() for c in ln.strip().strip("|").split("|")])
    return rows


def ci_text(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def proportion(acc: float, lo: float, hi: float, n: int, where: str) -> dict:
    """k of n from a printed accuracy and interval; k must reproduce both."""
    k = round(acc * n)
    if f"{k / n:.3f}" != f"{acc:.3f}" or ci_text(wilson(k, n)) != ci_text([lo, hi]):
        raise SystemExit(f"{where}: no k of {n} gives {acc:.3f} [{lo:.3f}, {hi:.3f}] (k = {k}: "
                         f"{k / n:.3f} {ci_text(wilson(k, n))})")
    return {"k": k, "n": n, "ci95": [lo, hi]}


def acc_cell(cell: str, where: str) -> dict:
    m = re.fullmatch(r"([\d.]+) \[([\d.]+), ([\d.]+)\] \(n=(\d+)\)", cell)
    if m:
        return proportion(float(m[1]), float(m[2]), float(m[3]), int(m[4]), where)
    m = re.fullmatch(r"(\d+)/(\d+) = ([\d.]+) \[([\d.]+), ([\d.]+)\]", cell)
    if not m:
        raise SystemExit(f"{where}: cannot read {cell!r}")
    p = proportion(float(m[3]), float(m[4]), float(m[5]), int(m[2]), where)
    assert p["k"] == int(m[1]), where
    return p


def arm_seed(name: str) -> dict:
    """'combined-x-seed1 (2026-12-07, note)' -> arm combined-x, seed 1; ', again' -> the same seed run again."""
    again = ", again" in name
    name = re.sub(r"\s*\(.*\)$", "", name.replace(", again", "")).strip()
    m = re.fullmatch(r"(.+)-seed(\d+)", name)
    out = {"arm": m[1], "seed": int(m[2])} if m else {"arm": name, "seed": 0}
    if again:
        out["run"] = 2  # the same arm and seed trained and answered again in a later sitting
    return out


def number(cell: str):
    return None if cell == "-" else float(cell.replace(",", ""))


def facts_rows(text: str) -> list[dict]:
    rows = []
    for c in table(text, "| arm | trainable params | train min | peak GiB | facts, known"):
        r = arm_seed(c[0])
        train = re.match(r"([\d.]+)(.*)", c[2])
        r.update(trainable_params=int(c[1].replace(",", "")), train_min=float(train[1]) if train else None,
                 peak_gib=number(c[3]), known=acc_cell(c[4], c[0]), all=acc_cell(c[5], c[0]),
                 unseen=acc_cell(c[6], c[0]), tok_s_b1=float(c[7]), tok_s_b16=float(c[8]))
        extra = train[2].strip(" ()") if train else ""
        if extra:
            r["train_note"] = extra
        rows.append(r)
    return rows


def gsm8k_rows(text: str) -> list[dict]:
    rows = []
    for c in table(text, "| arm | trainable params | GSM8K (200)"):
        r = arm_seed(c[0].split(" (")[0])
        minutes, gib = re.search(r"([\d.]+) train min", c[0]), re.search(r"([\d.]+) GiB", c[0])
        r.update(trainable_params=int(c[1].replace(",", "")), train_min=float(minutes[1]) if minutes else None,
                 peak_gib=float(gib[1]) if gib else None, gsm8k=acc_cell(c[2], c[0]))
        for key, cell in (("hellaswag", c[3]), ("arc_easy", c[4])):
            if cell != "-":
                r[key] = acc_cell(cell, c[0])
        r.update(tok_s_b1=float(c[5]), tok_s_b16=float(c[6]))
        rows.append(r)
    # Runs outside the experiment's arm table, reported in the text (a train + eval by hand from an arm's arm.yaml).
    rows.append({"arm": "combined-large-wide-kd0.9", "seed": 0, "outside_experiment": True,
                 "trainable_params": 214446912, "train_min": 24.8, "peak_gib": 22.0,
                 "gsm8k": acc_cell("34/200 = 0.170 [0.124, 0.228]", "kd9"), "tok_s_b1": None, "tok_s_b16": None})
    rows.append({"arm": "combined-large-wide-untrained", "seed": 0, "outside_experiment": True,
                 "trainable_params": 214446912, "train_min": None, "peak_gib": None,
                 "gsm8k": acc_cell("44/200 = 0.220 [0.168, 0.282]", "wide0"), "tok_s_b1": None, "tok_s_b16": None})
    return rows


SUBSET = {"all": "all", "answers never seen in training": "unseen"}


def paired_rows(text: str) -> list[dict]:
    rows = []
    for c in table(text, "| arm | compared with | items |"):
        a, b = arm_seed(c[0]), arm_seed(c[1])
        m = re.fullmatch(r"(.+) \((\d+)\)", c[2])
        row = {"suite": "facts", "a": a["arm"], "a_seed": a["seed"], "b": b["arm"], "b_seed": b["seed"],
               "subset": SUBSET[m[1]], "n": int(m[2]), "a_only": int(c[3]), "b_only": int(c[4])}
        assert f"{sign_test(row['a_only'], row['b_only']):.4f}" == c[5], c
        rows.append(row)
    return rows


# The paired counts the text reports outside the paired table: (suite, a, a seed, b, b seed, subset, a_only, b_only,
# the p the text printed or None). Subsets: facts all (600), unseen (278); gsm8k all (200), the first 30 (curve);
# hellaswag / arc_easy all (500).
TEXT_PAIRS = [
    ("gsm8k", "combined-large", 0, "large-alone", 0, "all", 3, 44, "<0.0001"),
    ("gsm8k", "combined-large", 0, "small-alone", 0, "all", 7, 0, "0.016"),
    ("gsm8k", "combined-paper", 0, "combined-large", 0, "all", 5, 7, None),
    ("gsm8k", "combined-large-wide", 0, "combined-large", 0, "all", 14, 4, "0.03"),
    ("gsm8k", "combined-large-wide", 0, "lora", 0, "all", 9, 18, "0.12"),
    ("gsm8k", "combined-large-wide", 0, "smollm-ft", 0, "all", 16, 6, "0.053"),
    ("gsm8k", "combined-large-wide", 0, "large-alone", 0, "all", 4, 35, "<0.0001"),
    ("gsm8k", "combined-large-wide-kd", 0, "combined-large-wide", 0, "all", 27, 8, "0.002"),
    ("gsm8k", "combined-large-wide-kd", 0, "smollm-ft", 0, "all", 32, 3, "<0.0001"),
    ("gsm8k", "combined-large-wide-kd", 0, "lora", 0, "all", 27, 17, "0.17"),
    ("gsm8k", "combined-large-wide-kd", 0, "large-alone", 0, "all", 13, 25, "0.07"),
    ("gsm8k", "combined-large-wide-kd0.9", 0, "combined-large-wide-kd", 0, "all", 14, 16, "0.86"),
    ("gsm8k", "combined-large-wide-kd0.9", 0, "lora", 0, "all", 22, 14, "0.24"),
    ("gsm8k", "combined-large-wide-kd0.9", 0, "combined-large-wide", 0, "all", 23, 6, "0.002"),
    ("gsm8k", "combined-large-wide-kd0.9", 0, "large-alone", 0, "all", 9, 23, "0.02"),
    ("gsm8k", "combined-large-wide-untrained", 0, "large-alone", 0, "all", 19, 23, "0.64"),
    ("gsm8k", "combined-large-wide-untrained", 0, "lora", 0, "all", 30, 12, "0.008"),
    ("gsm8k", "combined-large-wide-untrained", 0, "combined-large-wide", 0, "all", 33, 6, "<0.0001"),
    ("gsm8k", "combined-large-wide-untrained", 0, "combined-large-wide-kd", 0, "all", 21, 13, "0.23"),
    ("gsm8k", "combined-large-wide-own", 0, "large-alone", 0, "all", 11, 18, "0.26"),
    ("gsm8k", "lora", 0, "combined-large", 0, "all", 25, 6, "0.0009"),
    ("gsm8k", "lora", 0, "large-alone", 0, "all", 13, 35, "0.002"),
    ("gsm8k", "smollm-ft", 0, "combined-large", 0, "all", 7, 7, None),
    ("gsm8k", "smollm-ft", 0, "lora", 0, "all", 6, 25, "0.0009"),
    ("gsm8k", "combined-large", 0, "distill", 0, "all", 7, 0, "0.016"),
    ("gsm8k", "prompt-smollm", 0, "smollm-ft", 0, "all", 1, 4, "0.38"),
    ("hellaswag", "combined-large", 0, "large-alone", 0, "all", 45, 75, "0.008"),
    ("arc_easy", "combined-large", 0, "large-alone", 0, "all", 30, 83, "<0.0001"),
    ("hellaswag", "combined-large", 0, "combined-paper", 0, "all", 110, 56, "<0.0001"),
    ("arc_easy", "combined-large", 0, "combined-paper", 0, "all", 72, 25, "<0.0001"),
    ("facts", "combined-large-wide-lr1e-5", 0, "large-alone", 0, "unseen", 3, 28, "<0.0001"),
    ("facts", "combined-large-wide-sentence-1.5b", 1, "smollm-ft-sentence", 1, "all", 50, 70, "0.08"),
    ("facts", "combined-large-wide-sentence-1.5b", 1, "smollm-ft-sentence", 1, "unseen", 16, 22, "0.42"),
    ("facts", "smollm-ft-sentence", 1, "smollm-ft-sentence", 0, "all", 26, 24, "0.89"),
    ("facts", "smollm-ft-sentence", 1, "smollm-ft-sentence", 0, "unseen", 7, 8, None),
    ("facts", "combined-large-wide-sentence-1.5b-240steps", 0, "combined-large-wide-sentence-1.5b", 1, "all", 44,
     29, "0.10"),
    ("facts", "combined-large-wide-sentence-1.5b-240steps", 0, "combined-large-wide-sentence-1.5b", 1, "unseen", 11,
     13, "0.84"),
    ("facts", "combined-large-wide-sentence-1.5b-240steps", 0, "smollm-ft-sentence", 0, "all", 61, 64, "0.86"),
    ("facts", "combined-large-wide-sentence-1.5b-240steps", 0, "smollm-ft-sentence", 0, "unseen", 11, 20, "0.15"),
    ("facts", "smollm-ft-sentence-240steps", 0, "smollm-ft-sentence", 0, "all", 42, 19, "0.004"),
    ("facts", "smollm-ft-sentence-240steps", 0, "smollm-ft-sentence", 0, "unseen", 7, 6, "1.0"),
    ("facts", "combined-large-wide-sentence-1.5b-240steps", 0, "smollm-ft-sentence-240steps", 0, "all", 43, 69,
     "0.018"),
    ("facts", "combined-large-wide-sentence-1.5b-240steps", 0, "smollm-ft-sentence-240steps", 0, "unseen", 13, 23,
     "0.13"),
    ("facts", "prompt-smollm-sentence-lrgate", 0, "smollm-ft-sentence", 0, "all", 14, 8, "0.29"),
    ("facts", "prompt-smollm-sentence-lrgate", 0, "smollm-ft-sentence", 0, "unseen", 2, 2, None),
    ("facts", "prompt-smollm-sentence-lrgate-1.5b", 0, "smollm-ft-sentence", 0, "all", 13, 10, "0.68"),
    ("facts", "prompt-smollm-sentence-lrgate-1.5b", 0, "smollm-ft-sentence", 0, "unseen", 1, 2, None),
    ("facts", "prompt-smollm-sentence-lrgate-1.5b", 0, "prompt-smollm-sentence-lrgate", 0, "all", 5, 8, None),
    ("facts", "prompt-smollm-sentence-lrgate-1.5b", 0, "prompt-smollm-sentence-lrgate", 0, "unseen", 0, 1, None),
    ("facts", "prompt-smollm-sentence-frozen-1.5b", 0, "smollm-ft-sentence", 0, "all", 23, 49, "0.003"),
    ("facts", "prompt-smollm-sentence-frozen-1.5b", 0, "smollm-ft-sentence", 0, "unseen", 4, 17, "0.007"),
    ("facts", "prompt-smollm-sentence-frozen-1.5b", 0, "prompt-smollm-sentence-lrgate-1.5b", 0, "all", 20, 49,
     "0.0006"),
    ("facts", "prompt-smollm-sentence-2stage-1.5b", 0, "smollm-ft-sentence", 0, "all", 42, 33, "0.36"),
    ("facts", "prompt-smollm-sentence-2stage-1.5b", 0, "smollm-ft-sentence", 0, "unseen", 7, 12, "0.36"),
    ("facts", "prompt-smollm-sentence-2stage-1.5b", 0, "smollm-ft-sentence-240steps", 0, "all", 25, 39, "0.10"),
    ("facts", "prompt-smollm-sentence-2stage-1.5b", 0, "smollm-ft-sentence-240steps", 0, "unseen", 6, 12, "0.24"),
    ("facts", "prompt-smollm-sentence-2stage-1.5b", 0, "prompt-smollm-sentence-frozen-1.5b", 0, "all", 54, 19,
     "0.0001"),
    ("facts", "prompt-smollm-sentence-2stage-1.5b", 1, "smollm-ft-sentence", 1, "all", 35, 27, "0.37"),
    ("facts", "prompt-smollm-sentence-2stage-1.5b", 1, "smollm-ft-sentence", 1, "unseen", 12, 8, "0.50"),
    ("facts", "prompt-smollm-sentence-2stage-1.5b", 1, "prompt-smollm-sentence-2stage-1.5b", 0, "all", 38, 37, None),
    ("facts", "prompt-smollm-sentence-2stage-1.5b", 1, "prompt-smollm-sentence-2stage-1.5b", 0, "unseen", 14, 6,
     "0.12"),
    ("facts", "prompt-smollm-sentence-2stage-every3-1.5b", 0, "smollm-ft-sentence", 0, "all", 44, 28, "0.076"),
    ("facts", "prompt-smollm-sentence-2stage-every3-1.5b", 0, "smollm-ft-sentence", 0, "unseen", 9, 10, None),
    ("facts", "prompt-smollm-sentence-2stage-every3-1.5b", 0, "smollm-ft-sentence-240steps", 0, "all", 26, 33,
     "0.44"),
    ("facts", "prompt-smollm-sentence-2stage-every3-1.5b", 0, "prompt-smollm-sentence-2stage-1.5b", 0, "all", 19, 12,
     "0.28"),
    ("facts", "prompt-smollm-sentence-2stage-every3-1.5b", 1, "smollm-ft-sentence", 1, "all", 35, 30, "0.62"),
    ("facts", "prompt-smollm-sentence-2stage-every3-1.5b", 1, "smollm-ft-sentence", 1, "unseen", 9, 9, None),
    ("facts", "prompt-smollm-sentence-2stage-every3-1.5b", 1, "prompt-smollm-sentence-2stage-every3-1.5b", 0, "all",
     30, 39, "0.34"),
    ("facts", "prompt-smollm-sentence-2stage-every2-1.5b", 0, "smollm-ft-sentence", 0, "all", 40, 31, "0.34"),
    ("facts", "prompt-smollm-sentence-2stage-every2-1.5b", 0, "smollm-ft-sentence", 0, "unseen", 6, 12, "0.24"),
    ("facts", "prompt-smollm-sentence-2stage-every2-1.5b", 0, "prompt-smollm-sentence-2stage-every3-1.5b", 0, "all",
     12, 19, "0.28"),
    ("facts", "prompt-smollm-sentence-2stage240-1.5b", 0, "smollm-ft-sentence", 0, "all", 36, 33, "0.81"),
    ("facts", "prompt-smollm-sentence-2stage240-1.5b", 0, "prompt-smollm-sentence-2stage-1.5b", 0, "all", 36, 42,
     "0.57"),
    ("facts", "prompt-smollm-sentence-2stage240-1.5b", 0, "smollm-ft-sentence-240steps", 0, "all", 20, 40, "0.014"),
]
N = {"facts": {"all": 600, "unseen": 278}, "gsm8k": {"all": 200}, "hellaswag": {"all": 500},
     "arc_easy": {"all": 500}}


def text_pairs() -> list[dict]:
    rows = []
    for suite, a, a_seed, b, b_seed, subset, a_only, b_only, printed in TEXT_PAIRS:
        p = sign_test(a_only, b_only)
        if printed is not None:  # the text rounds to two significant figures (or to 1.0), or says < 0.0001
            unit = 10 ** -(len(printed.split(".")[1]) if "." in printed else 0)
            off = 0.0 if printed == "<0.0001" and p < 0.0001 else abs(p - float(printed.lstrip("<"))) / unit
            if 0.5 < off <= 1:  # the text's p rounded once too often (0.0525 printed as 0.053)
                print(f"note: {a} vs {b} ({subset}): {a_only} against {b_only} gives p = {p:.4f}, the text "
                      f"printed {printed}")
            if off > 1:
                raise SystemExit(f"{a} vs {b} ({subset}): {a_only} against {b_only} gives p = {p:.4f}, the text "
                                 f"printed {printed}")
        rows.append({"suite": suite, "a": a, "a_seed": a_seed, "b": b, "b_seed": b_seed, "subset": subset,
                     "n": N[suite][subset], "a_only": a_only, "b_only": b_only})
    return rows


def curves(text: str) -> list[dict]:
    return [{**arm_seed(c[0]), "step": int(c[1]), "all": acc_cell(c[2], c[0]), "unseen": acc_cell(c[3], c[0])}
            for c in table(text, "| arm | step | held-out accuracy |")]


def carried(text: str) -> list[dict]:
    rows = []
    for c in table(text, "| arm reading the 1.5B model |"):
        rows.append({**arm_seed(c[0]), "of_54": None if c[1] == "-" else int(c[1]), "of_24_unseen": int(c[2])})
    return rows


def warm_start(text: str) -> dict:
    step0 = [{"config": c[0], "widths": c[1], "fitted_on": c[2], "init": c[3].strip("*"),
              "top1": float(c[4].strip("*")), "kl_nats": float(c[5].strip("*")),
              "seconds": None if c[6] == "-" else float(c[6].rstrip(" s"))}
             for c in table(text, "| config | widths (large -> small) |")]
    training = [{"init": c[0], "val_loss": [float(x) for x in c[1].strip("*").split(" / ")], "arm": arm}
                for c, arm in zip(table(text, "| bridge.init | validation loss"), ("combined-paper", "combined-large"))]
    return {"command": "python benchmarks/warm_start.py --threads 2 [--fit-data gsm8k | --only-paper --fit-data "
                       "config | --wide-small]",
            "measured_on": "the answer tokens of the first 50 GSM8K test problems (6,267 tokens), at step 0",
            "step0": step0, "val_loss_steps": [0, 30, 60, 120], "training": training}


def ablations(text: str) -> dict:
    arms = []
    for c in table(text, "| arm | held-out loss | perplexity | exact match |"):
        k, n = map(int, c[3].split("/"))
        arms.append({"arm": c[0], "loss": float(c[1]), "exact": {"k": k, "n": n},
                     "trainable_params": int(c[4].replace(",", "")), "steps": int(c[5]), "train_s": float(c[6]),
                     "answer_tok_s": float(c[7])})
    probe = [{"representation": c[0], "width": int(c[1]), "top1": float(c[2]), "kl": float(c[3])}
             for c in table(text, "| representation | width |")]
    return {"command": "llm-modules ablations --config configs/default.yaml --budget 40 --output-dir runs/ablations "
                       "--eval-examples 16 --arms combined,small-alone,gate-fixed-0.5,layers-1,layers-4,distill,"
                       "prompt-coupling",
            "scale": "Qwen2.5-Coder-0.5B-Instruct -> GPT-Neo shape 4 x 256; 251 reasoning-gym arithmetic problems, "
                     "40 steps of 8, seed 0; loss over 44 held-out examples, exact match on 16",
            "wall": "22 min 35 s, 12.5 GiB peak", "arms": arms, "probe": probe}


def dumps(value, indent: str = "") -> str:
    """JSON with one line per row: objects of objects open up, a row (a flat-ish object or a list) stays on one."""
    if isinstance(value, dict) and any(isinstance(v, (dict, list)) and len(json.dumps(v)) > 100
                                       for v in value.values()):
        inner = indent + " "
        return "{\n" + ",\n".join(f"{inner}{json.dumps(k)}: {dumps(v, inner)}" for k, v in value.items()) + \
            "\n" + indent + "}"
    if isinstance(value, list) and len(json.dumps(value)) > 100:
        inner = indent + " "
        return "[\n" + ",\n".join(inner + dumps(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


def main() -> None:
    text = doc()
    data = {
        "provenance": {
            "source": f"docs/results.md at commit {SOURCE} (scripts/extract_results.py); the runs' results.json "
                      "and answer files are lost with the machines that ran them",
            "machine": "2-vCPU AMD EPYC (avx2, hypervisor), 23.5 GiB RAM, torch 2.13 CPU, 2 threads, fp32",
            "large_models": {"0.5b": "Qwen2.5-Coder-0.5B-Instruct", "1.5b": "Qwen2.5-Coder-1.5B-Instruct"},
            "decode_speed": "tasks.decode_speed: 64-token prompt, 48 new tokens, tokens/s; measured in the sitting "
                            "each arm was evaluated in, so ratios across sittings carry up to 30% noise",
            "peak_gib": "an upper bound: the larger of the arm's training peak and the experiment process's peak",
        },
        "suites": {
            "facts": {"prior": {"known": acc_cell("0.231 [0.187, 0.282] (n=299)", "prior"),
                                "all": acc_cell("0.187 [0.158, 0.220] (n=600)", "prior")},
                      "rows": facts_rows(text)},
            "gsm8k": {"rows": gsm8k_rows(text)},
        },
        # Names in this file that are not in llm_modules.experiment.ARMS: what each is.
        "outside_arms": {"combined-large-wide-untrained": {
            "base": "combined-large-wide", "differs": "0 training steps: the warm start alone (its step-0 "
            "checkpoint rebuilt with llm-modules train --max-steps 0, then llm-modules eval --task gsm8k)"}},
        "paired": paired_rows(text) + text_pairs(),
        "carried": carried(text),
        "curves": {"facts": curves(text)},
        "cost": [
            {"suite": "facts", "arms": 10, "train_min": 124.0, "test_eval_min": 35.7, "curve_min": 62.5, "hours": 3.7},
            {"suite": "gsm8k", "arms": 10, "train_min": 124.3, "test_eval_min": 269.8, "curve_min": 45.7, "hours": 7.7},
        ],
        "warm_start": warm_start(text),
        "ablations": ablations(text),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(dumps(data) + "\n")
    print(f"wrote {OUT}: {len(data['suites']['facts']['rows'])} facts rows, {len(data['suites']['gsm8k']['rows'])} "
          f"GSM8K rows, {len(data['paired'])} paired counts, {len(data['curves']['facts'])} curve points")


if __name__ == "__main__":
    main()
