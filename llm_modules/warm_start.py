"""`bridge.init: large`: the combined model starts at the large model's own next-token predictions.

The large model predicts `W s` from its final state s through its LM head W; the combined model predicts
`H n(P s + c)` once its residual branches start at zero (identity blocks, silent bridge). P keeps the directions of s
that move the large model's distribution the most (its softmax's Fisher metric), c a constant channel that steadies
the final norm n, and H = W M with M the least-squares read-out of s from n(P s + c) on the training states.
The math, the costs and what was needed: docs/warm-start.md.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file
from torch import nn

from .checkpoint import save_tensors
from .couplings import StreamCoupling
from .errors import UserError
from .prompt_coupling import block_list

# The last projection of a block's attention and MLP branches, by Hugging Face module name (GPT-2, GPT-Neo, Llama,
# Qwen2, Gemma, OPT ...); every block must have exactly two.
RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "c_proj", "down_proj", "fc2")
POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def _zero(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters(recurse=False):
            p.zero_()


def identity_blocks(small: nn.Module) -> None:
    """Zero the residual branches' output projections and the learned position table of a small base model."""
    for i, block in enumerate(block_list(small)):
        outs = [m for n, m in block.named_modules() if n.rsplit(".", 1)[-1] in RESIDUAL_OUTPUTS]
        if len(outs) != 2:
            raise UserError(f"bridge.init: large: block {i} of the small model ({type(block).__name__}) has "
                            f"{len(outs)} residual output projections named {'/'.join(RESIDUAL_OUTPUTS)}, not 2 "
                            "(attention and MLP); this small architecture is not supported by the warm start")
        _zero(*outs)
    for name in POSITION_TABLES:
        table = getattr(small, name, None)
        if isinstance(table, nn.Embedding):
            _zero(table)


def silent_bridge(bridge: nn.Module) -> None:
    """The bridge returns proj(pre_proj(s)) and pre_proj is the identity."""
    with torch.no_grad():
        bridge.pre_proj.weight.copy_(torch.eye(bridge.pre_proj.in_features))
        bridge.pre_proj.bias.zero_()
    _zero(bridge.ffn[-1])  # the FFN path's output LayerNorm: weight and bias 0 -> the path outputs 0
    for layer in bridge.layers:
        _zero(layer.cross_attn.out_proj, layer.adapter.norm)


def mean_free_basis(d: int, r: int, centred: bool, seed: int = 0) -> torch.Tensor:
    """(d, r) orthonormal columns, orthogonal to the all-ones vector when `centred` (a LayerNorm follows)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, r + centred, generator=g, dtype=torch.float64)
    if centred:
        a[:, 0] = 1.0
    q, _ = torch.linalg.qr(a)
    return q[:, int(centred):]


@torch.no_grad()
def fisher_metric(head: torch.Tensor, states: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(D_L, D_L) E_i[W^T (diag p_i - p_i p_i^T) W]: how much a change of s moves the large model's distribution
    (the Fisher information of its softmax; KL(p || p') ~ 1/2 ds^T F ds), averaged over `states`."""
    W = head.float()
    mass = torch.zeros(len(W), dtype=torch.float64)
    means = []
    for c in states.float().split(chunk):
        p = torch.softmax(c @ W.T, dim=-1)  # (n, V)
        mass += p.sum(0).double()
        means.append((p @ W).double())  # (n, D_L): E_p[w_v] per state
    mu = torch.cat(means)
    Wd = head.double()
    return ((Wd * mass[:, None]).T @ Wd - mu.T @ mu) / len(states)


def logit_subspace(metric: torch.Tensor, states: torch.Tensor, r: int, ridge: float = 1e-6) -> torch.Tensor:
    """(r, D_L) B: the rank-r read-out of s that loses the least in `metric` over `states` (N, D_L), i.e. the top r
    eigenvectors of C^1/2 F C^1/2 taken back through C^-1/2, with C = E[s s^T]."""
    s = states.double()
    c = s.T @ s / len(s)
    c += ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype)
    e, u = torch.linalg.eigh(c)
    c_half, c_inv_half = (u * e.sqrt()) @ u.T, (u / e.sqrt()) @ u.T
    _, vecs = torch.linalg.eigh(c_half @ metric @ c_half)
    return vecs[:, -r:].flip(1).T @ c_inv_half  # top r first


@torch.no_grad()
def normed_features(model, z: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """The small model's final hidden states for bridge outputs z (N, D_S), as independent short rows (the blocks
    are identities, so positions do not interact)."""
    n, d = z.shape
    chunk = min(chunk, model.position_limits["small"] or chunk)
    pad = (-n) % chunk
    rows = torch.cat([z, z.new_zeros(pad, d)]).view(-1, chunk, d).to(model.lm_head.weight.dtype)
    out = torch.cat([model.small(inputs_embeds=r[None]).last_hidden_state[0] for r in rows])
    return out[:n].double()


def stored_fisher_metric(directory: Path) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """fisher_metric, written once into `directory` (the training split's feature cache: the same large model's
    states of the same examples) and read back after: the warm-start arms of an experiment suite, each in its own
    process, compute it once (most of a fit's time, see docs/results.md). A float64 (D_L, D_L) safetensors file
    named by the head's shape and the states' content."""
    def metric(head: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        digest = hashlib.sha256(states.float().contiguous().numpy().tobytes()).hexdigest()[:16]
        path = directory / f"warm-start-fisher-{head.shape[0]}x{head.shape[1]}-{digest}.safetensors"
        if path.is_file():
            return load_file(str(path))["metric"]
        out = fisher_metric(head, states)
        save_tensors(path, {"metric": out})  # atomic: complete or absent
        return out

    return metric


@torch.no_grad()
def warm_start(model, head: torch.Tensor, states: torch.Tensor, *, ridge: float = 1e-6, constant: float = 3.0,
               fisher_tokens: int = 4096, fisher=fisher_metric) -> dict:
    """Initialize `model` (coupling stream) so that it predicts what the large model with LM head `head`
    (V_large, D_L) predicts, fitted on the large model's final states `states` (N, D_L) of the training data.
    `constant`: the size of a constant channel added to the projection (relative to the median |P s|), so the
    final norm's division by |P s| varies less from token to token. `fisher`: fisher_metric, or the same read back
    (stored_fisher_metric). Returns what was done."""
    if not isinstance(model.bridge, StreamCoupling):
        raise UserError("bridge.init: large applies to coupling: stream (the paper's bridge)")
    V = model.lm_head.out_features
    W = head[:V]  # the large model's logits over the tokens the output vocabulary has
    d_large, d_small = W.shape[1], model.lm_head.in_features
    was_training = model.training
    model.eval()
    identity_blocks(model.small)
    silent_bridge(model.bridge)
    centred = _final_norm_centres(model)
    spare = d_small - int(centred)  # dimensions the final norm leaves
    r = min(spare - 1, d_large) if constant else min(spare, d_large)
    s = states.double()
    if r == d_large:
        B = torch.eye(d_large, dtype=torch.float64)
    else:
        B = logit_subspace(fisher(W, states[:fisher_tokens]), s, r, ridge)
    basis = mean_free_basis(d_small, r + bool(constant), centred)
    # Median |P s| = sqrt(D_S): about unit size per channel, the scale the small model's blocks are built for, so
    # the branches they open while training perturb the stream by what they would in the stream of a usual model.
    scale = math.sqrt(d_small)
    P = basis[:, :r] @ B * (scale / (s @ B.T).norm(dim=1).median())  # (D_S, D_L)
    model.bridge.proj.weight.copy_(P.to(model.bridge.proj.weight.dtype))
    bias = constant * scale * basis[:, r] if constant else torch.zeros(d_small, dtype=torch.float64)
    model.bridge.proj.bias.copy_(bias.to(model.bridge.proj.bias.dtype))
    f = normed_features(model, s @ P.T + model.bridge.proj.bias.double())  # (N, D_S): what the head will read
    gram = f.T @ f + ridge * len(f) * torch.eye(d_small, dtype=torch.float64)
    M = torch.linalg.solve(gram, f.T @ s).T  # (D_L, D_S): least-squares read-out of s from f
    model.lm_head.weight.copy_((W.double() @ M).to(model.lm_head.weight.dtype))
    model.train(was_training)
    residual = float(((f @ M.T - s).norm(dim=1) / s.norm(dim=1)).mean())
    return {"rank": r, "large_width": d_large, "small_width": d_small, "states": len(s),
            "relative_readout_error": residual}


def _final_norm_centres(model) -> bool:
    """Whether the small model's final norm removes the mean (LayerNorm: adding a constant to every channel changes
    nothing) or not (RMSNorm). The blocks are identities by now, so the model is its final norm."""
    e = torch.zeros(1, 1, model.lm_head.in_features, dtype=model.lm_head.weight.dtype)
    e[..., 0] = 1.0
    a, b = (model.small(inputs_embeds=x).last_hidden_state for x in (e, e + 2.0))
    return bool(torch.allclose(a, b, atol=1e-5))


@torch.no_grad()
def training_states(model, examples, features=None, max_tokens: int = 20_000) -> torch.Tensor:
    """(N, D_L) the large model's final states at the target positions of the first training examples: from the
    feature cache (`features`, a features.SplitFeatures) when there is one, else from the live large model."""
    out, n = [], 0
    for i, ex in enumerate(examples):
        keep = torch.tensor(ex.labels[1:]) != -100  # positions that predict a target token
        if features is not None:
            states = features.get(i)
        else:
            ids = torch.tensor([ex.input_ids])
            states = model.source_states(ids, torch.ones_like(ids), torch.arange(len(ex))[None])[0]
        out.append(states[:-1][keep].float())
        n += int(keep.sum())
        if n >= max_tokens:
            break
    if n == 0:
        raise UserError("bridge.init: large fits the head on the training examples' target tokens, and there are none")
    return torch.cat(out)[:max_tokens]


def warm_start_run(model, cfg, examples, features=None, log=print) -> dict:
    """`bridge.init: large` for a training run that starts from scratch: the large head read once, the states of
    the training data (cache or live model), the fit; logs what it did and how long it took."""
    import time

    from .distill import load_teacher_head

    t0 = time.perf_counter()
    head = load_teacher_head(cfg)
    states = training_states(model, examples, features)
    fisher = stored_fisher_metric(features.directory) if features is not None else fisher_metric
    report = warm_start(model, head, states, fisher=fisher)
    report["seconds"] = time.perf_counter() - t0
    log(f"bridge.init: large: kept {report['rank']} of the large model's {report['large_width']} state dimensions, "
        f"head fitted on {report['states']:,} training tokens (read-out error {report['relative_readout_error']:.3f}) "
        f"in {report['seconds']:.1f} s")
    return report
