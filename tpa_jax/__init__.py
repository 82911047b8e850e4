"""tpa-jax: Tensor Product Attention (TPA) and the T6 model in JAX/Flax."""
from . import accounting, configs, inference, interop, parallel
from .config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from .inference import generate
from .model import Transformer, cross_entropy
from .run import Run, load

__all__ = ["ModelConfig", "TrainConfig", "DataConfig", "OptimConfig", "MeshConfig", "Transformer", "configs",
           "accounting", "interop", "parallel", "inference", "cross_entropy", "generate", "load", "Run"]
