"""Frozen configuration dataclasses with one-line validation errors: the model (``model``) and the
training run (``run``: data, optimiser, mesh).  A leaf of the package: nothing here imports the
rest of ``tpa_jax``."""
from .model import (ATTENTION_IMPLS, ATTENTIONS, CONTEXT_IMPLS, CONTEXT_LAYOUTS, DECODE_IMPLS, DTYPES, FACTOR_INITS,
                    FLOAT32_EPS, HEAD_FACTOR_ACTIVATIONS, REMAT_POLICIES, ModelConfig)
from .run import DataConfig, MeshConfig, OptimConfig, TrainConfig

__all__ = ["ModelConfig", "DataConfig", "OptimConfig", "MeshConfig", "TrainConfig", "ATTENTIONS", "DTYPES",
           "HEAD_FACTOR_ACTIVATIONS", "REMAT_POLICIES", "FACTOR_INITS", "DECODE_IMPLS", "ATTENTION_IMPLS",
           "CONTEXT_IMPLS", "CONTEXT_LAYOUTS", "FLOAT32_EPS"]
