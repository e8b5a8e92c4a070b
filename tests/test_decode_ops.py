"""Masks are built once per decode step, not once per layer (issue 49 item 4; benchmarks/decode_ops.py counts a
step's operators)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llm_modules import LLMModules, LLMModulesConfig
from llm_modules.gpt_neo_sdpa import use_sdpa


# Operators that build or convert masks (SDPA turns a boolean mask into an additive one with where + scalar_tensor).
MASK_OPS = {"zeros", "full", "masked_fill", "masked_fill_", "bitwise_not", "bitwise_and", "clamp", "where",
            "scalar_tensor", "le", "arange", "new_ones", "index"}


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in MASK_OPS
        return func(*args, **(kwargs or {}))


def build(layers: int, small_attn: str):
    model = LLMModules.from_config(LLMModulesConfig.from_dict({
        "large": {"config": {"model_type": "qwen2", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2}},
        "small": {"config": {"model_type": "gpt_neo", "vocab_size": 96, "bos_token_id": 0, "eos_token_id": 0,
                             "hidden_size": 32, "num_layers": layers,
                             "num_heads": 4, "attention_types": [[["global", "local"], layers // 2]],
                             "window_size": 4, "max_position_embeddings": 64}},
        "bridge": {"num_heads": 4, "adapter_dim": 8, "dropout": 0.0}})).eval()
    if small_attn == "sdpa":
        use_sdpa(model.small)
    return model


def step_ops(model, padded: bool) -> int:
    ids = torch.randint(1, 95, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5], mask[2, :3] = 0, 0
    with torch.no_grad():
        cache = model.new_cache()
        token = model(ids, mask, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1)[:, None]
        with Ops() as ops:
            model(token, torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), cache=cache, logits_to_keep=1)
    return ops.count


def test_a_padded_step_builds_its_masks_once_at_any_depth():
    """Qwen2 large model and GPT-Neo small model under SDPA, a left-padded batch: as many mask operators in a decode
    step with 2 layers each as with 6 (the large model gets an additive mask made once, not converted by each layer's
    SDPA; the small model's layers share one mask per kind of layer)."""
    counts = [step_ops(build(layers, "sdpa"), padded=True) for layers in (2, 6)]
    assert counts[0] == counts[1] > 0
