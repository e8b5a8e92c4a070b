"""The frozen-feature cache: the large model's source states for a tokenized dataset, computed once, stored on disk.

The large model is frozen, so its states for a fixed token sequence never change; a plain loop recomputes them every
epoch. Hand-written because it is the project's own: shards are safetensors files (memory-mapped on read), each
holding one (len_i, D_L) tensor per example, written to a temporary name and renamed when complete, so a
half-written shard is never read and an interrupted build resumes at the first missing shard. SIGTERM / SIGINT during
a build drop the shard being computed (a shard being written is finished), say how far the build got and raise
`interrupt.Interrupted` (the CLI exits with 143 / 130); the same command then builds only the missing shards.

Key: sha256 of the large model's identity (name, revision, overrides, and for local files their sizes and times),
the tapped layer (or layers), the large dtype, the storage dtype, and every example's token ids (which capture
the tokenizer, the formatting and the data). Anything different -> another directory; a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .backbones import hidden_size, hidden_states_at, positions_from_mask
from .checkpoint import save_tensors
from .files import atomic_write_json
from .errors import UserError
from .interrupt import Interrupted, StopRequests, signal_name

SHARD_EXAMPLES = 256
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def model_identity(cfg) -> dict:
    """What makes the large model's states what they are."""
    spec = cfg.large
    ident = {"large": spec.identity, "layer": spec.layer, "dtype": spec.dtype}
    if spec.layers:  # only then: a one-layer cache keeps the key it always had
        ident["layers"] = list(spec.layers)
    if spec.name_or_path is not None:
        from .weights import WEIGHTS

        if spec.name_or_path in WEIGHTS:
            ident["sha256"] = WEIGHTS[spec.name_or_path].sha256
        elif Path(spec.name_or_path).is_dir():
            files = sorted(p for p in Path(spec.name_or_path).iterdir()
                           if p.suffix in {".safetensors", ".bin", ".gguf", ".json"})
            ident["files"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return ident


def large_ids(example) -> list[int]:
    """What the large model reads: the whole sequence (stream coupling) or the prompt memory (prompt coupling)."""
    return example.memory_ids if example.memory_ids is not None else example.input_ids


def fingerprint(cfg, examples, storage: str) -> str:
    h = hashlib.sha256(json.dumps({**model_identity(cfg), "storage": storage}, sort_keys=True).encode())
    for e in examples:
        ids = large_ids(e)
        h.update(len(ids).to_bytes(4, "little"))
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:20]


@dataclass
class SplitFeatures:
    """Read side of one split's cache: per-example states, batched with right padding to the batch length."""

    directory: Path
    num_examples: int

    def __post_init__(self):
        self._handles: dict[int, object] = {}

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / f"shard-{shard:05d}.safetensors"), framework="pt")
        return self._handles[shard]

    def get(self, index: int) -> torch.Tensor:
        return self._handle(index // SHARD_EXAMPLES).get_tensor(str(index))  # (len_i, D_L)

    def batch(self, indices: list[int], length: int) -> torch.Tensor:
        """(B, length, D_L) float32, zeros after each example's end (those positions are padding)."""
        rows = [self.get(i) for i in indices]
        out = torch.zeros(len(rows), length, rows[0].shape[-1])
        for b, r in enumerate(rows):
            out[b, : r.shape[0]] = r.float()
        return out


def _split_dir(root: Path, cfg, examples, storage: str, split: str) -> Path:
    return root / f"{split}-{fingerprint(cfg, examples, storage)}"


def is_complete(directory: Path) -> bool:
    return (directory / "meta.json").is_file()


def cache_root(cfg) -> Path:
    if cfg.train.feature_cache_dir:
        return Path(cfg.train.feature_cache_dir)
    from .weights import cache_root as weights_root

    return weights_root() / "features"


def open_split(cfg, examples, split: str) -> Optional[SplitFeatures]:
    """The complete cache for these examples, or None."""
    d = _split_dir(cache_root(cfg), cfg, examples, cfg.train.feature_dtype, split)
    if not is_complete(d):
        return None
    meta = json.loads((d / "meta.json").read_text())
    return SplitFeatures(d, meta["num_examples"])


def build_split(large, cfg, examples, split: str, *, batch_tokens: int = 4096, log=print) -> SplitFeatures:
    """Run the frozen large backbone once over `examples` and store its states at large.layer (or large.layers,
    concatenated; resumes a partial build)."""
    storage = cfg.train.feature_dtype
    root = cache_root(cfg)
    d = _split_dir(root, cfg, examples, storage, split)
    if is_complete(d):
        return SplitFeatures(d, len(examples))
    width = hidden_size(large.config) * len(cfg.large.read_layers)
    tokens = sum(len(large_ids(e)) for e in examples)
    need = tokens * width * DTYPES[storage].itemsize
    d.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(d).free
    log(f"feature cache ({split}): {len(examples)} examples, {tokens:,} tokens x {width} x "
        f"{DTYPES[storage].itemsize} bytes = {need / 2**20:,.1f} MiB -> {d}")
    if need * 1.05 > free:
        raise UserError(f"the feature cache needs {need / 2**30:.2f} GiB but {d} has {free / 2**30:.2f} GiB free; "
                        "set train.feature_cache_dir to a larger disk or train.feature_cache: off")
    n_shards = (len(examples) + SHARD_EXAMPLES - 1) // SHARD_EXAMPLES
    done = [s for s in range(n_shards) if (d / f"shard-{s:05d}.safetensors").is_file()]
    bar = tqdm(total=tokens, unit="tok", desc=f"large model -> cache ({split})", dynamic_ncols=True)
    bar.update(sum(len(large_ids(e)) for s in done for e in examples[s * SHARD_EXAMPLES:(s + 1) * SHARD_EXAMPLES]))
    stops = StopRequests(first="dropping the shard being computed (one being written is finished), then stopping",
                         again="ignored until the shard being written is complete")
    with stops:
        for s in range(n_shards):
            if s in done:
                continue
            first = s * SHARD_EXAMPLES
            shard = _compute(large, cfg.large.read_layers, examples[first:first + SHARD_EXAMPLES], first,
                             batch_tokens, DTYPES[storage], bar, stops)
            if shard is None:  # a signal: the shard is dropped, nothing of it is on disk
                break
            save_tensors(d / f"shard-{s:05d}.safetensors", shard)  # atomic: complete or absent
            done.append(s)
            if stops.signum:
                break
        bar.close()
        if len(done) == n_shards:
            atomic_write_json(d / "meta.json", {"num_examples": len(examples), "tokens": tokens, "width": width,
                                                "storage": storage, "identity": model_identity(cfg)})
    if stops.signum:
        message = (f"stopped by {signal_name(stops.signum)}: {len(done)} of {n_shards} shards of the {split} feature "
                   f"cache are complete in {d}; the same command builds the rest (finished shards are kept)")
        log(message)
        raise Interrupted(stops.signum, message)
    return SplitFeatures(d, len(examples))


@torch.no_grad()
def _compute(large, layers: tuple[int, ...], examples, first: int, batch_tokens: int, dtype, bar,
             stops: Optional[StopRequests] = None) -> Optional[dict[str, torch.Tensor]]:
    """States of one shard's examples, batched by length; None as soon as `stops` records a signal."""
    seqs = [large_ids(e) for e in examples]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: dict[str, torch.Tensor] = {}
    i = 0
    while i < len(order):
        if stops is not None and stops.signum:
            return None
        T = len(seqs[order[i]])
        group = [order[i]]
        while i + len(group) < len(order):  # grow the batch while its padded size stays under batch_tokens
            T_next = len(seqs[order[i + len(group)]])
            if T_next * (len(group) + 1) > batch_tokens:
                break
            group.append(order[i + len(group)])
            T = T_next
        ids = torch.zeros(len(group), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, j in enumerate(group):
            n = len(seqs[j])
            ids[b, :n], mask[b, :n] = torch.tensor(seqs[j]), 1
        states = hidden_states_at(large, layers, ids, mask, positions_from_mask(mask))  # (B, T, n * D_L)
        for b, j in enumerate(group):
            n = len(seqs[j])
            out[str(first + j)] = states[b, :n].to(dtype).clone()
            bar.update(n)
        i += len(group)
    return out


def prepare(large, cfg, data, log=print) -> dict[str, SplitFeatures]:
    """Build (or find) the cache for the train and val splits with the frozen large backbone `large`."""
    return {split: build_split(large, cfg, getattr(data, split), split, log=log)
            for split in ("train", "val") if getattr(data, split)}


def available(cfg, data) -> Optional[dict[str, SplitFeatures]]:
    """The complete caches for both splits without loading the large model, or None if any is missing."""
    found = {split: open_split(cfg, getattr(data, split), split) for split in ("train", "val") if getattr(data, split)}
    return found if all(v is not None for v in found.values()) else None
