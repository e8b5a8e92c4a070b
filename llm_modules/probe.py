"""How much of the large model's next-token prediction survives the bridge, layer by layer.

For each representation inside the bridge (the pre-projection, the 1536->768-style projection, the intermediate
FFN, the output of every Enhanced Cross-Attention layer, the bridge output) a linear read-out is fitted by ridge
regression on training tokens to map it back onto the large model's final hidden state; the large model's own LM
head then turns the read-out into a distribution. On held-out tokens we report top-1 agreement with the large
model's own prediction and KL(large || read-out). The source states themselves give 100% / 0 (a sanity row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bridge import Bridge, cross_attention_mask


@torch.no_grad()
def bridge_representations(bridge: Bridge, source: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bridge.forward on one unpadded sequence (1, T, D_L), keeping every intermediate (T, D) representation."""
    out = {"source": source[0]}
    pre = bridge.pre_proj(source)
    out["pre_proj"] = pre[0]
    projected = bridge.proj(pre)
    out["proj"] = projected[0]
    x = bridge.ffn(pre)
    out["ffn"] = x[0]
    mask = cross_attention_mask(torch.ones(1, source.shape[1], dtype=torch.long), source.shape[1])[:, None]
    for i, layer in enumerate(bridge.layers):
        k, v = layer.cross_attn.keys_values(pre)
        y = layer(x, k, v, mask)
        x = x + y if bridge.residual == "paper" else y
        out[f"cross_attn_{i + 1}"] = x[0]
    out["bridge_output"] = (x + projected)[0]
    return out


def _collect(bridge, split_features, examples, max_tokens: int) -> dict[str, torch.Tensor]:
    reps: dict[str, list[torch.Tensor]] = {}
    n = 0
    for i, ex in enumerate(examples):
        keep = torch.tensor([lab != -100 for lab in ex.labels[1:]] + [False])  # positions predicting a target
        states = split_features.get(i).float()[None]  # (1, T, D_L)
        for name, r in bridge_representations(bridge, states).items():
            reps.setdefault(name, []).append(r[keep])
        n += int(keep.sum())
        if n >= max_tokens:
            break
    return {k: torch.cat(v)[:max_tokens] for k, v in reps.items()}


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    x1 = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    gram = x1.T @ x1 + lam * len(x) * torch.eye(x1.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x1.T @ y.double()).float()  # (D_r + 1, D_L)


@torch.no_grad()
def probe(bridge: Bridge, features: dict, data, head: torch.Tensor, *, train_tokens: int = 8000,
          val_tokens: int = 2000, ridge: float = 1e-4) -> list[dict]:
    """One row per bridge representation: top-1 agreement and KL(large || read-out) on held-out tokens."""
    bridge = bridge.float().eval()
    fit = _collect(bridge, features["train"], data.train, train_tokens)
    test = _collect(bridge, features["val"], data.val, val_tokens)
    V = head.shape[0]
    teacher = F.log_softmax(test["source"] @ head.T, dim=-1)  # (N, V)
    rows = []
    for name in fit:
        W = _ridge(fit[name], fit["source"], ridge)
        readout = torch.cat([test[name], torch.ones(len(test[name]), 1)], dim=1) @ W  # (N, D_L)
        logp = F.log_softmax(readout @ head.T, dim=-1)
        rows.append({"representation": name, "width": fit[name].shape[1], "tokens": len(readout),
                     "top1_agreement": float((logp.argmax(-1) == teacher.argmax(-1)).float().mean()),
                     "kl_large_to_readout": float(F.kl_div(logp, teacher, log_target=True, reduction="sum")
                                                  / len(readout)),
                     "vocab": V})
    return rows
