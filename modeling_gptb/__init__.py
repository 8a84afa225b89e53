"""GPTB: GPT-2 made recurrent, with an Adaptive Resonance Theory memory, for the HuggingFace ecosystem.

Importing the package registers GPTB with transformers' Auto classes, and marks the classes so `save_pretrained`
writes `auto_map` and copies the code files (loadable with `trust_remote_code=True` where this package is absent).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .art_memory import ARTMemory
from .configuration_gptb import GPTBConfig
from .modeling_gptb import GPTBCache, GPTBLMHeadModel, GPTBModel, GPTBPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(GPTBConfig.model_type, GPTBConfig, exist_ok=True)
AutoModel.register(GPTBConfig, GPTBModel, exist_ok=True)
AutoModelForCausalLM.register(GPTBConfig, GPTBLMHeadModel, exist_ok=True)
GPTBConfig.register_for_auto_class()
GPTBModel.register_for_auto_class("AutoModel")
GPTBLMHeadModel.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "ARTMemory",
    "GPTBCache",
    "GPTBConfig",
    "GPTBLMHeadModel",
    "GPTBModel",
    "GPTBPreTrainedModel",
    "__version__",
]
