"""llm-modules: a small causal LM that generates with the knowledge of a large frozen one (Kolomeitsev, 2025),
built leak-free and cached."""
from .config import BridgeConfig, DataConfig, LargeConfig, LLMModulesConfig, SmallConfig, TrainConfig
from .errors import UserError
from .model import LLMModules, LLMModulesOutput

__all__ = [
    "BridgeConfig",
    "DataConfig",
    "LargeConfig",
    "LLMModules",
    "LLMModulesConfig",
    "LLMModulesOutput",
    "SmallConfig",
    "TrainConfig",
    "UserError",
]
__version__ = "0.1.0"
