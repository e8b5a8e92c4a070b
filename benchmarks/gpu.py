"""Paper-size GPU benchmark (issue 9): training throughput, peak memory, MFU, and cached vs recomputed generation.

    python benchmarks/gpu.py --out results.json                  # one CUDA GPU (H200 figures: docs/benchmarks.md)
    python benchmarks/gpu.py --smoke --device cpu --out x.json   # the same code path at tiny sizes, on a CPU

The models have the paper's shapes with random weights, built from inline configs (no download):
large = Qwen2-1.5B shape (hidden 1536, 28 layers, 12 heads, 2 KV heads, FFN 8960, vocab 151936, bf16, frozen);
small = GPT-Neo-125M shape (hidden 768, 12 layers, 12 heads, global/local attention with window 256, FFN 3072,
4096 learned positions so that 4096-token sequences fit; float32 master weights); bridge defaults (2 layers,
8 heads, adapter 256); the new head predicts the large vocabulary (151936, no tokenizer).

Training (batch --batch of --seq-len random tokens, loss on every position, bf16 autocast as train.mixed_precision
bf16 does, AdamW with clipping, one step = forward + backward + clip + optimizer step), four arms:
  live features    the large model runs in every step (model(ids, mask, labels))
  cached features  its states are computed once and passed in (model(None, mask, labels, source_states=...)),
                   as with train.feature_cache: auto (there they come from disk; the read is not timed here)
each with the small model's gradient checkpointing off and on (model.small.gradient_checkpointing_enable(), called
activation_checkpointing_enable() in recent transformers; non-reentrant). Per arm: --warmup untimed steps, then --steps timed
steps between torch.cuda.synchronize() calls; peak memory = torch.cuda.max_memory_allocated() after a reset at the
start of the arm (weights and optimizer state included).

Generation (batch 1, greedy, weights cast to --gen-dtype): llm_modules.generate.stream with use_cache=True for
--new-tokens tokens after a --prompt-tokens prompt (prefill timed apart from decoding), and with use_cache=False (the
reference's full recompute) for --recompute-new-tokens tokens; speedup_per_token compares the mean per-token time of
the decode steps both arms ran (same contexts).

MFU = model FLOPs per step / step time / the GPU's dense bf16 peak (table below, or --peak-tflops). Model FLOPs per
sequence of T tokens (matmul FLOPs only; embedding look-ups, norms and activations ignored; recomputation by
gradient checkpointing not counted, so MFU is comparable between the arms). Two figures per arm: `mfu` counts every
FLOP the step does, the frozen large model's forward included in the live arms; `mfu_trainable_only` counts only the
trained part's forward + backward (the cached arms' count) over the same step time, so for live arms it is the MFU the
training itself gets while the frozen forward takes its share of the step:
  6 * N_trainable_linear * T                        bridge + small model + new head: forward 2, backward 4
  + 3 * attention_fwd(small) + 3 * attention_fwd(bridge)
  + [live only] 2 * N_large_linear * T + attention_fwd(large)     frozen: forward only, no backward
  attention_fwd = 4 * d_attn * sum_t ctx(t) per layer (QK^T and AV), ctx(t) = t + 1 (causal) or min(t + 1, window)
  for GPT-Neo's local layers; the bridge's causal cross-attention has ctx(t) = t + 1 too.
Time: by the FLOP count a live training step is 18 TFLOP and a cached one 6 TFLOP, so the 4 x 7 training steps are
seconds on an H100 and model building plus generation should dominate; arms not started within --time-budget seconds
(default 420, for the 8-minute limit) are skipped and listed. Exits with status 2 and a message when the requested
CUDA device is missing.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from common import log, time_stream, write_json  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name(); first match.
PEAK_BF16_TFLOPS = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
]

PAPER = {
    "large": {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
              "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
              "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": True},
    "small": {"model_type": "gpt_neo", "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256,
              "hidden_size": 768, "num_layers": 12, "num_heads": 12, "attention_types": [[["global", "local"], 6]],
              "window_size": 256, "max_position_embeddings": 4096, "intermediate_size": 3072},
    "bridge": {"num_layers": 2, "num_heads": 8, "adapter_dim": 256},
    "seq_len": 4096, "prompt_tokens": 512, "new_tokens": 256, "recompute_new_tokens": 64,
}
SMOKE = {
    "large": {"model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 1024},
    "small": {"model_type": "gpt_neo", "vocab_size": 8, "bos_token_id": 0, "eos_token_id": 0, "hidden_size": 32,
              "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 16,
              "max_position_embeddings": 1024, "intermediate_size": 64},
    "bridge": {"num_layers": 2, "num_heads": 4, "adapter_dim": 16},
    "seq_len": 64, "prompt_tokens": 16, "new_tokens": 8, "recompute_new_tokens": 4,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (cpu is meant for --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code path in seconds (CPU is fine)")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--seq-len", type=int, help="training sequence length (paper: 4096)")
    p.add_argument("--batch", type=int, default=1, help="training sequences per step")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per arm")
    p.add_argument("--steps", type=int, help="timed training steps per arm (default 5; smoke 1)")
    p.add_argument("--prompt-tokens", type=int)
    p.add_argument("--new-tokens", type=int, help="cached decoding: new tokens")
    p.add_argument("--recompute-new-tokens", type=int, help="full-recompute decoding: new tokens (fewer bounds time)")
    p.add_argument("--gen-dtype", choices=["bfloat16", "float32"], help="generation weights (default bf16; smoke fp32)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in the built-in table")
    p.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds; arms not started by then are skipped and marked so (default 420)")
    p.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own, one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small-attn", choices=["eager", "sdpa"], default="eager",
                   help="the small model's attention: transformers' eager GPT-Neo attention (default), or "
                        "llm_modules.gpt_neo_sdpa (the same attention through scaled_dot_product_attention)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the large model, the bridge and the small model (nn.Module.compile) first")
    p.add_argument("--checkpointing", choices=["both", "off", "on"], default="both",
                   help="training arms with the small model's gradient checkpointing off, on, or both (default)")
    p.add_argument("--skip-train", action="store_true", help="generation only (its timing in a fresh process)")
    p.add_argument("--skip-generation", action="store_true", help="training arms only")
    return p.parse_args(argv)


def no_device_message(device: str, torch) -> str:
    return (f"benchmarks/gpu.py: no CUDA device ({device!r} requested, torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda or 'none'}). Run it on a machine with an NVIDIA GPU "
            f"and a CUDA build of torch; to try the code path here, use: python benchmarks/gpu.py --smoke --device cpu "
            f"--out results.json")


# ---- helpers -----------------------------------------------------------------------------------------------------
class Env:
    def __init__(self, torch, device):
        self.torch, self.device, self.cuda = torch, device, device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self):
        return round(self.torch.cuda.max_memory_allocated(self.device) / 2**30, 3) if self.cuda else None

    def allocated_gib(self):
        return round(self.torch.cuda.memory_allocated(self.device) / 2**30, 3) if self.cuda else None


def linear_params(module) -> int:
    """Weights of the nn.Linear layers (the matmul FLOPs); embedding tables and norms are not counted."""
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def causal_context_sum(T: int, window=None) -> int:
    """sum over query positions t = 0..T-1 of the number of key positions it attends to."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def attention_fwd_flops(T: int, layers: list[tuple[int, object]]) -> int:
    """layers: (d_attn, window or None) per layer -> forward QK^T + AV FLOPs for one sequence."""
    return sum(4 * d * causal_context_sum(T, w) for d, w in layers)


def small_attention_layers(cfg) -> list[tuple[int, object]]:
    if getattr(cfg, "model_type", "") == "gpt_neo":
        return [(cfg.hidden_size, cfg.window_size if kind == "local" else None) for kind in cfg.attention_layers]
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return [(heads * head_dim, getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", False)
             else None)] * cfg.num_hidden_layers


def large_attention_layers(cfg) -> list[tuple[int, object]]:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return [(cfg.num_attention_heads * head_dim, None)] * cfg.num_hidden_layers


def flops_per_step(model, T: int, batch: int, live: bool) -> dict:
    trainable = linear_params(model.bridge) + linear_params(model.small) + linear_params(model.lm_head)
    d_bridge = model.bridge.layers[0].cross_attn.q_proj.out_features if len(model.bridge.layers) else 0
    a_small = attention_fwd_flops(T, small_attention_layers(model.small.config))
    a_bridge = attention_fwd_flops(T, [(d_bridge, None)] * len(model.bridge.layers))
    parts = {"trainable_linear": 6 * trainable * T, "trainable_attention": 3 * (a_small + a_bridge)}
    if live:
        parts["frozen_large_linear"] = 2 * linear_params(model.large) * T
        parts["frozen_large_attention"] = attention_fwd_flops(T, large_attention_layers(model.large.config))
    return {"total": batch * sum(parts.values()), "per_sequence": parts}


def peak_tflops(env: Env, override):
    if override:
        return float(override), "--peak-tflops"
    if not env.cuda:
        return None, "no bf16 peak known for a CPU"
    name = env.torch.cuda.get_device_name(env.device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"built-in table: {key!r} in {name!r} (dense bf16)"
    return None, f"{name!r} is not in the built-in table; pass --peak-tflops"


# ---- the benchmark -----------------------------------------------------------------------------------------------
def build(sizes: dict, device, torch):
    sys.path.insert(0, str(REPO))
    from llm_modules.config import LLMModulesConfig
    from llm_modules.model import LLMModules

    cfg = LLMModulesConfig.from_dict({
        "large": {"config": sizes["large"], "dtype": "bfloat16"},
        "small": {"config": sizes["small"], "dtype": "float32"},
        "bridge": sizes["bridge"],
        "train": {"mixed_precision": "bf16"},
    })
    with torch.device(device):  # weights are created (and randomly initialized) on the device directly
        model = LLMModules.from_config(cfg)
    return model.to(device)


def train_arm(env: Env, model, opt, ids, mask, source, steps: int, warmup: int, checkpointing: bool) -> dict:
    torch = env.torch
    set_checkpointing(model.small, checkpointing)
    model.train()
    params = [p for _, p in model.trainable_named_parameters()]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(env.device.type, dtype=torch.bfloat16):
            if source is None:
                out = model(ids, mask, labels=ids)
            else:
                out = model(None, mask, labels=ids, source_states=source)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return out.loss.detach()

    env.reset_peak()
    try:
        for _ in range(warmup):
            step()
        env.sync()
        t0 = time.perf_counter()
        losses = [step() for _ in range(steps)]
        env.sync()
        seconds = time.perf_counter() - t0
    except torch.OutOfMemoryError as e:
        opt.zero_grad(set_to_none=True)
        env.reset_peak()
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}
    finally:
        set_checkpointing(model.small, False)
    tokens = ids.numel() * steps
    return {"tokens_per_s": tokens / seconds, "step_s": seconds / steps, "timed_steps": steps, "warmup_steps": warmup,
            "peak_memory_gib": env.peak_gib(), "loss": float(losses[-1])}


def set_checkpointing(small, on: bool) -> None:
    """The small model's gradient checkpointing (transformers >= 5.2x names it activation checkpointing; the old
    gradient_checkpointing_* names still work there, with a deprecation warning)."""
    name = ("activation_checkpointing_" if hasattr(small, "activation_checkpointing_enable") else
            "gradient_checkpointing_") + ("enable" if on else "disable")
    getattr(small, name)()


def ms_per_token(decode: list[float]):
    """Mean and median of the decode steps, in ms (None without decode steps)."""
    return {"mean": 1e3 * statistics.fmean(decode), "median": 1e3 * statistics.median(decode)} if decode else None


def generation(env: Env, model, sizes: dict, args, vocab: int) -> dict:
    torch = env.torch
    P, N, M = sizes["prompt_tokens"], sizes["new_tokens"], min(sizes["recompute_new_tokens"], sizes["new_tokens"])
    dtype = getattr(torch, args.gen_dtype)
    model.eval().to(dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, vocab, (1, P), generator=gen).to(env.device)
    time_stream(model, ids, min(4, N), True, env.sync)  # warm-up (kernels, allocator)
    time_stream(model, ids, min(2, M), False, env.sync)
    env.reset_peak()
    steps, cached_tokens = time_stream(model, ids, N, True, env.sync)
    cached_peak = env.peak_gib()
    decode = steps[1:]
    cached = {"prompt_tokens": P, "new_tokens": N, "prefill_s": steps[0], "total_s": sum(steps),
              "tokens_per_s": N / sum(steps), "decode_tokens_per_s": len(decode) / sum(decode) if decode else None,
              "decode_ms_per_token": ms_per_token(decode), "peak_memory_gib": cached_peak,
              "step_ms": [round(1e3 * t, 2) for t in steps]}
    env.reset_peak()
    rsteps, recompute_tokens = time_stream(model, ids, M, False, env.sync)
    rdecode = rsteps[1:]
    recompute = {"prompt_tokens": P, "new_tokens": M, "first_token_s": rsteps[0], "total_s": sum(rsteps),
                 "tokens_per_s": M / sum(rsteps), "decode_ms_per_token": ms_per_token(rdecode),
                 "peak_memory_gib": env.peak_gib(), "step_ms": [round(1e3 * t, 2) for t in rsteps]}
    same = [a == b for a, b in zip(cached_tokens, recompute_tokens)]
    cached["tokens_match_recompute"] = all(same)
    cached["matching_prefix"] = same.index(False) if not all(same) else len(same)
    speedup = None
    if rdecode and decode:
        speedup = statistics.fmean(rdecode) / statistics.fmean(decode[:len(rdecode)])
    return {"dtype": args.gen_dtype, "cached": cached, "recompute": recompute, "speedup_per_token": speedup,
            "note": "speedup_per_token = mean recompute decode step / mean cached decode step over the same "
                    f"{len(rdecode)} steps (contexts {P + 1}..{P + len(rdecode)})"}


def apply_defaults(args) -> dict:
    """The sizes (paper or smoke, with the flags that override them); fills the smoke-dependent defaults in args."""
    sizes = dict(SMOKE if args.smoke else PAPER)
    for key, attr in (("seq_len", "seq_len"), ("prompt_tokens", "prompt_tokens"), ("new_tokens", "new_tokens"),
                      ("recompute_new_tokens", "recompute_new_tokens")):
        if getattr(args, attr) is not None:
            sizes[key] = getattr(args, attr)
    args.steps = args.steps or (1 if args.smoke else 5)
    args.warmup = min(args.warmup, 1) if args.smoke else args.warmup
    args.gen_dtype = args.gen_dtype or ("float32" if args.smoke else "bfloat16")
    return sizes


def train_arms(env: Env, model, args, result: dict, start: float) -> None:
    """The four training arms (live / cached features x checkpointing off / on) into result["train"]; an arm not
    started within --time-budget s of `start` goes to result["skipped"]."""
    torch = env.torch
    T, Bt, peak = result["sizes"]["seq_len"], result["sizes"]["batch"], result["peak_tflops"]
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, result["sizes"]["vocab"], (Bt, T), generator=gen).to(env.device)
    mask = torch.ones_like(ids)
    params = [p for _, p in model.trainable_named_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    with torch.no_grad():
        from llm_modules.model import positions_from_mask

        source = model.source_states(ids, mask, positions_from_mask(mask))  # (B, T, D_L), bf16
    for features in ("live", "cached"):
        for checkpointing in {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]:
            name = f"{features} features, gradient checkpointing {'on' if checkpointing else 'off'}"
            if time.perf_counter() - start > args.time_budget:
                result["skipped"].append(name)
                continue
            log(f"train: {name} ...")
            arm = train_arm(env, model, opt, ids, mask, None if features == "live" else source,
                            args.steps, args.warmup, checkpointing)
            arm.update(features=features, gradient_checkpointing=checkpointing,
                       flops_per_step=result["flops"][features]["total"])
            if "step_s" in arm:
                trained = result["flops"]["cached"]["total"]  # the bridge, small model and head: forward + backward
                arm["achieved_tflops"] = arm["flops_per_step"] / arm["step_s"] / 1e12
                arm["mfu"] = arm["achieved_tflops"] / peak if peak else None
                arm["mfu_trainable_only"] = trained / arm["step_s"] / 1e12 / peak if peak else None
            result["train"].append(arm)
    opt.zero_grad(set_to_none=True)


def run(args) -> dict:
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # set_device and the memory stats want an index
    sizes = apply_defaults(args)
    env = Env(torch, device)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if env.cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    log(f"building the models ({'smoke' if args.smoke else 'paper'} sizes) on {device} ...")
    model = build(sizes, device, torch)
    model.small.config.use_cache = False
    if args.small_attn == "sdpa":
        from llm_modules.gpt_neo_sdpa import use_sdpa

        log(f"small model attention: SDPA ({use_sdpa(model.small)} layers switched)")
    if args.compile:
        for part in (model.large, model.bridge, model.small):
            part.compile()
    T, Bt = sizes["seq_len"], args.batch
    vocab = model.lm_head.out_features
    trainable = sum(p.numel() for _, p in model.trainable_named_parameters())
    frozen = sum(p.numel() for p in model.large.parameters())
    peak, peak_source = peak_tflops(env, args.peak_tflops)
    result = {
        "device": {"type": device.type, "name": torch.cuda.get_device_name(device) if env.cuda else platform.processor()
                   or platform.machine(), "torch": torch.__version__, "cuda": torch.version.cuda},
        "smoke": bool(args.smoke),
        "sizes": {"large": sizes["large"], "small": sizes["small"], "bridge": sizes["bridge"], "seq_len": T,
                  "batch": Bt, "vocab": vocab},
        "params": {"trainable": trainable, "trainable_linear": linear_params(model.bridge) + linear_params(model.small)
                   + linear_params(model.lm_head), "frozen_large": frozen, "frozen_large_linear": linear_params(model.large)},
        "precision": "large model bf16 weights; trainable fp32 weights with bf16 autocast; AdamW fp32 state",
        "peak_tflops": peak, "peak_source": peak_source,
        "flops": {"formula": "6*N_trainable_linear*T + 3*attn_fwd(small) + 3*attn_fwd(bridge) + [live] "
                             "2*N_large_linear*T + attn_fwd(large); attn_fwd = 4*d_attn*sum_t ctx(t) per layer, "
                             "causal (local layers: ctx <= window); recomputation not counted",
                  "live": flops_per_step(model, T, Bt, True), "cached": flops_per_step(model, T, Bt, False)},
        "options": {"small_attn": args.small_attn, "compile": args.compile, "threads": torch.get_num_threads()},
        "train": [], "generation": None, "skipped": [],
    }
    log(f"trainable {trainable / 1e6:.1f}M, frozen large {frozen / 1e6:.1f}M parameters; vocab {vocab}; "
        f"peak {peak} TFLOP/s ({peak_source})")

    if not args.skip_train:
        train_arms(env, model, args, result, start)
    if args.skip_generation:
        pass
    elif time.perf_counter() - start > args.time_budget:
        result["skipped"].append("generation")
    else:
        log("generation: cached vs full recompute ...")
        result["generation"] = generation(env, model, sizes, args, vocab)
    result["elapsed_s"] = time.perf_counter() - start
    return result


def report(result: dict) -> str:
    lines = [f"device: {result['device']['name']} ({result['device']['type']}), torch {result['device']['torch']}"
             f"{' [SMOKE sizes]' if result['smoke'] else ''}",
             f"trainable {result['params']['trainable']:,} / frozen large {result['params']['frozen_large']:,} params; "
             f"seq {result['sizes']['seq_len']} x batch {result['sizes']['batch']}; peak {result['peak_tflops']} TFLOP/s; "
             f"small attention {result['options']['small_attn']}, compile {result['options']['compile']}, "
             f"{result['options']['threads']} CPU threads",
             "", "| features | grad ckpt | tokens/s | step s | peak GiB | TFLOP/s | MFU "
                 "| MFU without the frozen forward |", "|---|---|---|---|---|---|---|---|"]
    for a in result["train"]:
        if "error" in a:
            lines.append(f"| {a['features']} | {a['gradient_checkpointing']} | {a['error']} | | | | | |")
            continue
        mfu, trained = (f"{100 * a[k]:.1f}%" if a.get(k) is not None else "n/a" for k in ("mfu", "mfu_trainable_only"))
        lines.append(f"| {a['features']} | {'on' if a['gradient_checkpointing'] else 'off'} | {a['tokens_per_s']:,.0f} "
                     f"| {a['step_s']:.3f} | {a['peak_memory_gib']} | {a['achieved_tflops']:.1f} | {mfu} | {trained} |")
    g = result["generation"]
    if g:
        c, r = g["cached"], g["recompute"]
        lines += ["", f"generation ({g['dtype']}): cached {c['new_tokens']} tokens after {c['prompt_tokens']}: "
                      f"prefill {c['prefill_s'] * 1e3:.1f} ms, {c['decode_tokens_per_s'] or 0:,.1f} tokens/s decoding, "
                      f"{c['tokens_per_s']:,.1f} tokens/s overall",
                  f"full recompute {r['new_tokens']} tokens: {r['tokens_per_s']:,.1f} tokens/s; speedup per token "
                  f"{g['speedup_per_token'] and round(g['speedup_per_token'], 2)}x; greedy tokens identical: "
                  f"{c['tokens_match_recompute']}"]
    if result["skipped"]:
        lines.append(f"skipped (time budget): {', '.join(result['skipped'])}")
    lines.append(f"elapsed {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(no_device_message(args.device, torch), file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and ":" in args.device and int(args.device.split(":")[1]) >= torch.cuda.device_count():
        print(f"benchmarks/gpu.py: {args.device} requested but only {torch.cuda.device_count()} CUDA device(s) exist",
              file=sys.stderr)
        return 2
    result = run(args)
    print(report(result))
    if args.out:
        write_json(args.out, result)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
