"""Counting host synchronizations: the calls that make the host wait for an accelerator, or copy host data to it.

On a GPU the decode loop is host-bound when each step waits for the device (a tensor read by `.item()`, `int()`,
`bool()`, `.tolist()`, an `if tensor:`, an op whose output size depends on the data such as `nonzero` or a boolean
index) or sends it a value made on the host (`torch.tensor(x, device=...)`, `host_tensor.to(device)`). On the CPU
none of these waits, but the same Python calls are made, so counting them with tiny models on the CPU predicts how
often a decode step would stall the host on a GPU, and a test can hold the count down.

    with SyncCounter() as syncs:
        model.generate(ids, max_new_tokens=32)
    syncs.total, syncs.counts  # e.g. 40, Counter({'__bool__': 32, 'item': 8})

Hand-written (a TorchFunctionMode; torch has no such counter for the CPU). What it counts, by kind:
  reads     item, __bool__, __int__, __float__, __index__, tolist, numpy, equal, allclose (a value the host needs);
  shapes    nonzero, argwhere, masked_select, unique, unique_consecutive, repeat_interleave with a tensor of repeats,
            and indexing with a boolean tensor (the output size depends on the data);
  copies    torch.tensor / as_tensor / asarray of some data given a `device` (an empty one copies nothing), and
            `.to(device)` / `.cuda()` / `copy_` of a tensor made from host data (torch.tensor or as_tensor without a
            device).
Tensors made on the host and read on the host (a CPU tensor of eos ids, say) are counted too when read: on a CPU run
they cannot be told apart from device tensors, so code that means to stay on the host should keep Python values.
"""
from __future__ import annotations

import traceback
import weakref
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "equal", "allclose"}
SHAPES = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
FROM_HOST = {"tensor", "as_tensor", "asarray"}
MOVES = {"to", "cuda", "copy_"}
_TORCH_DIR = str(Path(torch.__file__).parent)


class SyncCounter(TorchFunctionMode):
    """Counts host synchronizations while active (`counts` by call name, `total`); with sites=True also where they
    were made (`sites`: "file:line in function" of the first frame outside torch and this module)."""

    def __init__(self, sites: bool = False):
        super().__init__()
        self.counts: Counter = Counter()
        self.sites: Counter = Counter()
        self.record_sites = sites
        self._host: set[int] = set()  # ids of live tensors made from host data without a device

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        kind = self._kind(name, args, kwargs, out)
        if name in FROM_HOST and kwargs.get("device") is None and isinstance(out, torch.Tensor):
            self._host.add(id(out))
            weakref.finalize(out, self._host.discard, id(out))
        if kind:
            self.counts[kind] += 1
            if self.record_sites:
                self.sites[f"{kind} at {_caller()}"] += 1
        return out

    def _kind(self, name: str, args, kwargs, out) -> Optional[str]:
        if name in READS or name in SHAPES:
            return name
        if name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor) \
                and kwargs.get("output_size") is None:
            return name
        if name == "__getitem__" and _has_bool_index(args[1] if len(args) > 1 else None):
            return "bool index"
        if name in FROM_HOST and kwargs.get("device") is not None and out.numel():  # no copy of nothing
            return f"{name}(device=)"
        if name in MOVES and args:
            src = args[1] if name == "copy_" else args[0]
            moved = name != "to" or _names_device(args, kwargs)
            if isinstance(src, torch.Tensor) and id(src) in self._host and moved:
                return f"host {name}"
        return None


def _has_bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _names_device(args, kwargs) -> bool:
    return kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args[1:])


def _caller() -> str:
    here = str(Path(__file__))
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(_TORCH_DIR) and frame.filename != here:
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return "?"
