"""Operators a decode step dispatches, the combined model against the large model alone under Hugging Face's
`generate` (issue 49): on a GPU each is roughly a kernel launch, and at batch 1 the host's time to launch them sets
the step time.

    python benchmarks/decode_ops.py [--new-tokens 16] [--batch 1] [--small-attn eager|sdpa] [--top 15]

Counted on the CPU with a TorchDispatchMode over the tiny model with the paper's layer counts of
benchmarks/decode_syncs.py (28 large, 2 bridge, 12 small layers; 1 thread): every aten operator, and the kernel-like
ones (views, reshapes and other metadata-only operators left out), in one cached decode step of the combined model,
split by part (large / bridge / small / head), and per generated token over a whole `generate` call; the large
model alone (its transformers causal LM: the same 28 layers plus its own head) per token over transformers'
`GenerationMixin.generate`.
--small-attn sdpa switches the small model's attention to gpt_neo_sdpa's. --top lists the most frequent kernel-like
operators of the combined step. Takes about 20 seconds.

Measured (1 thread, 16 new tokens), kernel-like operators in one decode step of the combined model (large / bridge /
small), and per token of the large model alone under transformers' generate (its head and search loop included):
  batch 1, eager small:  1415 (1022 / 64 / 325); large alone 1039.5
  batch 1, SDPA small:   1345 (1022 / 64 / 255)
  left-padded batch 3, eager small: 1434 (1022 / 64 / 330), was 1516 before masks were made once a step (the large
    model's SDPA layers each turned the boolean mask into an additive one: 3 operators a layer); large alone 1143.2
  left-padded batch 3, SDPA small:  1387 (1022 / 64 / 271), was 1549 (and each GPT-Neo layer built its own mask)
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]

from common import set_threads  # noqa: E402
from decode_syncs import TINY_PAPER, build_tiny_paper, prompts  # noqa: E402

# Operators that only describe a tensor differently (no kernel on a GPU).
METADATA = {"view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "permute", "unsqueeze", "squeeze",
            "expand", "slice", "select", "detach", "alias", "lift_fresh", "unbind", "split", "split_with_sizes",
            "chunk", "narrow", "_reshape_alias", "view_as", "expand_as", "contiguous", "sym_size", "sym_stride",
            "sym_numel", "sym_storage_offset", "is_same_size", "empty", "empty_like", "empty_strided", "_to_copy_noop",
            "result_type", "_has_compatible_shallow_copy_type", "dim", "size", "stride", "numel", "is_nonzero",
            "_local_scalar_dense", "item", "_shape_as_tensor", "clone_noop"}


def op_counter():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.all, self.kernels, self.part = Counter(), Counter(), "other"
            self.by_part = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.all[name] += 1
            if name not in METADATA:
                self.kernels[name] += 1
                self.by_part[self.part] += 1
            return func(*args, **(kwargs or {}))

    return Ops()


def label_parts(model, ops):
    """Forward hooks that tell `ops` which part of the combined model is running."""
    handles = []
    for part in ("large", "bridge", "small", "lm_head"):
        module = getattr(model, part, None)
        if module is None:
            continue
        handles.append(module.register_forward_pre_hook(lambda m, a, p=part: setattr(ops, "part", p)))
        handles.append(module.register_forward_hook(lambda m, a, o: setattr(ops, "part", "other")))
    return handles


def combined(model, batch: int, new_tokens: int) -> dict:
    import torch

    from llm_modules.generate import generate

    ids, mask = prompts(batch)
    with torch.no_grad():
        cache = model.new_cache()
        token = model(ids, mask, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)[:, None]
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        ops = op_counter()
        handles = label_parts(model, ops)
        with ops:
            model(token, step_mask, cache=cache, logits_to_keep=1)
        for h in handles:
            h.remove()
    whole = op_counter()
    with whole:
        out = generate(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=95, pad_token_id=0)
    n = out.shape[1]
    return {"step_ops": sum(ops.all.values()), "step_kernels": sum(ops.kernels.values()),
            "step_kernels_by_part": dict(ops.by_part), "top": ops.kernels.most_common(),
            "generate_kernels_per_token": round(sum(whole.kernels.values()) / n, 1), "new_tokens": n}


def large_alone(batch: int, new_tokens: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_PAPER["large"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    ids, mask = prompts(batch)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ops = op_counter()
        with ops:
            out = lm.generate(ids, attention_mask=mask, **kw)
    n = out.shape[1] - ids.shape[1]
    return {"generate_kernels_per_token": round(sum(ops.kernels.values()) / n, 1), "new_tokens": n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, choices=[1, 3], default=1)
    ap.add_argument("--small-attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    set_threads(1)
    model = build_tiny_paper()
    if args.small_attn == "sdpa":
        from llm_modules.gpt_neo_sdpa import use_sdpa

        use_sdpa(model.small)
    ours = combined(model, args.batch, args.new_tokens)
    hf = large_alone(args.batch, args.new_tokens)
    print(f"batch {args.batch}, small attention {args.small_attn}: combined model, one decode step: "
          f"{ours['step_kernels']} kernel-like operators ({ours['step_ops']} in all) {ours['step_kernels_by_part']}; "
          f"per token over generate: {ours['generate_kernels_per_token']}; the large model alone under transformers' generate: "
          f"{hf['generate_kernels_per_token']} per token")
    print(json.dumps({"combined": {k: v for k, v in ours.items() if k != "top"}, "large_alone": hf,
                      "top_step_kernels": ours["top"][:args.top]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
