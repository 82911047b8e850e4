"""tpa-jax: Tensor Product Attention (TPA) and the T6 model in JAX/Flax."""
from . import configs
from .config import ModelConfig
from .model import Transformer, cross_entropy

__all__ = ["ModelConfig", "Transformer", "configs", "cross_entropy"]
