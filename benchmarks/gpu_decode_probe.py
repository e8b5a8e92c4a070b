"""Where a batch-1 decode step's time goes on a GPU (issue 19's diagnosis of benchmarks/gpu.py's slow decoding).

    python benchmarks/gpu_decode_probe.py

The paper-size model of benchmarks/gpu.py (random weights, bf16, no training first) decodes 24 tokens after a
256-token prompt with llm_modules.generate.stream, and the frozen large model alone decodes 24 tokens with its own
DynamicCache (Hugging Face's path, no bridge, no small model): with torch's default CPU threads (one per core), then
with one thread, then with one thread and Python's garbage collector off. It prints the milliseconds of each step
(torch.cuda.synchronize() after each; common.time_stream for the combined model), so that a jump from one regime
to another shows. Measured on an H200 (docs/benchmarks.md, "GPU"; there the combined model's loop was written inline,
with the same clock points as time_stream).
"""
import gc
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from common import time_stream  # noqa: E402
from gpu import PAPER, build  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/gpu_decode_probe.py: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    dev = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = build(PAPER, dev, torch).eval().to(torch.bfloat16)
    ids = torch.randint(0, 151936, (1, 256), device=dev)

    def ours(n=24):
        return [round(t * 1e3, 1) for t in time_stream(model, ids, n, True, torch.cuda.synchronize)[0]]

    @torch.no_grad()
    def hf_large(n=24):
        cache = DynamicCache()
        model.large(ids, past_key_values=cache, use_cache=True)
        tok = ids[:, -1:]
        torch.cuda.synchronize()
        t = [time.perf_counter()]
        for _ in range(n):
            model.large(tok, past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
            t.append(time.perf_counter())
        return [round((b - a) * 1e3, 1) for a, b in zip(t, t[1:])]

    print("threads", torch.get_num_threads())
    ours(8)  # warm-up
    print("ours default", ours())
    print("hf large default", hf_large())
    torch.set_num_threads(1)
    print("ours 1 thread", ours())
    print("hf large 1 thread", hf_large())
    gc.disable()
    print("ours 1 thread gc off", ours())
    gc.enable()
    return 0


if __name__ == "__main__":
    sys.exit(main())
