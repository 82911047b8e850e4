"""tpa-jax: Tensor Product Attention (TPA) and the T6 model in JAX/Flax.

The public API: configs, the model and its entry point, accounting, sharding, decode caches and
generation are imported eagerly; ``load`` / ``Run`` (which need Orbax) and the training, data and
evaluation packages are imported on first use, so ``import tpa_jax`` pulls in no optax, orbax,
grain or tensorboard.
"""
import importlib as _importlib

from . import accounting, configs, inference, interop, model, parallel
from .config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from .inference import generate
from .model import Transformer, cross_entropy, init_params, logits_fn, loss_fn

_LAZY = {"load": ("run", "load"), "Run": ("run", "Run")}
_LAZY_MODULES = ("run", "data", "train", "eval", "compare")

__all__ = ["ModelConfig", "TrainConfig", "DataConfig", "OptimConfig", "MeshConfig", "Transformer", "configs",
           "accounting", "interop", "parallel", "inference", "model", "cross_entropy", "logits_fn", "loss_fn",
           "init_params", "generate", "load", "Run"]


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(_importlib.import_module(f".{module}", __name__), attr)
    if name in _LAZY_MODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tpa_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))
