"""MLX runtime of DeepSeek-V3 / V3.2: the model in ``mlx.nn`` (same API and checkpoint directory as `reference`),
hot ops through `runtime_mlx.kernels` (Metal kernels on Apple Silicon, pure MLX elsewhere), and the MLX
trainer that ``dsfs train --backend mlx`` drives (`runtime_mlx.train`)."""

from reference.config import ModelConfig

from .cache import KVCache
from .model import Model
from .v4_model import V4Model

__all__ = ["KVCache", "Model", "ModelConfig", "V4Model"]
