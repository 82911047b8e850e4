"""The paged decode cache: one pool of fixed-size pages per layer that many sequences share, a page
table per sequence, and the host-side allocator that hands pages out and takes them back.

    pool = init_pool(cfg, num_pages, page_size, dtype)   # {"layers": {name: [L, N, page_size, ...]}}
    cache = {"lengths": [B], "layers": pool["layers"], "page_table": int32 [B, J]}
    logits, cache = logits_fn(cfg)(params, tokens, cache=cache)   # prefill a chunk, or decode one token

Row ``s`` of sequence ``b`` sits at offset ``s % page_size`` of page ``page_table[b, s // page_size]``;
a sequence holds at most ``J * page_size`` rows.  Table entries of pages a sequence does not hold are
:data:`NO_PAGE` (``num_pages``, one past the pool): writes there are dropped and reads clamp to a
real page, whose rows lie past the sequence's length and are masked.  The leaves and their
per-token shapes are those of ``init_cache`` (``cache_layout``), int8 scales included, so the
pool holds ``num_pages * page_size`` tokens whatever the batch or the longest sequence.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..model.attention.quant import cache_dtype, leaf_dtype
from .cache import cache_layout

__all__ = ["init_pool", "page_bytes", "pages_for", "PageAllocator", "empty_page_table", "max_concurrent"]


def pages_for(n_tokens: int, page_size: int) -> int:
    """Pages that hold ``n_tokens`` rows."""
    return -(-int(n_tokens) // int(page_size))


def page_bytes(cfg: ModelConfig, page_size: int, dtype: Any = None) -> int:
    """Bytes of one page over all layers (int8: scales included), from the cache layout."""
    d = cache_dtype(dtype or cfg.compute_dtype)
    per_token = sum(math.prod(leaf.shape) * leaf_dtype(name, d).itemsize
                    for name, leaf in cache_layout(cfg, d).items())
    return cfg.n_layer * page_size * per_token


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any = None) -> dict[str, Any]:
    """A zeroed page pool ``{"layers": {name: [L, num_pages, page_size, *per-token shape]}}``."""
    d = cache_dtype(dtype or cfg.compute_dtype)
    return {"layers": {name: jnp.zeros((cfg.n_layer, num_pages, page_size) + leaf.shape, leaf_dtype(name, d))
                       for name, leaf in cache_layout(cfg, d).items()}}


def empty_page_table(rows: int, pages_per_seq: int, num_pages: int) -> np.ndarray:
    """A page table [rows, pages_per_seq] holding no page (every entry ``num_pages``)."""
    return np.full((rows, pages_per_seq), num_pages, np.int32)


class PageAllocator:
    """Free pages of a pool of ``num_pages``, with reservations: a sequence reserves the pages it may
    ever need when it is admitted and then takes them one by one as it grows, so growing never
    fails and no running sequence is ever evicted.  Everything here is host-side bookkeeping."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = int(num_pages)
        self._free = deque(range(self.num_pages))
        self._reserved = 0  # reserved pages not yet taken

    @property
    def free(self) -> int:
        """Pages neither in use nor reserved."""
        return len(self._free) - self._reserved

    @property
    def in_use(self) -> int:
        return self.num_pages - len(self._free)

    def can_reserve(self, n: int) -> bool:
        return n <= self.free

    def reserve(self, n: int) -> None:
        if not self.can_reserve(n):
            raise ValueError(f"cannot reserve {n} pages: {self.free} of {self.num_pages} are free")
        self._reserved += n

    def take(self) -> int:
        """One reserved page (the caller holds a reservation)."""
        if self._reserved < 1:
            raise RuntimeError("page taken without a reservation")
        self._reserved -= 1
        return self._free.popleft()

    def release(self, pages: list[int], unused_reservation: int = 0) -> None:
        """Give back a finished sequence's pages and what it reserved but never took."""
        if unused_reservation > self._reserved:
            raise RuntimeError("released more reserved pages than are reserved")
        self._reserved -= unused_reservation
        self._free.extend(pages)

    def __repr__(self) -> str:
        return f"PageAllocator(num_pages={self.num_pages}, in_use={self.in_use}, reserved={self._reserved})"


def max_concurrent(budget_bytes: int, cfg: ModelConfig, page_size: int, dtype: Any,
                   request_tokens: list[int], max_batch: Optional[int] = None) -> int:
    """How many requests run at once in a pool that fits ``budget_bytes``, admitted first come first
    served as the engine admits them: ``request_tokens`` are the cache rows each reserves pages for
    (the engine's: prompt + max_new_tokens - 1, since the last new token is never written back)."""
    num_pages = budget_bytes // page_bytes(cfg, page_size, dtype)
    need = [pages_for(n, page_size) for n in request_tokens]
    held = n = 0
    for p in need:
        if held + p > num_pages or (max_batch is not None and n >= max_batch):
            break
        held, n = held + p, n + 1
    return n
