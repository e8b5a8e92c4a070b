"""Shared helpers for the benchmark scripts: thread setting, machine description, timing, output.

Only the standard library and torch at import time; `llm_modules` is imported only inside `time_stream`, so every
benchmark can import this first (before the package pulls in transformers) and set threads before any work starts.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch


def set_threads(n: int) -> int:
    """Intra-op threads for torch (and the usual OpenMP/MKL variables, for libraries loaded later); returns n."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_details() -> dict:
    """Family / model / stepping and the vector-ISA flags that matter to torch's CPU kernels (a hypervisor often
    hides the marketing name, e.g. "AMD EPYC"; family 25 model 17 is Zen 4)."""
    info: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" not in line:
                if info:
                    break  # first processor only
                continue
            k, v = (x.strip() for x in line.split(":", 1))
            if k in ("vendor_id", "cpu family", "model", "stepping", "cpu MHz", "cache size") and k not in info:
                info[k] = v
            elif k == "flags" and "isa" not in info:
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_tile")
                info["isa"] = [f for f in wanted if f in v.split()]
                info["hypervisor"] = "hypervisor" in v.split()
    except OSError:
        pass
    try:
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        pass
    return info


def load_average() -> Optional[tuple[float, float, float]]:
    """1/5/15-minute load averages (other processes on a shared machine distort timings; report this)."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except (OSError, AttributeError):
        return None


def memory_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict:
    """What the figures were measured on."""
    import transformers  # imported here: the description names its version

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu": cpu_model(),
        "cpu_details": cpu_details(),
        "logical_cpus": os.cpu_count(),
        "cpus_available_to_process": affinity,
        "memory_gib": memory_gib(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
    }


def describe_machine(m: dict) -> str:
    d = m.get("cpu_details", {})
    detail = f" (family {d.get('cpu family')} model {d.get('model')}, {' '.join(d.get('isa', []))}" + (
        ", under a hypervisor)" if d.get("hypervisor") else ")") if d else ""
    return (
        f"{m['cpu']}{detail}, {m['cpus_available_to_process'] or m['logical_cpus']} CPUs available "
        f"({m['logical_cpus']} logical), {m['memory_gib']} GiB RAM; torch {m['torch']} with "
        f"{m['torch_threads']} threads, transformers {m['transformers']}, Python {m['python']}; "
        f"load average at start {m['load_average_at_start']}"
    )


# ---- timing -----------------------------------------------------------------------------------------------------
clock = time.perf_counter


@contextmanager
def timer(into: list) -> Iterator[None]:
    """Append the seconds the block took to `into`."""
    t0 = clock()
    try:
        yield
    finally:
        into.append(clock() - t0)


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn(), `warmup` untimed calls first."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def time_stream(model, ids, n: int, use_cache: bool = True, sync: Optional[Callable[[], object]] = None,
                **kw) -> tuple[list[float], list[int]]:
    """Seconds of each step of `llm_modules.generate.stream` over `ids` for n new tokens (greedy, no eos: all n are
    made) and the tokens of row 0. Step 0 runs from the first request to the first token (the prefill, when
    cached); the reading of each token is outside the clock. sync (e.g. torch.cuda.synchronize) is called before
    the clock starts and at the end of every step, so that a device's queued work counts in its own step. kw goes
    to `stream` (e.g. model_kwargs)."""
    from llm_modules.generate import SamplingConfig, stream

    sync = sync or (lambda: None)
    times, tokens = [], []
    it = stream(model, ids, None, SamplingConfig(max_new_tokens=n), use_cache=use_cache, eos_token_id=None, **kw)
    sync()
    t0 = clock()
    for step in it:
        sync()
        times.append(clock() - t0)
        tokens.append(int(step.tokens[0]))
        t0 = clock()
    return times, tokens


# ---- other processes on a shared machine -----------------------------------------------------------------------
def _cpu_ticks() -> Optional[tuple[int, int, int]]:
    """(busy, total, steal) clock ticks of all CPUs together, from /proc/stat (Linux), else None."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    steal = f[7] if len(f) > 7 else 0
    total = sum(f[:8])  # guest time is already counted in user
    return total - idle - steal, total, steal


def _self_ticks() -> int:
    """utime + stime of this process (all its threads), in clock ticks."""
    try:
        return sum(int(x) for x in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13])
    except (OSError, ValueError, IndexError):
        return 0


class Meter:
    """Times a block and measures what other processes did meanwhile (Linux /proc; fields are None elsewhere).

    result: wall_s; self_cpu_s (this process, all threads); others_busy = CPU time of everything else as a fraction
    of the machine's capacity during the block (0 = alone, 0.5 = one of two cores busy elsewhere); steal = the same
    for time the hypervisor gave to other guests.
    """

    def __enter__(self) -> "Meter":
        self._sys, self._self, self._t0 = _cpu_ticks(), _self_ticks(), clock()
        self.result: dict = {}
        return self

    def __exit__(self, *exc) -> None:
        wall = clock() - self._t0
        sys1, self1 = _cpu_ticks(), _self_ticks()
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        r = {"wall_s": wall, "self_cpu_s": (self1 - self._self) / hz, "others_busy": None, "steal": None}
        if self._sys and sys1 and sys1[1] > self._sys[1]:
            total = sys1[1] - self._sys[1]
            r["others_busy"] = round(max(0.0, (sys1[0] - self._sys[0] - (self1 - self._self)) / total), 3)
            r["steal"] = round((sys1[2] - self._sys[2]) / total, 3)
        self.result = r


def busy_fraction(interval: float = 1.0) -> Optional[float]:
    """Fraction of the machine's CPU capacity used by everything (call while this process is idle)."""
    a = _cpu_ticks()
    time.sleep(interval)
    b = _cpu_ticks()
    if not a or not b or b[1] <= a[1]:
        return None
    return (b[0] - a[0] + b[2] - a[2]) / (b[1] - a[1])


def wait_quiet(threshold: float, timeout: float, interval: float = 1.0) -> dict:
    """Wait (up to `timeout` s) until other processes use less than `threshold` of the CPUs, measured over
    `interval` s. threshold >= 1 disables the wait. Returns what happened, for the record."""
    if threshold >= 1:
        return {"waited_s": 0.0, "busy": None, "quiet": None}
    t0 = clock()
    busy = busy_fraction(interval)
    while busy is not None and busy >= threshold and clock() - t0 < timeout:
        busy = busy_fraction(interval)
    return {"waited_s": round(clock() - t0, 1), "busy": None if busy is None else round(busy, 3),
            "quiet": busy is None or busy < threshold}


def summary(xs: Sequence[float]) -> dict:
    """min / median / mean / max of a list of seconds (empty list -> {})."""
    if not xs:
        return {}
    return {"n": len(xs), "min": min(xs), "median": statistics.median(xs), "mean": statistics.fmean(xs), "max": max(xs)}


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- output -----------------------------------------------------------------------------------------------------
def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def write_json(path: str | os.PathLike, data: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=2, default=str) + "\n")
