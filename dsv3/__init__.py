"""dsv3: DeepSeek-V3 in PyTorch (dsv3_torch) and Flax NNX (dsv3_jax).

This framework-free core imports neither torch nor jax.
"""

from dsv3.config import PRESETS, ModelConfig
from dsv3.types import LossOutput

__all__ = ["ModelConfig", "PRESETS", "LossOutput"]
__version__ = "0.1.0"
