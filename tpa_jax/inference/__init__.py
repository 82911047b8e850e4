"""Inference: factorised decode caches, FlashTPA decoding and batched generation."""
from .cache import cache_bytes_per_token, cache_layout, cache_logical_axes, cache_shardings, init_cache
from .generate import Generation, generate

__all__ = ["init_cache", "cache_layout", "cache_logical_axes", "cache_shardings", "cache_bytes_per_token", "generate", "Generation"]
