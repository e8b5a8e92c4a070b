"""How close `bridge.init: large` starts to the large model: top-1 agreement and KL(large || combined) at step 0.

    python benchmarks/warm_start.py [--config configs/default.yaml] [--paper] [--wide-small] [--problems 50]
        [--threads 2]

For each configuration: a training run is set up exactly as `llm-modules train` sets it up (its data, its feature
cache, the warm start fitted on its training states; no step is taken), then both models read the first
`--problems` GSM8K test problems with their reference answers (question + answer, formatted as the config trains)
and are compared on the answer tokens: the large model's own next-token distribution (its LM head on its final
state, over the tokens of the output vocabulary) against the combined model's. `bridge.init: paper` (random) is
measured beside it as the baseline. `--paper` adds the paper's widths: Qwen2.5-Coder-1.5B (1536) -> a random
GPT-Neo-125M-shaped small model (768, 12 layers), trained on the same data as the default config (its first
`--paper-examples` examples: the 1.5B reads about 20 tokens/s on 2 CPU threads).
`--wide-small` adds the config's large model with that GPT-Neo-125M-shaped small model (768 wide): the width alone
changed, on the same data. `--fit-data gsm8k` adds runs whose training data (and so the warm start's fit) is 300
GSM8K train problems instead of the config's own, to separate the width's limit from the distance between the
training data and GSM8K.
Prints a table and writes benchmarks/results/warm_start.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine, set_threads, table, write_json  # noqa: E402

from llm_modules.experiment import GPT_NEO_125M  # noqa: E402  the paper's small model shape

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    p.add_argument("--paper", action="store_true", help="also the paper's widths with the 1.5B large model")
    p.add_argument("--only-paper", action="store_true", help="the paper's widths only")
    p.add_argument("--wide-small", action="store_true",
                   help="also the config's large model with the paper's small model (768 wide, 12 layers)")
    p.add_argument("--paper-examples", type=int, default=100,
                   help="training examples at the paper's widths (the 1.5B reads about 20 tokens/s here)")
    p.add_argument("--problems", type=int, default=50, help="GSM8K test problems (default 50)")
    p.add_argument("--fit-data", default="config", help="comma-separated: config (the config's own training data), "
                                                         "gsm8k (300 GSM8K train problems)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "warm_start.json"))
    return p.parse_args(argv)


def gsm8k_examples(cfg, tokenizer, n: int) -> list:
    from llm_modules.data import tokenize
    from llm_modules.benchmark_data import find_data_dir, read_jsonl

    rows = read_jsonl(find_data_dir() / "gsm8k" / "test.jsonl")[:n]
    return [tokenize([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}],
                     tokenizer, style=cfg.data.format, system_prompt=cfg.data.system_prompt) for r in rows]


def large_states(model, examples) -> list:
    """The large model's final states for each example (computed once, shared by both inits)."""
    import torch

    with torch.no_grad():
        return [model.source_states(torch.tensor([ex.input_ids]), torch.ones(1, len(ex), dtype=torch.long),
                                    torch.arange(len(ex))[None]) for ex in examples]


def compare(model, head, examples, states) -> dict:
    """Top-1 agreement and mean KL(large || combined) over the answer tokens of `examples`."""
    import torch
    import torch.nn.functional as F

    V = model.lm_head.out_features
    agree, kl, n = 0, 0.0, 0
    with torch.no_grad():
        for ex, s in zip(examples, states):
            ids = torch.tensor([ex.input_ids])
            keep = torch.tensor(ex.labels[1:]) != -100
            large = F.log_softmax(s[0, :-1][keep].float() @ head[:V].T, -1)
            ours = F.log_softmax(model(ids, source_states=s).logits[0, :-1][keep].float(), -1)
            agree += int((large.argmax(-1) == ours.argmax(-1)).sum())
            kl += float((large.exp() * (large - ours)).sum())
            n += int(keep.sum())
    return {"answer_tokens": n, "top1_agreement": agree / n, "kl_large_to_combined": kl / n}


def measure(name: str, cfg, problems: int) -> list[dict]:
    from llm_modules.distill import load_teacher_head
    from llm_modules.train import setup

    rows, states = [], None
    head = load_teacher_head(cfg)
    for init in ("paper", "large"):
        with tempfile.TemporaryDirectory() as tmp:
            arm = cfg.replace(bridge={"init": init}, train={"output_dir": tmp})
            reports = []
            t0 = time.perf_counter()
            run = setup(arm, resume=False, log=lambda m: reports.append(m) or print(m, flush=True))
            setup_s = time.perf_counter() - t0
            model = run.unwrapped.eval()
            examples = gsm8k_examples(cfg, model.large_tokenizer, problems)
            if states is None:  # trained from the feature cache: load the large model once to read GSM8K
                from llm_modules.backbones import load_frozen_large

                if model.large is None:
                    model.large = load_frozen_large(cfg.large)
                states = large_states(model, examples)
            row = {"config": name, "init": init, "large_width": model.bridge.pre_proj.in_features,
                   "small_width": model.lm_head.in_features, "setup_seconds": setup_s,
                   **compare(model, head, examples, states)}
            row["warm_start"] = next((m for m in reports if m.startswith("bridge.init: large")), None)
            rows.append(row)
            print(row, flush=True)
            del run, model
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    set_threads(a.threads)
    from llm_modules.config import LLMModulesConfig

    base = LLMModulesConfig.from_yaml(a.config).replace(train={"num_threads": a.threads})
    configs = {} if a.only_paper else {Path(a.config).stem: base}
    paper_bridge = {"num_heads": 8, "adapter_dim": 256}
    if a.wide_small:
        configs[f"{Path(a.config).stem}, GPT-Neo-125M-shaped small model"] = base.replace(
            small={"config": GPT_NEO_125M}, bridge=paper_bridge)
    if a.paper or a.only_paper:
        configs["paper widths (1.5B -> GPT-Neo-125M shape)"] = base.replace(
            large={"name_or_path": "qwen2.5-coder-1.5b-instruct"},
            small={"config": GPT_NEO_125M}, bridge=paper_bridge, data={"max_examples": a.paper_examples})
    rows = []
    for name, cfg in configs.items():
        for fit in a.fit_data.split(","):
            if fit == "gsm8k":
                rows += measure(f"{name}, trained on GSM8K", cfg.replace(data={
                    "reasoning_gym_tasks": [], "benchmarks": ["gsm8k"],
                    "max_examples": min(300, cfg.data.max_examples or 300)}), a.problems)
            else:
                rows += measure(name, cfg, a.problems)
    print(table([[r["config"], r["init"], f"{r['large_width']} -> {r['small_width']}", r["answer_tokens"],
                  f"{r['top1_agreement']:.3f}", f"{r['kl_large_to_combined']:.3f}"] for r in rows],
                ["config", "bridge.init", "widths", "answer tokens", "top-1 agreement", "KL(large || combined)"]))
    for r in rows:
        if r["warm_start"]:
            print(f"{r['config']}: {r['warm_start']}")
    write_json(a.out, {"machine": machine(), "args": vars(a), "rows": rows})
    print(describe_machine(machine()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
