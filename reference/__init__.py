"""Plain-PyTorch DeepSeek-V3 / V3.2: the definition of correct for every backend of this toolkit."""

from .cache import KVCache
from .config import ModelConfig
from .model import Model

__all__ = ["KVCache", "Model", "ModelConfig"]
