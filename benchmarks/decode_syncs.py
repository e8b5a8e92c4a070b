"""Host synchronizations of greedy decoding, counted on the CPU (issue 49): per generated token, inside one decode
step and over a whole `generate` call (set-up included), at batch 1 and for a left-padded batch of 3.

    python benchmarks/decode_syncs.py [--new-tokens 32] [--check-every 1] [--sites]

The model has the paper's layer counts at tiny widths (a 28-layer Qwen2 large model, 2 bridge layers, a 12-layer
GPT-Neo small model with alternating global / local attention) and random weights; 1 thread. What is counted and
why: llm_modules/host_syncs.py. --sites prints where each synchronization is made; --check-every n tests whether
every row has finished once every n steps (generate's check_every; same tokens). Takes about 10 seconds.

Measured (1 thread, 32 new tokens, check_every 1), syncs in one decode step / per generated token over generate:
before issue 49's changes (commit 762561f) 14 / 18.03 at batch 1 and 14 / 22.06 for the left-padded batch of 3
(reads alone, without host-to-device copies: 5.03 and 9.06); after, 0 / 1.09 for both, and 0 / 0.25 for both with
--check-every 8.
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]

from common import set_threads  # noqa: E402

TINY_PAPER = {
    "large": {"model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 28, "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"model_type": "gpt_neo", "vocab_size": 96, "bos_token_id": 0, "eos_token_id": 0, "hidden_size": 32,
              "num_layers": 12, "num_heads": 4, "attention_types": [[["global", "local"], 6]], "window_size": 8,
              "max_position_embeddings": 256},
    "bridge": {"num_layers": 2, "num_heads": 4, "adapter_dim": 8, "dropout": 0.0},
}


def build_tiny_paper():
    from llm_modules import LLMModules, LLMModulesConfig

    return LLMModules.from_config(LLMModulesConfig.from_dict(
        {"large": {"config": TINY_PAPER["large"]}, "small": {"config": TINY_PAPER["small"]},
         "bridge": TINY_PAPER["bridge"]})).eval()


def prompts(batch: int):
    """(ids, mask): one 7-token prompt, or 3 prompts of 9, 4 and 6 tokens left-padded to 9."""
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = (7,) if batch == 1 else (9, 4, 6)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, 95, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def count(model, batch: int, new_tokens: int, sites: bool = False, check_every: int = 1) -> dict:
    """Synchronizations in one cached decode step (after a prefill) and over a whole greedy generate call."""
    import torch

    from llm_modules.generate import generate
    from llm_modules.host_syncs import SyncCounter

    ids, mask = prompts(batch)
    with torch.no_grad():
        cache = model.new_cache()
        logits = model(ids, mask, cache=cache, logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1)[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        with SyncCounter(sites=sites) as step:
            model(token, mask, cache=cache, logits_to_keep=1)
    with SyncCounter(sites=sites) as whole:
        out = generate(model, ids, prompts(batch)[1], max_new_tokens=new_tokens, eos_token_id=95, pad_token_id=0,
                       check_every=check_every)
    n = out.shape[1]
    result = {"batch": batch, "new_tokens": n, "step": step.total, "step_by_call": dict(step.counts),
              "generate": whole.total, "generate_by_call": dict(whole.counts),
              "per_token": round(whole.total / max(n, 1), 2)}
    if sites:
        result["step_sites"], result["generate_sites"] = dict(step.sites), dict(whole.sites)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--check-every", type=int, default=1, help="generate's check_every")
    ap.add_argument("--sites", action="store_true", help="print where each synchronization is made")
    args = ap.parse_args()
    set_threads(1)
    model = build_tiny_paper()
    for batch in (1, 3):
        r = count(model, batch, args.new_tokens, args.sites, args.check_every)
        print(f"batch {batch}: {r['step']} syncs in one decode step; {r['generate']} over generate "
              f"({r['new_tokens']} tokens) = {r['per_token']} per generated token")
        print(json.dumps(r, indent=1 if args.sites else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
