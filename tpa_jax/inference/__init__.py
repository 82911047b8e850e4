"""Inference: the decode caches (TPA's factorised caches and the baselines' K/V or latent caches,
with their layouts, bytes per token and shardings), batched generation from them (one cached
prefill, then a jitted one-token decode loop with greedy or top-k / top-p sampling), the paged
cache and the continuous-batching ``Engine`` that serves requests from it."""
from .cache import (cache_bytes_per_token, cache_layout, cache_logical_axes, cache_shardings, decode_compiler_options,
                    init_cache)
from .engine import Engine
from .generate import Generation, count_compiles, generate
from .paged import init_pool, page_bytes

__all__ = ["init_cache", "cache_layout", "cache_logical_axes", "cache_shardings", "cache_bytes_per_token", "generate",
           "Generation", "count_compiles", "decode_compiler_options", "Engine", "init_pool", "page_bytes"]
