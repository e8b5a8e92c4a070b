"""Decode speed of evaluation (`eval --task`): the combined model vs `transformers` `generate` of its large model alone.

    python benchmarks/eval_speed.py [--checkpoint runs/demo/combined] [--batch-sizes 1,16] [--threads 2]

Both answer through the generators `eval --task` uses (tasks.ArmGenerator: the project's cached decoding loop;
tasks.HFGenerator: the large model with its own head and chat template through `generate`): greedy, prompts of about
`--prompt-tokens` tokens in each model's own prompt format, every row made to generate `--new-tokens` tokens,
prefill included. The two are timed alternately, `--rounds` times, in one process; the best round of each is kept.
Without a checkpoint, the default config's combined model is built with its random trainable weights (the speed does
not depend on them). Prints a table and writes benchmarks/results/eval_speed.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine, set_threads, table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a trained combined model (default: configs/default.yaml, untrained)")
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "eval_speed.json"))
    a = p.parse_args(argv)
    set_threads(a.threads)
    from llm_modules import LLMModules, LLMModulesConfig
    from llm_modules.loading import load_for_eval
    from llm_modules.row_split import prepare_for_cpu_decoding
    from llm_modules.tasks import ArmGenerator, HFGenerator, decode_speed

    if a.checkpoint:
        combined = load_for_eval(a.checkpoint)[0]
        source = a.checkpoint
    else:
        combined = prepare_for_cpu_decoding(LLMModules.from_config(LLMModulesConfig.from_yaml(a.config)))
        source = a.config
    lm, tok, _, _ = load_for_eval(source, large_only=True)
    arms = {"combined (eval --task, cached decoding)": ArmGenerator(combined.eval()),
            "large model alone (transformers generate)": HFGenerator(lm.eval(), tok)}
    rows, results = [], {}
    for b in map(int, a.batch_sizes.split(",")):
        best = {name: 0.0 for name in arms}
        for _ in range(a.rounds):  # alternate, so drifting machine load touches both alike
            for name, gen in arms.items():
                best[name] = max(best[name], decode_speed(gen, b, a.prompt_tokens, a.new_tokens, repeats=1))
        results[b] = best
        ratio = best[next(iter(arms))] / best[list(arms)[1]]
        rows += [[b, name, f"{tps:.1f}"] for name, tps in best.items()]
        rows.append([b, "combined / large alone", f"{ratio:.2f}x"])
    print(table(rows, ["batch", "model", "decode tokens/s"]))
    print(describe_machine(machine()))
    write_json(a.out, {"machine": machine(), "args": vars(a), "tokens_per_s": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
