"""Attention mechanisms behind one interface: ``Module(cfg)(x_BTM, rope=(cos, sin), mask_BTS)``."""
from ...config import ModelConfig
from .core import attend, causal_mask
from .mla import MLAttention
from .standard import StandardAttention
from .tpa import TPAttention


def attention_class(cfg: ModelConfig):
    if cfg.attention in ("tpa", "tpa_kvonly"):
        return TPAttention
    if cfg.attention == "mla":
        return MLAttention
    return StandardAttention


__all__ = ["attend", "causal_mask", "attention_class", "TPAttention", "StandardAttention", "MLAttention"]
