"""Decoding speed of the two couplings on the same machine, in one run: the paper's stream coupling (a large-model
step per generated token) vs the prompt coupling (the large model reads the prompt once, then the small model
decodes alone).

    python benchmarks/couplings.py --large qwen2.5-coder-1.5b-instruct --prompt-tokens 256 --new-tokens 1024

Both models share one small model shape (configs/default.yaml's) and one output vocabulary (the large tokenizer's),
and one copy of the large model. Weights of the trained parts are random: speed does not depend on them. Nothing
stops early (no eos), so both decode exactly --new-tokens tokens.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, machine, time_stream, write_json  # noqa: E402

from llm_modules.config import load_config  # noqa: E402
from llm_modules.backbones import resolve_path  # noqa: E402
from llm_modules.model import LLMModules  # noqa: E402
from llm_modules.row_split import prepare_for_cpu_decoding  # noqa: E402


def timed_decode(model, ids, new_tokens: int, **kw) -> dict:
    """Prefill seconds (to the first token) and decode seconds for the remaining tokens, cached."""
    times, _ = time_stream(model, ids, new_tokens, **kw)
    decode = sum(times[1:])
    return {"prefill_s": times[0], "decode_s": decode, "decode_tokens": len(times) - 1,
            "decode_tokens_per_s": (len(times) - 1) / decode}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml", help="supplies the small model and bridge")
    ap.add_argument("--large", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = machine()
    print(describe_machine(m))
    base = load_config(args.config, [("large.name_or_path", args.large)])
    base = base.replace(small={"config": {**base.small.config, "max_position_embeddings": 2048}})
    stream_model = prepare_for_cpu_decoding(LLMModules.from_config(base))
    V = stream_model.lm_head.out_features
    prompt_cfg = base.replace(coupling="prompt", small_tokenizer=resolve_path(base.large),
                              small={"config": {**base.small.config, "vocab_size": V}}, bridge={"every": 2})
    prompt_model = prepare_for_cpu_decoding(LLMModules.from_config(prompt_cfg, load_large=False))
    prompt_model.large = stream_model.large  # one copy of the large model serves both
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(V, 150000), (1, args.prompt_tokens), generator=g)

    with torch.no_grad():
        timed_decode(prompt_model, ids[:, :16], 4, model_kwargs={"memory_ids": ids[:, :16]})  # warm-up
        timed_decode(stream_model, ids[:, :16], 4)
        r_prompt = timed_decode(prompt_model, ids, args.new_tokens, model_kwargs={"memory_ids": ids})
        r_stream = timed_decode(stream_model, ids, args.new_tokens)
    ratio = r_prompt["decode_tokens_per_s"] / r_stream["decode_tokens_per_s"]
    result = {"machine": m, "large": args.large, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "threads": args.threads, "stream": r_stream, "prompt": r_prompt, "decode_speedup": ratio}
    print(f"\nlarge {args.large}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} threads, cached decoding, batch 1")
    print("| coupling | prefill s | decode tokens/s |\n|---|---|---|")
    for name, r in (("stream (paper)", r_stream), ("prompt (ours)", r_prompt)):
        print(f"| {name} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.2f} |")
    print(f"prompt coupling decodes {ratio:.1f}x faster than the stream coupling (target >= 5x)")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
