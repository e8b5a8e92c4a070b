"""Batch-1 cached decoding of the combined model, side by side: the model as built (stock nn.Linear), the project's
opt-in CPU layout (row_split.prepare_for_cpu_decoding), and the standard tools that could replace it: int8
dynamic quantization of the two language models' nn.Linear layers (torch.ao.quantization.quantize_dynamic;
the bridge and head stay fp32) and torch.compile.

    python benchmarks/decode_options.py [--config configs/default.yaml] [--new-tokens 48] [--repeats 3] [--compile]

One process, one prompt, greedy; each variant is a fresh model from the same config (same weights: trainable parts
seeded), timed --repeats times with common.time_stream, the best run kept. Prints decode tokens/s (median step) and
whether the tokens equal the stock model's. torch.compile is tried only with --compile (its first calls compile for
minutes on CPU; the time to first token is reported separately). Writes benchmarks/results/decode_options.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine, median, set_threads, table, time_stream, write_json  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def variants(with_compile: bool) -> dict:
    import torch

    from llm_modules.row_split import prepare_for_cpu_decoding

    def int8(model):  # the two language models' linears (the head's dtype is read by the coupling: kept fp32)
        model.requires_grad_(False).eval()
        for part in ("large", "small"):
            setattr(model, part, torch.ao.quantization.quantize_dynamic(getattr(model, part), {torch.nn.Linear},
                                                                        dtype=torch.qint8))
        return model

    def compiled(model):
        model.requires_grad_(False).eval()
        model.forward = torch.compile(model.forward, dynamic=True)
        return model

    out = {"stock nn.Linear (as built)": lambda m: m.requires_grad_(False).eval(),
           "row_split.prepare_for_cpu_decoding": prepare_for_cpu_decoding,
           "int8 dynamic quantization of the large and small models (torch.ao)": int8}
    if with_compile:
        out["torch.compile (dynamic shapes)"] = compiled
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also try torch.compile (slow to compile on CPU)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decode_options.json"))
    a = p.parse_args(argv)
    set_threads(a.threads)
    import torch

    from llm_modules import LLMModules, LLMModulesConfig

    m = machine()
    print(describe_machine(m))
    cfg = LLMModulesConfig.from_yaml(a.config)
    rows, results, reference = [], {}, None
    for name, prepare in variants(a.compile).items():
        model = prepare(LLMModules.from_config(cfg))
        high = min(model.lm_head.out_features, 150000)
        ids = torch.randint(0, high, (1, a.prompt_tokens), generator=torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        time_stream(model, ids, 2)  # warm-up (and torch.compile's compilation); stream runs without gradients
        warm_s = time.perf_counter() - t0
        runs = []
        for _ in range(a.repeats):
            steps, tokens = time_stream(model, ids, a.new_tokens)
            runs.append(steps)
        best = min(runs, key=lambda s: median(s[1:]))
        reference = reference or tokens
        tok_s = 1 / median(best[1:])
        results[name] = {"decode_tok_s_median": tok_s, "prefill_s": best[0], "warmup_s": warm_s,
                         "tokens_equal_stock": tokens == reference, "runs_s": runs}
        rows.append([name, f"{tok_s:.2f}", f"{best[0]:.2f}", f"{warm_s:.1f}", tokens == reference])
        del model
    print(table(rows, ["variant", "decode tok/s (median step)", "prefill s", "first 2 tokens s",
                       "same tokens as stock"]))
    write_json(a.out, {"machine": m, "args": vars(a), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
