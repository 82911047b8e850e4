"""Inference: factorised decode caches (and, in this package, FlashTPA and generation)."""
from .cache import cache_bytes_per_token, cache_layout, cache_logical_axes, init_cache

__all__ = ["init_cache", "cache_layout", "cache_logical_axes", "cache_bytes_per_token"]
