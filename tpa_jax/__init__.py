"""tpa-jax: Tensor Product Attention (TPA) and the T6 model in JAX/Flax."""
from . import accounting, configs, interop, parallel
from .config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from .model import Transformer, cross_entropy

__all__ = ["ModelConfig", "TrainConfig", "DataConfig", "OptimConfig", "MeshConfig", "Transformer", "configs",
           "accounting", "interop", "parallel", "cross_entropy"]
