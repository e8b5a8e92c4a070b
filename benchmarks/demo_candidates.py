"""Which configuration the demo runs: each candidate trained and answered exactly as `llm-modules demo` does it.

    python benchmarks/demo_candidates.py [--output-dir runs/demo-candidates] [--questions 160] [--steps 30]
        [--candidates wide-sentence,wide-kd-sentence,narrow-object]

Each candidate is a combined model and the same small model alone (its own embeddings, no large model), trained on
the demo's facts for the demo's steps, then both answer the demo's held-out questions beside the large model alone
(answered once, shared by the candidates). Prints, side by side: held-out facts right and answers never seen in
training (95% Wilson intervals) and each arm's wall time, and writes <output-dir>/candidates.json. The pick is the
candidate that carries the most never-seen answers within the demo's 15 minutes (docs/demo.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine, set_threads, table, write_json  # noqa: E402

from llm_modules.__main__ import load_config  # noqa: E402
from llm_modules.demo import DEMO, DEMO_ARMS, SMALL_ALONE_WIDE, run_demo  # noqa: E402
from llm_modules.experiment import ARMS  # noqa: E402
from llm_modules.tasks import proportion_text  # noqa: E402

CANDIDATES = {  # name -> (combined arm, its small model alone)
    "wide-sentence": (ARMS["combined-large-wide-sentence"], SMALL_ALONE_WIDE),
    "wide-kd-sentence": (ARMS["combined-large-wide-kd-sentence"], SMALL_ALONE_WIDE),
    "narrow-object": (ARMS["combined-large"], ARMS["small-alone"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--output-dir", default="runs/demo-candidates")
    ap.add_argument("--questions", type=int, default=DEMO.tests["facts"])
    ap.add_argument("--steps", type=int, default=DEMO.steps)
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    cfg = load_config(args.config, {})
    out = Path(args.output_dir)
    rows, found = [], {}
    for name in args.candidates.split(","):
        combined, small = CANDIDATES[name]
        arms = {f"{name}": combined, small.name: small, "large-alone": DEMO_ARMS["large-alone"]}
        t0 = time.perf_counter()
        results = run_demo(cfg, out, questions=args.questions, steps=args.steps, arms=arms)
        found[name] = {arm: results[arm] for arm in arms} | {"wall_seconds": time.perf_counter() - t0}
        print(f"{name}: {found[name]['wall_seconds'] / 60:.1f} min (the large model alone's answers shared)")
        for arm in arms:
            s = results[arm]["facts"]
            rows.append([name, arm, proportion_text(s), proportion_text(s["unseen_answers"]),
                         f"{results[arm].get('wall_seconds', 0) / 60:.1f}"])
    print(describe_machine(machine()))
    print(table(rows, ["candidate", "arm", "held-out facts right", "answers never seen in training", "train min"]))
    write_json(out / "candidates.json", found)


if __name__ == "__main__":
    main()
