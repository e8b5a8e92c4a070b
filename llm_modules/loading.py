"""Loading a trained model to evaluate, generate with or serve: an LLMModules checkpoint, its large model alone, or
a fine-tuned baseline (finetune.py). The CLI, the lm-eval model, the benchmarks and the server all load through here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .errors import UserError


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A save_pretrained directory, or a training output directory (its best, else latest, checkpoint)."""
    from .checkpoint import CONFIG_NAME, latest_training_checkpoint

    d = Path(path)
    if (d / CONFIG_NAME).is_file():
        return d
    if (d / "best" / CONFIG_NAME).is_file():
        return d / "best"
    latest = latest_training_checkpoint(d / "checkpoints")
    if latest is not None:
        return latest
    raise UserError(f"--checkpoint {path}: no checkpoint there (expected {CONFIG_NAME}, best/ or checkpoints/)")


def load_for_generation(checkpoint: Union[str, Path]):
    """An LLMModules checkpoint to generate with in this process only, prepared for CPU decoding (row_split.py)."""
    from .model import LLMModules
    from .row_split import prepare_for_cpu_decoding

    model = prepare_for_cpu_decoding(LLMModules.from_pretrained(resolve_checkpoint(checkpoint)))
    if model.tokenizer is None:
        raise UserError(f"{checkpoint}: this model has no tokenizer, so it cannot read text prompts")
    return model


def load_for_eval(checkpoint: Union[str, Path], large_only: bool = False):
    """(model, tokenizer, LLMModulesConfig, context length) of a checkpoint: an LLMModules model, a fine-tuned
    baseline (a Hugging Face causal LM), or with `large_only` the checkpoint's large model alone with its own LM head
    (`checkpoint` may then also be a config YAML). The context length is the smallest learned position table, else
    the large model's max_position_embeddings (large alone), else data.max_length."""
    from .backbones import load_model_tokenizer
    from .checkpoint import CONFIG_NAME
    from .config import LLMModulesConfig
    from .finetune import is_finetuned, load_finetuned
    from .model import LLMModules
    from .row_split import prepare_for_cpu_decoding

    path = Path(checkpoint)
    if not large_only and is_finetuned(path):
        return load_finetuned(path)
    if not large_only:  # evaluated only: prepared for CPU decoding (row_split.py)
        model = prepare_for_cpu_decoding(LLMModules.from_pretrained(resolve_checkpoint(path)))
        limits = [n for n in model.position_limits.values() if n is not None]
        return model, model.tokenizer, model.config, min(limits) if limits else model.config.data.max_length
    from .backbones import load_causal_lm

    cfg = LLMModulesConfig.from_yaml(path if path.is_file() else resolve_checkpoint(path) / CONFIG_NAME)
    model = load_causal_lm(cfg.large, "large")  # an inline large model: the same seeded random one as training's
    c = model.config
    limit = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or cfg.data.max_length
    return model, load_model_tokenizer(cfg), cfg, limit
