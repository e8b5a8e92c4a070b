"""Serving throughput and latency (issue 21): `llm-modules serve` under 1, 8 and 32 concurrent clients, with
batching (--max-batch-size 16, the default) and serving one request at a time (--max-batch-size 1).

    python benchmarks/serve.py --checkpoint runs/serve-bench [--out /tmp/serve.json]

The checkpoint: any checkpoint of configs/default.yaml (speed does not depend on how far it was trained), e.g.

    llm-modules train --config configs/default.yaml --max-steps 2 --output-dir runs/serve-bench

Without --checkpoint the script saves the untrained model of --config to a temporary directory and serves that.

What is measured, per mode and concurrency level C: the server runs in its own process (`llm-modules serve
--threads T`); C clients (asyncio, the official `openai` async client) share a list of --requests distinct greedy
chat requests ("What is a + b?"-style questions, --max-tokens new tokens each, streamed with usage), each client
sending its next request as soon as its previous one is answered. Wall time runs from the first request sent to
the last answer; requests/s and tokens/s (completion tokens, from `usage`) are over that wall time; latency is per
request (sent -> last chunk); time to first token is sent -> first chunk with text. One untimed request warms each
server up. Results and method: docs/benchmarks.md, section Serving.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # `common` beside this script; this checkout's llm_modules
from common import describe_machine, load_average, log, machine, set_threads, table, write_json  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Server:
    """`llm-modules serve` in a subprocess."""

    def __init__(self, checkpoint: str, batch: int, threads: int, name: str = "bench"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [sys.executable, "-m", "llm_modules", "serve", "--checkpoint", checkpoint, "--port", str(self.port),
               "--max-batch-size", str(batch), "--threads", str(threads), "--model-name", name,
               "--log-level", "warning"]
        self.command = " ".join(cmd[1:])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(cmd, env=env)
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with status {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url + "/models", timeout=2):
                    break
            except OSError:
                if time.perf_counter() - t0 > 600:
                    self.stop()
                    raise SystemExit("the server did not come up within 600 s")
                time.sleep(0.5)
        self.load_s = time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def questions(n: int) -> list[str]:
    ops = ["+", "-", "*"]
    return [f"What is {17 + 7 * i} {ops[i % 3]} {5 + 3 * i}? Show your steps." for i in range(n)]


async def one(client, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, tokens, text = None, 0, []
    stream = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
            if first is None:
                first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    return {"prompt": prompt, "latency_s": latency, "ttft_s": first if first is not None else latency,
            "tokens": tokens, "text": "".join(text)}


async def level(url: str, clients: int, prompts: list[str], max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    todo = list(prompts)
    results: list[dict] = []

    async def worker():
        while todo:
            results.append(await one(client, todo.pop(0), max_tokens))

    load = load_average()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    lat = [r["latency_s"] for r in results]
    ttft = [r["ttft_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall, "latency_p50_s": statistics.median(lat),
            "latency_p95_s": percentile(lat, 0.95), "ttft_p50_s": statistics.median(ttft),
            "ttft_p95_s": percentile(ttft, 0.95), "load_average_at_start": load, "per_request": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a checkpoint of --config (default: its untrained model, saved to a temp dir)")
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", default="4,16,32", help="requests per level (one number, or one per level)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="--max-batch-size of the batched server")
    ap.add_argument("--modes", default="batched,sequential", help="batched (--batch-size), sequential (1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="JSON with every request's figures")
    args = ap.parse_args()

    set_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    counts = counts * len(levels) if len(counts) == 1 else counts
    if len(counts) != len(levels):
        raise SystemExit("--requests: give one number or one per level")
    tmp = None
    checkpoint = args.checkpoint
    if checkpoint is None:
        from llm_modules import LLMModules, LLMModulesConfig

        tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
        checkpoint = tmp.name
        log(f"no --checkpoint: saving the untrained model of {args.config} to {checkpoint}")
        LLMModules.from_config(LLMModulesConfig.from_yaml(args.config)).save_pretrained(checkpoint)

    info = machine()
    out = {"date": date.today().isoformat(), "machine": info, "checkpoint": checkpoint, "max_tokens": args.max_tokens,
           "command": " ".join([Path(sys.executable).name] + sys.argv), "modes": {}}
    log(describe_machine(info))
    for mode in args.modes.split(","):
        out["modes"][mode] = bench_mode(mode, args, checkpoint, levels, counts)
    summarize(out)
    if args.out:
        write_json(args.out, out)
    if tmp is not None:
        tmp.cleanup()
    return 0


def bench_mode(mode: str, args, checkpoint: str, levels: list[int], counts: list[int]) -> dict:
    """One server (batched: --batch-size; sequential: 1), warmed up, then each concurrency level in turn."""
    batch = args.batch_size if mode == "batched" else 1
    log(f"starting the server ({mode}, --max-batch-size {batch})")
    server = Server(checkpoint, batch, args.threads)
    try:
        asyncio.run(level(server.url, 1, ["Warm-up: what is 1 + 1?"], args.max_tokens))
        runs = []
        for clients, n in zip(levels, counts):
            r = asyncio.run(level(server.url, clients, questions(n), args.max_tokens))
            log(f"  {mode}: {clients} clients, {n} requests: {r['requests_per_s']:.2f} req/s, "
                f"{r['tokens_per_s']:.1f} tok/s, p50 {r['latency_p50_s']:.2f} s, ttft p50 {r['ttft_p50_s']:.2f} s")
            runs.append(r)
        return {"max_batch_size": batch, "server_command": server.command, "server_load_s": server.load_s,
                "levels": runs}
    finally:
        server.stop()


def summarize(out: dict) -> None:
    """Print the table, the batched / one-at-a-time ratios, and whether greedy answers agree across modes (recorded
    in out["greedy_answers_differ"])."""
    rows = []
    for mode, m in out["modes"].items():
        for r in m["levels"]:
            rows.append([f"{mode} (--max-batch-size {m['max_batch_size']})", r["clients"], r["requests"], r["tokens"],
                         f"{r['wall_s']:.1f}", f"{r['requests_per_s']:.3f}", f"{r['tokens_per_s']:.1f}",
                         f"{r['latency_p50_s']:.2f}", f"{r['latency_p95_s']:.2f}", f"{r['ttft_p50_s']:.2f}",
                         f"{r['ttft_p95_s']:.2f}"])
    print(table(rows, ["server", "clients", "requests", "tokens", "wall s", "requests/s", "tokens/s",
                       "latency p50 s", "latency p95 s", "TTFT p50 s", "TTFT p95 s"]))
    if "batched" in out["modes"] and "sequential" in out["modes"]:
        for b, s in zip(out["modes"]["batched"]["levels"], out["modes"]["sequential"]["levels"]):
            print(f"{b['clients']} clients: batched / one at a time = {b['tokens_per_s'] / s['tokens_per_s']:.2f}x "
                  "tokens/s")
        # greedy answers must not depend on the batch a request landed in
        answers = {}
        for mode in ("batched", "sequential"):
            for r in out["modes"][mode]["levels"]:
                for q in r["per_request"]:
                    answers.setdefault(q["prompt"], set()).add(q["text"])
        differ = sorted(p for p, texts in answers.items() if len(texts) > 1)
        out["greedy_answers_differ"] = differ
        print(f"greedy answers identical across modes and levels: {len(answers) - len(differ)}/{len(answers)} prompts")


if __name__ == "__main__":
    sys.exit(main())
