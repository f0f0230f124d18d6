"""zoo: an alternative-architecture model zoo for efficient LLM inference research.

    import zoo
    model = zoo.ZooForCausalLM(zoo.load_config("attention-tiny"))

Importing zoo registers the "zoo" model type with transformers' AutoConfig and
AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from zoo.cache import ZooCache
from zoo.config import ConfigError, ZooConfig, load_config, shipped_configs
from zoo.model import ZooCausalLMOutput, ZooForCausalLM, ZooModel

__version__ = "0.1.0"

AutoConfig.register("zoo", ZooConfig, exist_ok=True)
AutoModelForCausalLM.register(ZooConfig, ZooForCausalLM, exist_ok=True)

__all__ = [
    "ConfigError", "ZooCache", "ZooCausalLMOutput", "ZooConfig", "ZooForCausalLM", "ZooModel",
    "load_config", "shipped_configs",
]

from zoo.hf_import import from_hf  # noqa: E402

__all__ += ["from_hf"]
