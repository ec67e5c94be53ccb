"""Plain-PyTorch DeepSeek-V3 / V3.2 / V4: the definition of correct for every backend of this toolkit."""

from .cache import KVCache
from .config import ModelConfig
from .model import Model
from .v4_config import V4Config
from .v4_model import V4Model

Model.v4_class = V4Model

__all__ = ["KVCache", "Model", "ModelConfig", "V4Config", "V4Model"]
