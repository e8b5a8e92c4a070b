"""Generation speed of the combined model (issue 4): cached decoding vs the reference's full recompute, the large
model alone with its own cached `generate`, and the floor of this architecture (one cached large step + one cached
small step + the new head).

    LLM_MODULES_CACHE=/tmp/llm-modules-cache python benchmarks/generation.py --out /tmp/generation.json

(default: configs/tiny-random.yaml and configs/default.yaml, 256 prompt tokens, 256 new tokens, 2 threads; about
7.5 minutes on 2 Zen 4 cores when nothing else runs). Results and method: docs/benchmarks.md, section Generation.

What is measured, per config (batch 1, greedy, float32, a fixed random prompt of --prompt-tokens ids, seed --seed):

* cached: `generate.stream(..., use_cache=True, eos_token_id=None)` for --new-tokens tokens. Step 0 is the prefill
  (the whole prompt, giving the first token); steps 1..N-1 are one-token decode steps. Each yield is timed.
* full recompute (the reference's method): `stream(..., use_cache=False)`. With --full-recompute all every step is
  run and timed. With --full-recompute sampled (the default) only --full-points steps, evenly spaced over the N steps,
  are timed (each as the first and only step of `stream(use_cache=False, max_new_tokens=1)` over the prompt plus the
  tokens the cached run generated before it, i.e. the very input that step of the reference loop sees), and the time
  of the other steps is interpolated linearly between the measured ones; the total is the sum over all N steps.
* large alone: transformers `AutoModelForCausalLM` with the same weights (from_pretrained on the large model's path,
  or from_config + the combined model's large weights for an inline random large model), `generate` greedy with
  max_new_tokens = min_new_tokens = N; a streamer timestamps every token.
* floor: at cached contexts P, P + (N-2)/2 and P + N - 2 (the first, middle and last decode step), the time of one
  cached step of the large base model (`model.large`, DynamicCache, one new token) and of the small model
  (`model.small`, inputs_embeds for one position, DynamicCache) + `model.lm_head`, each the median of --floor-repeats
  calls on fresh copies of the same cache, the lowest of --repeats such measurements. The floor of a decode step is
  interpolated linearly between contexts.
* breakdown: during the cached runs, timers (forward hooks, a few microseconds per step) around the large model,
  the bridge, the small model and the head; "other" is the rest of each step (the decode loop, masks, argmax).
* paired figures, less sensitive to other processes on a shared machine: one cached step of the combined model
  (model forward on fresh copies of its three caches at a fixed context, + argmax) timed interleaved with the floor
  steps at the same context, and right after each timed full-recompute step of the same length.

Every timed run is preceded by a wait (up to --quiet-timeout s) for the other processes on the machine to use less
than --quiet of the CPUs, and the CPU time other processes took while it ran is recorded ("others busy", a fraction
of the machine: 0.5 = one of two cores). Per-token figures are the median (and mean) over the decode steps of a
run; the figure reported for each phase is the lowest over its --repeats runs (the least disturbed one, as `timeit`
does); every run is in the JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # `common` beside this script; this checkout's llm_modules
from common import (  # noqa: E402  (threads are set before llm_modules / transformers do any work)
    Meter,
    clock,
    describe_machine,
    load_average,
    log,
    machine,
    median,
    set_threads,
    table,
    time_stream,
    wait_quiet,
    write_json,
)

DEFAULT_CONFIGS = ["configs/tiny-random.yaml", "configs/default.yaml"]
TARGET_SPEEDUP = 20.0  # cached >= 20x full recompute (issue 4, on the default models)
TARGET_FLOOR_RATIO = 1.3  # cached per-token cost <= 1.3x (large step + small step)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", help=f"config YAML, repeatable (default: {' and '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each generation (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    p.add_argument("--full-recompute", choices=["sampled", "all", "off"], default="sampled",
                   help="time every full-recompute step (all), or --full-points of them and interpolate (sampled)")
    p.add_argument("--full-points", type=int, default=5, help="steps timed in --full-recompute sampled (default 5)")
    p.add_argument("--floor-repeats", type=int, default=20, help="timed one-token steps per floor measurement (default 20)")
    p.add_argument("--quiet", type=float, default=0.2, metavar="FRACTION",
                   help="before each timed run wait until other processes use < FRACTION of the CPUs (1 = never wait)")
    p.add_argument("--quiet-timeout", type=float, default=60.0, help="longest wait for --quiet, seconds (default 60)")
    p.add_argument("--no-large-alone", action="store_true", help="skip the large model's own generate")
    p.add_argument("--no-breakdown", action="store_true", help="no timing hooks in the cached runs")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also run torch.profiler over this many decode steps and print the top operators")
    p.add_argument("--out", default="benchmarks/results/generation.json", help="JSON output path")
    a = p.parse_args(argv)
    a.config = a.config or list(DEFAULT_CONFIGS)
    if a.prompt_tokens < 1 or a.new_tokens < 2 or a.repeats < 1 or a.full_points < 2:
        p.error("need --prompt-tokens >= 1, --new-tokens >= 2, --repeats >= 1, --full-points >= 2")
    return a


# ---- small helpers ------------------------------------------------------------------------------------------------
def interp(points: dict[int, float], xs) -> list[float]:
    """Piecewise-linear interpolation through {x: y} (constant beyond the ends)."""
    import numpy as np

    kx = sorted(points)
    return [float(v) for v in np.interp(list(xs), kx, [points[k] for k in kx])]


def evenly_spaced(lo: int, hi: int, n: int) -> list[int]:
    return sorted({round(lo + (hi - lo) * i / (n - 1)) for i in range(n)})


def step_stats(decode_s: list[float]) -> dict:
    return {"median_s": median(decode_s), "mean_s": sum(decode_s) / len(decode_s)}


def best_of(runs: list[dict], keys) -> dict:
    """The figures reported for a phase: each the lowest over its repeats (the least disturbed run); all are in the
    JSON. keys: names, or {reported name: name in a run}."""
    pairs = keys.items() if isinstance(keys, dict) else [(k, k) for k in keys]
    return {name: min(r[k] for r in runs) for name, k in pairs}


# a decoding phase's reported figures: {reported name: name in a run}
DECODE_FIGURES = {"prefill_s": "prefill_s", "decode_median_s": "median_s", "decode_mean_s": "mean_s",
                  "total_s": "total_s"}


QUIET = {"threshold": 0.2, "timeout": 60.0}


def settle() -> dict:
    """Wait for the other processes on the machine to quieten (see --quiet); returns what happened."""
    return wait_quiet(QUIET["threshold"], QUIET["timeout"], interval=0.5)


def others(runs: list[dict]) -> list:
    """Other processes' CPU use during each run (fraction of the machine), for the record."""
    return [r.get("meter", {}).get("others_busy") for r in runs]


# ---- 1. cached decoding of the combined model -------------------------------------------------------------------
def bench_cached(model, ids, n: int, repeats: int, instrument: bool) -> dict:
    time_stream(model, ids, min(n, 8), True)  # warm-up
    runs = []
    for r in range(repeats):
        quiet = settle()
        with Meter() as m, Instrument(model) if instrument else contextlib.nullcontext() as ins:
            times, tokens = time_stream(model, ids, n, True)
        runs.append({"prefill_s": times[0], "decode_step_s": times[1:], "total_s": sum(times), "tokens": tokens,
                     **step_stats(times[1:]), "quiet": quiet, "meter": m.result,
                     "breakdown_s": ins.breakdown(times) if ins is not None else None})
        log(f"  cached run {r + 1}/{repeats}: prefill {times[0]:.3f} s, decode median "
            f"{runs[-1]['median_s'] * 1e3:.1f} ms/token, total {sum(times):.2f} s; others busy {m.result['others_busy']}")
    same = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    return {
        "runs": runs,
        "tokens": runs[0]["tokens"],
        "tokens_identical_across_repeats": same,
        **best_of(runs, DECODE_FIGURES),
        "others_busy": others(runs),
        # the instrumented breakdown of the run with the lowest median decode step
        "breakdown_s": min(runs, key=lambda r: r["median_s"])["breakdown_s"],
    }


# ---- one cached step of the combined model, repeatable at a fixed context ----------------------------------------
class CachedStep:
    """The combined model's three caches prefilled with the first C positions of `full` (prompt + generated tokens);
    `run()` decodes position C (one token, as step C - P + 1 of cached generation does: model forward with
    logits_to_keep=1 and argmax) on a fresh copy of those caches, so it can be timed again and again. The copies
    share the cached tensors: the caches only ever concatenate, never write in place."""

    def __init__(self, model, full, C: int):
        import torch

        from llm_modules.kv_cache import LLMModulesCache

        self.model, self.C = model, C
        self.tok = full[:, C : C + 1]
        self.mask = torch.ones(1, C + 1, dtype=torch.long)
        cache = model.new_cache()
        with torch.no_grad():
            model(full[:, :C], torch.ones(1, C, dtype=torch.long), cache=cache, logits_to_keep=1)
        self._large, self._small = snapshot(cache.large), snapshot(cache.small)
        self._bridge = (list(cache.bridge.keys), list(cache.bridge.values))
        self._cls = LLMModulesCache

    def fresh(self):
        from transformers import DynamicCache

        c = self._cls.empty(len(self._bridge[0]))
        c.large, c.small = DynamicCache(self._large), DynamicCache(self._small)
        c.bridge.keys, c.bridge.values = list(self._bridge[0]), list(self._bridge[1])
        return c

    def run(self, cache) -> int:
        import torch

        with torch.no_grad():
            return int(self.model(self.tok, self.mask, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1))


def snapshot(cache) -> list:
    """The (keys, values) of each layer of a DynamicCache, to build fresh copies from (`DynamicCache(snapshot)`)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def timed_once(fn, arg) -> float:
    t0 = clock()
    fn(arg)
    return clock() - t0


def interleaved(fns: dict, steps: int) -> dict:
    """{name: median seconds of `steps` calls}, for fns = {name: (fn, make)}: the calls interleaved (so all see the
    same load), each on a fresh argument make() (e.g. a cache holding the same C positions) built outside the clock."""
    ts = {k: [] for k in fns}
    for _ in range(steps):
        for k, (fn, make) in fns.items():
            ts[k].append(timed_once(fn, make()))
    return {k: median(v) for k, v in ts.items()}


# ---- 2. full recompute (the reference's method) -----------------------------------------------------------------
class Layouts:
    """row_split stores frozen wide weights column-major for one-row products; a full-recompute step makes many-row
    products only, so it is also timed with those weights row-major (nn.Linear's own layout), the faster time
    counting."""

    def __init__(self, model):
        from llm_modules.row_split import is_column_major

        self.weights = [p for p in model.parameters() if p.dim() == 2 and is_column_major(p)]

    @contextlib.contextmanager
    def row_major(self):
        from llm_modules.row_split import column_major, row_major

        row_major(self.weights)
        try:
            yield
        finally:
            for w in self.weights:
                column_major(w)


def prefix(prompt, tokens: list[int], k: int):
    """The input of step k of the reference loop: the prompt + the k tokens generated before it."""
    import torch

    return torch.cat([prompt, torch.tensor([tokens[:k]], dtype=prompt.dtype)], dim=1)


def bench_full(model, prompt, tokens: list[int], n: int, repeats: int, mode: str, points: int) -> dict:
    time_stream(model, prompt, 1, False)  # warm-up
    if mode == "all":
        return bench_full_all(model, prompt, tokens, n, repeats)
    return bench_full_sampled(model, prompt, tokens, n, repeats, points)


def full_result(method: str, per_step: list[float], runs: list[dict], agree: bool, measured=None,
                paired=None) -> dict:
    n = len(per_step)
    return {
        "method": method,
        "measured_step_s": measured,
        "runs": runs,
        "per_step_s": per_step,
        "total_s": sum(per_step),
        "decode_mean_s": sum(per_step[1:]) / (n - 1),  # steps 1..N-1, the ones cached decoding makes one-token
        "first_step_s": per_step[0],
        "argmax_matches_cached": agree,
        "paired_speedup": paired,
        "others_busy": others(runs),
    }


def bench_full_all(model, prompt, tokens: list[int], n: int, repeats: int) -> dict:
    """Every step of `stream(use_cache=False)` run and timed; the run with the lowest total is reported."""
    runs = []
    for r in range(repeats):
        quiet = settle()
        with Meter() as m:
            times, got = time_stream(model, prompt, n, False)
        runs.append({"step_s": times, "total_s": sum(times), "tokens_match_cached": got == tokens,
                     "quiet": quiet, "meter": m.result})
        log(f"  full recompute run {r + 1}/{repeats}: {sum(times):.1f} s for {n} steps; "
            f"others busy {m.result['others_busy']}")
    per_step = min(runs, key=lambda r: r["total_s"])["step_s"]
    method = f"all {n} steps run and timed ({repeats} repeat(s); the run with the lowest total is reported)"
    return full_result(method, per_step, runs, all(r["tokens_match_cached"] for r in runs))


def full_step_runs(model, seq, k: int, token: int, cs, layouts: Layouts, repeats: int) -> tuple[list[dict], bool]:
    """`repeats` timings of full-recompute step k over `seq` (the weights as stored and row-major), each followed
    (paired, so both see the same load from other processes) by the median of 5 cached steps `cs` that yield the
    same token (None at step 0); and whether every argmax is `token`."""
    if cs is not None:
        cs.run(cs.fresh())  # warm-up
    runs, agree = [], True
    for _ in range(repeats):
        quiet = settle()
        with Meter() as m:
            t, got = time_stream(model, seq, 1, False)
            cached = interleaved({"cached": (cs.run, cs.fresh)}, 5)["cached"] if cs else None
            with layouts.row_major():  # the reference's method gets the faster of the two layouts
                t_row, got_row = time_stream(model, seq, 1, False)
        agree &= got[0] == got_row[0] == token and (cs is None or cs.run(cs.fresh()) == token)
        runs.append({"step_index": k, "length": seq.shape[1], "step_s": min(t[0], t_row[0]),
                     "step_s_as_stored": t[0], "step_s_row_major": t_row[0], "paired_cached_step_s": cached,
                     "quiet": quiet, "meter": m.result})
    return runs, agree


def bench_full_sampled(model, prompt, tokens: list[int], n: int, repeats: int, points: int) -> dict:
    """--full-points steps timed, the others interpolated; each timed step paired with cached steps."""
    P, ks = prompt.shape[1], evenly_spaced(0, n - 1, points)
    full, layouts = prefix(prompt, tokens, n - 1), Layouts(model)
    measured, agree, runs, paired = {}, True, [], {}
    for k in ks:
        cs = CachedStep(model, full, P + k - 1) if k >= 1 else None
        mine, ok = full_step_runs(model, prefix(prompt, tokens, k), k, tokens[k], cs, layouts, repeats)
        runs += mine
        agree &= ok
        measured[k] = min(r["step_s"] for r in mine)
        if cs is not None:
            paired[P + k] = median([r["step_s"] / r["paired_cached_step_s"] for r in mine])
        log(f"  full recompute step {k} (length {P + k}): best {measured[k]:.3f} s of "
            f"{[round(r['step_s'], 3) for r in mine]}"
            + (f"; paired cached steps {[round(r['paired_cached_step_s'] * 1e3, 1) for r in mine]} ms, speedup "
               f"{paired[P + k]:.1f}x" if cs else "") + f"; others busy {others(mine)}")
    method = (f"sampled: steps {ks} (sequence lengths {[P + k for k in ks]}) each timed {repeats}x with the "
              f"weights as stored and {repeats}x with every weight row-major, the lowest kept; the other steps' "
              f"times interpolated linearly between them; total = sum over all {n} steps")
    paired = {"by_length": {str(L): v for L, v in paired.items()}, "mean": sum(paired.values()) / len(paired),
              "method": "at each timed length >= P + 1: full-recompute step time / median of 5 cached combined "
                        "steps (fresh copies of the caches at length - 1) run right after it; median over repeats"}
    return full_result(method, interp(measured, range(n)), runs, agree,
                       {str(P + k): v for k, v in measured.items()}, paired)


# ---- 3. the large model alone, transformers' own cached generate ----------------------------------------------
class StepClock:
    """A `generate` streamer that timestamps every put (the first put is the prompt, then one per new token)."""

    def __init__(self):
        self.stamps = []

    def put(self, value):
        self.stamps.append(clock())

    def end(self):
        pass


def build_large_lm(cfg):
    """The large model with its own LM head, loaded as the harness and the large-alone arm load it (for an inline
    config: the same seeded blocks the combined model holds, a random head)."""
    from llm_modules.backbones import load_causal_lm

    return load_causal_lm(cfg.large, "large").eval(), f"backbones.load_causal_lm({cfg.large.identity!r})"


def bench_large_alone(model, cfg, ids, n: int, repeats: int) -> dict:
    import torch
    from transformers import GenerationConfig

    lm, source = build_large_lm(cfg)
    eos = lm.config.eos_token_id
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=eos,
                          pad_token_id=lm.config.pad_token_id if lm.config.pad_token_id is not None else 0,
                          use_cache=True)
    mask = torch.ones_like(ids)

    def run(k: int):
        clk = StepClock()
        g = GenerationConfig(**{**gc.to_dict(), "max_new_tokens": k, "min_new_tokens": k})
        t0 = clock()
        out = lm.generate(ids, attention_mask=mask, generation_config=g, streamer=clk)
        t1 = clock()
        return out, clk.stamps, t1 - t0

    run(min(n, 8))  # warm-up
    runs = []
    for r in range(repeats):
        quiet = settle()
        with Meter() as m:
            out, stamps, total = run(n)
        steps = [b - a for a, b in zip(stamps, stamps[1:])]  # step 0: prefill + first token
        if out.shape[1] - ids.shape[1] != n or len(steps) != n:
            raise RuntimeError(f"large-alone generate made {out.shape[1] - ids.shape[1]} tokens, {len(steps)} stamps")
        runs.append({"prefill_s": steps[0], "decode_step_s": steps[1:], "total_s": total, **step_stats(steps[1:]),
                     "quiet": quiet, "meter": m.result})
        log(f"  large alone run {r + 1}/{repeats}: prefill {steps[0]:.3f} s, decode median "
            f"{runs[-1]['median_s'] * 1e3:.1f} ms/token, total {total:.2f} s; others busy {m.result['others_busy']}")
    return {
        "model": source,
        "generation": f"greedy, max_new_tokens = min_new_tokens = {n}, eos {eos}, use_cache=True (DynamicCache)",
        "runs": runs,
        **best_of(runs, DECODE_FIGURES),
        "others_busy": others(runs),
    }


# ---- 4. the floor: one cached large step + one cached small step (+ the new head) -------------------------------
def floor_calls(model, full, C: int, g) -> dict:
    """{part: (fn, make)}: one-token steps at cached context C of the large model (on the real sequence), the small
    model (on noise from g), the head, and the combined model (CachedStep); each context prefilled here, once."""
    import torch
    from transformers import DynamicCache

    ones = torch.ones(1, C + 1, dtype=torch.long)
    pos = torch.tensor([[C]])
    lc, sc = DynamicCache(), DynamicCache()
    model.large(input_ids=full[:, :C], attention_mask=ones[:, :C], cache=lc, use_cache=True)
    emb = torch.randn(1, C + 1, model.lm_head.in_features, generator=g)
    model.small(inputs_embeds=emb[:, :C], attention_mask=ones[:, :C], cache=sc, use_cache=True)
    ls, ss, tok, x = snapshot(lc), snapshot(sc), full[:, C : C + 1], emb[:, C:]
    h = model.small(inputs_embeds=x, attention_mask=ones, position_ids=pos, cache=DynamicCache(ss),
                    use_cache=True).last_hidden_state
    cs = CachedStep(model, full, C)
    return {
        "large": (lambda c: model.large(input_ids=tok, attention_mask=ones, position_ids=pos, cache=c, use_cache=True),
                  lambda: DynamicCache(ls)),
        "small": (lambda c: model.small(inputs_embeds=x, attention_mask=ones, position_ids=pos, cache=c,
                                        use_cache=True), lambda: DynamicCache(ss)),
        "head": (lambda _: model.lm_head(h), lambda: None),
        "combined": (cs.run, cs.fresh),
    }


def floor_runs(calls: dict, steps: int, repeats: int) -> list[dict]:
    """`repeats` runs, each timing every context's parts interleaved (`steps` calls each, the median)."""
    runs = []
    for r in range(repeats):
        quiet = settle()
        with Meter() as m:
            got = {C: interleaved(fns, steps) for C, fns in calls.items()}
        runs.append({"by_context": {str(C): v for C, v in got.items()}, "quiet": quiet, "meter": m.result})
        log(f"  floor run {r + 1}/{repeats}: " + "; ".join(
            f"context {C}: large {v['large'] * 1e3:.1f} ms, small {v['small'] * 1e3:.2f} ms, head "
            f"{v['head'] * 1e3:.2f} ms, combined {v['combined'] * 1e3:.1f} ms" for C, v in got.items())
            + f"; others busy {m.result['others_busy']}")
    return runs


def floor_figures(rs: list[dict]) -> dict:
    """One context's figures from its repeats ({part: median seconds} each): the lowest of each part, and the paired
    ratio combined / (large + small + head), all measured interleaved, per repeat; median over repeats."""
    v = best_of(rs, ("large", "small", "head", "combined"))
    return {"large_s": v["large"], "small_s": v["small"], "head_s": v["head"],
            "floor_s": v["large"] + v["small"] + v["head"], "combined_step_s": v["combined"],
            "paired_ratio": median([x["combined"] / (x["large"] + x["small"] + x["head"]) for x in rs])}


def bench_floor(model, prompt, tokens: list[int], n: int, steps: int, repeats: int) -> dict:
    import torch

    P = prompt.shape[1]
    full = prefix(prompt, tokens, len(tokens))
    contexts = sorted({P, P + (n - 2) // 2, P + n - 2})  # cached lengths at the first, middle and last decode step
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        calls = {C: floor_calls(model, full, C, g) for C in contexts}
        for fns in calls.values():  # warm-up
            for fn, make in fns.values():
                fn(make())
        runs = floor_runs(calls, steps, repeats)
    out = {C: floor_figures([r["by_context"][str(C)] for r in runs]) for C in contexts}
    # decode step k (1..N-1) runs with P + k - 1 cached positions
    per_step = interp({C: v["floor_s"] for C, v in out.items()}, range(P, P + n - 1))
    return {
        "method": (f"at cached contexts {contexts}: one-token steps of model.large (DynamicCache, attention mask, "
                   "position id), model.small (inputs_embeds, DynamicCache) and model.lm_head, and (paired) one "
                   "cached step of the combined model (model forward on fresh copies of its three caches + argmax), "
                   f"interleaved, each the median of {steps} calls, the lowest of {repeats} repeats; per decode step "
                   "interpolated linearly between contexts"),
        "paired_ratio_mean": sum(v["paired_ratio"] for v in out.values()) / len(out),
        "by_context": {str(C): v for C, v in out.items()},
        "runs": runs,
        "per_step_s": per_step,
        "mean_s": sum(per_step) / len(per_step),
        "median_s": median(per_step),
        "others_busy": others(runs),
    }


# ---- 5. where a cached decode step's time goes ------------------------------------------------------------------
class Instrument:
    """Forward hooks timing the large model, the bridge, the small model and the head on every call (a few
    microseconds per step); `breakdown(step_times)` attributes each decode step's time, "other" being the rest
    (the decode loop, positions, masks, argmax)."""

    def __init__(self, model):
        self.parts = {k: m for k, m in
                      {"large": model.large, "bridge": model.bridge, "small": model.small, "head": model.lm_head}.items()
                      if m is not None}
        self.acc: dict = {}
        self.handles: list = []

    def __enter__(self) -> "Instrument":
        starts = {}
        self.acc = {k: [] for k in self.parts}
        for name, mod in self.parts.items():
            self.handles.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: starts.__setitem__(name, clock())))
            self.handles.append(mod.register_forward_hook(
                lambda m, a, o, name=name: self.acc[name].append(clock() - starts[name])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def breakdown(self, times: list[float]) -> dict:
        n = len(times) - 1  # decode steps
        res = {name: sum(v[1:]) / n for name, v in self.acc.items() if len(v) == len(times)}
        res["step"] = sum(times[1:]) / n
        res["other"] = res["step"] - sum(v for k, v in res.items() if k != "step")
        res["prefill"] = {name: v[0] for name, v in self.acc.items() if v} | {"step": times[0]}
        return res


def run_profile(model, ids, steps: int) -> str:
    """torch.profiler over `steps` decode steps (after the prefill): the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from llm_modules.generate import SamplingConfig, stream

    it = stream(model, ids, None, SamplingConfig(max_new_tokens=steps + 1), use_cache=True, eos_token_id=None)
    next(it)  # prefill, not profiled
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in it:
            pass
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


# ---- one config ---------------------------------------------------------------------------------------------------
def bench_config(path: str, a: argparse.Namespace) -> dict:
    import torch

    from llm_modules.config import LLMModulesConfig
    from llm_modules.model import LLMModules
    from llm_modules.row_split import prepare_for_cpu_decoding

    log(f"== {path}")
    load0 = load_average()
    t0 = clock()
    cfg = LLMModulesConfig.from_yaml(path)
    model = prepare_for_cpu_decoding(LLMModules.from_config(cfg))  # as generate / chat / eval load a model
    load_s = clock() - t0
    P, N = a.prompt_tokens, a.new_tokens
    model.check_length(P + N)
    ids_high = min(model.lm_head.out_features, model.large.config.vocab_size)
    prompt = torch.randint(0, ids_high, (1, P), generator=torch.Generator().manual_seed(a.seed))
    res = {
        "config": path,
        "models": {
            "large": cfg.large.name_or_path or "inline random " + cfg.large.config.get("model_type", "?"),
            "large_params": sum(p.numel() for p in model.large.parameters()),
            "bridge_params": sum(p.numel() for p in model.bridge.parameters()),
            "small_params": sum(p.numel() for p in model.small.parameters()),
            "head_params": model.lm_head.weight.numel(),
            "vocab_size": model.lm_head.out_features,
            "dtype": str(model.lm_head.weight.dtype),
        },
        "model_load_s": load_s,
        "prompt": f"torch.randint(0, {ids_high}, (1, {P})) with torch.Generator().manual_seed({a.seed})",
        "prompt_tokens": P,
        "new_tokens": N,
    }
    log("cached decoding (combined model)")
    res["cached"] = bench_cached(model, prompt, N, a.repeats, not a.no_breakdown)
    tokens = res["cached"]["tokens"]
    if a.full_recompute != "off":
        log(f"full recompute ({a.full_recompute})")
        res["full_recompute"] = bench_full(model, prompt, tokens, N, a.repeats, a.full_recompute, a.full_points)
    log("floor (cached large step + cached small step + head)")
    res["floor"] = bench_floor(model, prompt, tokens, N, a.floor_repeats, a.repeats)
    if a.profile:
        log(f"profiler ({a.profile} decode steps)")
        res["profile"] = run_profile(model, prompt, a.profile)
    if not a.no_large_alone:
        log("large model alone (transformers generate)")
        res["large_alone"] = bench_large_alone(model, cfg, prompt, N, a.repeats)
    res["load_average"] = {"before": load0, "after": load_average()}
    res["derived"] = derive(res)
    return res


def derive(r: dict) -> dict:
    """Tokens/s and the two targets, each judged on every measure that bears on it (all must pass to say MET)."""
    N = r["new_tokens"]
    c, fl = r["cached"], r["floor"]
    d = {
        "cached_decode_tok_s_median": 1 / c["decode_median_s"],
        "cached_decode_tok_s_mean": 1 / c["decode_mean_s"],
        "cached_end_to_end_tok_s": N / c["total_s"],
        "floor_ratio": {
            "medians": c["decode_median_s"] / fl["median_s"],  # stream's decode steps / interpolated floor
            "means": c["decode_mean_s"] / fl["mean_s"],
            "paired": fl["paired_ratio_mean"],  # combined step / floor, interleaved at the same context
        },
    }
    d["target_floor_met"] = all(v <= TARGET_FLOOR_RATIO for v in d["floor_ratio"].values())
    if "full_recompute" in r:
        f = r["full_recompute"]
        d["full_end_to_end_tok_s"] = N / f["total_s"]
        d["full_decode_tok_s_mean"] = 1 / f["decode_mean_s"]
        d["speedup"] = {
            "end_to_end": f["total_s"] / c["total_s"],  # N tokens after the prompt, prefill included in both
            "decode_means": f["decode_mean_s"] / c["decode_mean_s"],  # steps 1..N-1
        }
        if f.get("paired_speedup"):
            d["speedup"]["paired"] = f["paired_speedup"]["mean"]
        d["target_speedup_met"] = all(v >= TARGET_SPEEDUP for v in d["speedup"].values())
    if "large_alone" in r:
        la = r["large_alone"]
        d["large_alone_decode_tok_s_median"] = 1 / la["decode_median_s"]
        d["large_alone_end_to_end_tok_s"] = N / la["total_s"]
        d["cached_vs_large_alone_decode_median"] = c["decode_median_s"] / la["decode_median_s"]
    return d


# ---- report -------------------------------------------------------------------------------------------------------
def busy(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    return "/".join(f"{100 * x:.0f}" for x in xs) if xs else "?"


def ms(s: float) -> str:
    return f"{s * 1e3:.2f}" if s < 0.1 else f"{s * 1e3:.1f}"


def report(r: dict) -> str:
    N, P = r["new_tokens"], r["prompt_tokens"]
    c, d, fl = r["cached"], r["derived"], r["floor"]
    rows = [["combined, cached (`stream(use_cache=True)`)", f"{c['prefill_s']:.3f}", ms(c["decode_median_s"]),
             ms(c["decode_mean_s"]), f"{1 / c['decode_median_s']:.2f}", f"{c['total_s']:.2f}",
             f"{N / c['total_s']:.2f}", busy(c["others_busy"])]]
    if "full_recompute" in r:
        f = r["full_recompute"]
        tag = "sampled+interpolated" if f["measured_step_s"] is not None else "all steps timed"
        rows.append([f"combined, full recompute (`use_cache=False`, {tag})", f"{f['first_step_s']:.3f}", "-",
                     ms(f["decode_mean_s"]), f"{1 / f['decode_mean_s']:.3f}", f"{f['total_s']:.1f}",
                     f"{N / f['total_s']:.3f}", busy(f["others_busy"])])
    if "large_alone" in r:
        la = r["large_alone"]
        rows.append(["large model alone, transformers `generate` (cached)", f"{la['prefill_s']:.3f}",
                     ms(la["decode_median_s"]), ms(la["decode_mean_s"]), f"{1 / la['decode_median_s']:.2f}",
                     f"{la['total_s']:.2f}", f"{N / la['total_s']:.2f}", busy(la["others_busy"])])
    rows.append(["floor: cached large step + small step + head", "-", ms(fl["median_s"]), ms(fl["mean_s"]),
                 f"{1 / fl['median_s']:.2f}", "-", "-", busy(fl["others_busy"])])
    head = ["method", "prefill / first step s", "decode ms/token (median)", "decode ms/token (mean)",
            "decode tok/s", f"total s ({N} tokens)", "end-to-end tok/s", "others busy % (per run)"]
    out = [f"### {r['config']}  (prompt {P} tokens, {N} new tokens, batch 1)", "", table(rows, head), ""]
    fc = [[C, ms(v["large_s"]), ms(v["small_s"]), ms(v["head_s"]), ms(v["floor_s"]), ms(v["combined_step_s"]),
           f"{v['paired_ratio']:.2f}"] for C, v in fl["by_context"].items()]
    out += ["Floor by cached context (one-token steps, interleaved; median of steps, lowest of repeats):", "",
            table(fc, ["context", "large ms", "small ms", "head ms", "floor ms", "combined step ms",
                       "combined / floor (paired)"]), ""]
    if c.get("breakdown_s"):
        b = c["breakdown_s"]
        parts = [k for k in ("large", "bridge", "small", "head", "other") if k in b]
        out += ["Where a cached decode step goes (forward hooks in the cached run with the lowest median step; mean "
                "over its decode steps):", "",
                table([[ms(b[k]) for k in parts] + [ms(b["step"])]], [f"{k} ms" for k in parts] + ["step ms"]), ""]
    if "full_recompute" in r:
        f = r["full_recompute"]
        out += [f"Full recompute: {f['method']}.",
                f"Its argmax equals the cached run's token at every timed step: {f['argmax_matches_cached']}."]
        if f.get("paired_speedup"):
            out.append("Paired (full-recompute step / cached step right after it, same length): " + ", ".join(
                f"length {L}: {v:.1f}x" for L, v in f["paired_speedup"]["by_length"].items()) + ".")
        out.append("")
        sp = d["speedup"]
        out.append(f"- speedup cached / full recompute: end-to-end {sp['end_to_end']:.1f}x, decode steps (means) "
                   f"{sp['decode_means']:.1f}x" + (f", paired steps (mean) {sp['paired']:.1f}x" if "paired" in sp else "")
                   + f" -> target >= {TARGET_SPEEDUP:.0f}x {'MET' if d['target_speedup_met'] else 'NOT MET'}")
    fr = d["floor_ratio"]
    out.append(f"- cached decode step / floor: {fr['medians']:.2f}x (medians), {fr['means']:.2f}x (means), "
               f"{fr['paired']:.2f}x (paired, mean over contexts) -> target <= {TARGET_FLOOR_RATIO}x "
               f"{'MET' if d['target_floor_met'] else 'NOT MET'}")
    if "large_alone" in r:
        out.append(f"- cached combined decode step / large-alone generate step (medians): "
                   f"{d['cached_vs_large_alone_decode_median']:.2f}x")
    out.append(f"- load average before / after: {r['load_average']['before']} / {r['load_average']['after']}")
    return "\n".join(out)


def main(argv=None) -> int:
    a = parse_args(argv)
    threads = set_threads(a.threads)
    QUIET.update(threshold=a.quiet, timeout=a.quiet_timeout)
    import torch

    torch.manual_seed(a.seed)
    m = machine()
    log(f"machine: {describe_machine(m)}")
    results = {"command": " ".join([Path(sys.executable).name] + sys.argv), "machine": m, "threads": threads,
               "args": vars(a), "llm_modules_cache": os.environ.get("LLM_MODULES_CACHE"), "configs": []}
    t0 = clock()
    for path in a.config:
        results["configs"].append(bench_config(path, a))
        write_json(a.out, results)  # partial results survive a later failure
    results["wall_s"] = clock() - t0
    results["machine"]["load_average_at_end"] = load_average()
    write_json(a.out, results)
    print(f"## Generation benchmark\n\nMachine: {describe_machine(m)}\n")
    for r in results["configs"]:
        print(report(r) + "\n")
        if "profile" in r:
            print(r["profile"])
    print(f"wall time {results['wall_s']:.0f} s; JSON: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
