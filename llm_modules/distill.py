"""The distillation baseline: the small model alone trained on the large model's next-token distributions.

Loss per target token: (1 - w) * CE(label) + w * T^2 * KL(p_teacher,T || p_student,T), forward KL over the shared
vocabulary (the student predicts the large tokenizer's vocabulary, so no alignment is needed); w constant, or
moving linearly to another value after a given step (`Distill.weight_at`). The teacher's logits are its own LM
head over its final hidden states; those states come from the frozen-feature cache (the same one the combined model
trains from), so the teacher's 0.5B-1.5B body never runs during training. Only its head matrix is loaded, read
straight from the checkpoint file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open

from .errors import UserError


def load_teacher_head(cfg) -> torch.Tensor:
    """(V_large, D_L) weight of the large model's own LM head (its tied embeddings when the head is tied)."""
    from .backbones import load_causal_lm, resolve_path

    if cfg.large.layer != -1:
        raise UserError("train.distill_weight needs large.layer: -1 (the teacher's head reads its last hidden state)")
    if cfg.large.name_or_path is None:  # an inline random large model: rebuilt (tiny), the same one training sees
        return load_causal_lm(cfg.large, "large").get_output_embeddings().weight.detach().float()
    # A named model: only the head matrix is read from its files, not the whole 0.5B-1.5B model.
    d = Path(resolve_path(cfg.large))
    files = sorted(d.glob("*.safetensors")) if d.is_dir() else []
    for name in ("lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight"):
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                if name in h.keys():
                    return h.get_tensor(name).float()
    raise UserError(f"large.name_or_path {cfg.large.name_or_path}: no LM head weights found in safetensors files "
                    "(distillation reads the teacher's head from a local checkpoint directory)")


@dataclass
class Distill:
    """The distillation objective over a batch: (1 - weight) * CE + weight * T^2 * KL(teacher || student), summed
    over target tokens; the teacher's logits are its own head over the cached states of the whole sequence."""

    head: torch.Tensor  # (V_large, D_L)
    weight: float
    temperature: float
    weight_end: Optional[float] = None  # None: `weight` at every step
    decay_from: int = 0  # the weight moves from `weight` (at this step) to `weight_end` (at max_steps), linearly
    max_steps: int = 0

    def weight_at(self, step: int) -> float:
        """The KL weight of the optimizer step that follows `step` steps done."""
        if self.weight_end is None or step <= self.decay_from:
            return self.weight
        frac = min(1.0, (step - self.decay_from) / max(1, self.max_steps - self.decay_from))
        return self.weight + (self.weight_end - self.weight) * frac

    def __call__(self, out, states: torch.Tensor, labels: torch.Tensor, step: int = 0) -> torch.Tensor:
        w = self.weight_at(step)
        kd = kd_loss_sum(out.target_logits, target_states(states, labels), self.head, self.temperature)
        return (1 - w) * out.loss_sum + w * kd


def kd_loss_sum(student_logits: torch.Tensor, teacher_states: torch.Tensor, head: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Summed T^2 * KL(teacher || student) over N positions: student_logits (N, V), teacher_states (N, D_L)."""
    V = student_logits.shape[-1]
    with torch.no_grad():
        teacher = (teacher_states.float() @ head[:V].T) / temperature  # (N, V): tokens the tokenizer can emit
        p_t = F.log_softmax(teacher, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, p_t, log_target=True, reduction="sum") * temperature**2


def target_states(states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (N, D) at the positions where a (shifted) label is taken, matching target_logits' order."""
    keep = labels[:, 1:] != -100
    return states[:, :-1][keep]
