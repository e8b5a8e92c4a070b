"""Tiny random model configs shared by the tests (inline HF configs: no download, no tokenizer)."""
from llm_modules import LLMModulesConfig

LARGE = {
    "qwen2": {"model_type": "qwen2", "vocab_size": 96, "hidden_size": 48, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "llama": {"model_type": "llama", "vocab_size": 96, "hidden_size": 48, "intermediate_size": 96,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "gpt_neo": {"model_type": "gpt_neo", "vocab_size": 96, "bos_token_id": 0, "eos_token_id": 0, "hidden_size": 48,
                "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 4,
                "max_position_embeddings": 64},
    "gemma3_text": {"model_type": "gemma3_text", "vocab_size": 96, "hidden_size": 48, "intermediate_size": 96,
                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 12,
                    "sliding_window": 4},
}
SMALL = {
    "gpt_neo": {"model_type": "gpt_neo", "vocab_size": 8, "bos_token_id": 0, "eos_token_id": 0, "hidden_size": 32,
                "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]], "window_size": 4,
                "max_position_embeddings": 64},
    "gpt2": {"model_type": "gpt2", "vocab_size": 8, "bos_token_id": 0, "eos_token_id": 0, "n_embd": 32, "n_layer": 2,
             "n_head": 4, "n_positions": 64},
    "qwen2": {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    "llama": {"model_type": "llama", "vocab_size": 8, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
}
PAIRS = [("qwen2", "gpt_neo"), ("llama", "gpt2"), ("gpt_neo", "qwen2"), ("gemma3_text", "llama")]


def tiny_config(large="qwen2", small="gpt_neo", **bridge) -> LLMModulesConfig:
    bridge = {"num_heads": 4, "adapter_dim": 8, "dropout": 0.0, **bridge}
    return LLMModulesConfig.from_dict({"large": {"config": LARGE[large]}, "small": {"config": SMALL[small]},
                                       "bridge": bridge})
