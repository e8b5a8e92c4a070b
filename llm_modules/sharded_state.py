"""Whole trainable weights and optimizer state of a training model however it is wrapped - plain, DDP, or FSDP2
with sharded DTensor parameters - and putting them back.

`torch.distributed.checkpoint.state_dict` does the gathering and scattering (library code); this module only fixes
what the project's checkpoint files hold: the trainable parameters (not the frozen large model, not buffers), and
the optimizer state keyed by parameter name, so a checkpoint written by N processes, sharded or not, resumes in M.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# Whole tensors, copied to the CPU, only on rank 0 when several processes run (the others get empty dicts).
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# Every rank passes whole tensors; each keeps its own shard of them (FSDP) or all of them (DDP, one process).
_SCATTER = StateDictOptions(full_state_dict=True, strict=False)


def gather(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], trainable: set[str]
           ) -> tuple[dict, Optional[dict]]:
    """(weights {name: tensor}, optimizer state dict {"state": {name: {...}}, "param_groups": [...]}, or None
    without an optimizer).

    A collective under FSDP: every rank must call it; the main rank gets the whole tensors."""
    # ignore_frozen_params leaves the large model out; a frozen part of the trainable set (train.lr_head: 0, a head
    # kept at its warm start) is saved all the same, so it is counted as trainable while the weights are gathered.
    held = [p for n, p in model.named_parameters() if not p.requires_grad and n.removeprefix("module.") in trainable]
    for p in held:
        p.requires_grad_(True)
    try:
        weights = {k: v for k, v in get_model_state_dict(model, options=_GATHER).items() if k in trainable}
    finally:
        for p in held:
            p.requires_grad_(False)
    return weights, None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=_GATHER)


def scatter(model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict, optim_state: Optional[dict]
            ) -> None:
    """Load whole tensors (every rank passes the same ones) into a possibly sharded model and its optimizer (left
    as it is when `optim_state` is None)."""
    # Both setters rewrite the dicts they are given (names, DTensor conversion): give them copies.
    set_model_state_dict(model, dict(weights), options=_SCATTER)
    if optim_state is not None:
        set_optimizer_state_dict(model, optimizer, copy.deepcopy(optim_state), options=_SCATTER)


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    """{"<param name>.<state key>": tensor} for safetensors, and the JSON-able param groups."""
    tensors = {f"{name}.{k}": v for name, st in state["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    return tensors, state["param_groups"]


def unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[str, dict] = {}
    for key, v in tensors.items():
        name, k = key.rsplit(".", 1)  # state keys (step, exp_avg, exp_avg_sq) have no dot; parameter names do
        state.setdefault(name, {})[k] = v
    return {"state": state, "param_groups": groups}
