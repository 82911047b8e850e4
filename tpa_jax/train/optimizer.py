"""The optimizer: AdamW with a linear-warmup + cosine-decay learning rate, decoupled weight decay
on weights that are at least 2-D per layer (not on norm scales), and global-norm gradient clipping."""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ..config import OptimConfig


def lr_schedule(o: OptimConfig, total_steps: int) -> Callable[[Any], jax.Array]:
    """Linear warmup from lr/(warmup+1) to lr (nanoGPT: the first update is not a no-op), then cosine
    decay to min_lr at ``total_steps``."""
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    decay = max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = o.lr * (step + 1.0) / (warmup + 1.0)
        progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
        cosine = o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + jnp.cos(math.pi * progress))
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params: Any) -> Any:
    """True for weights that are >= 2-D per layer (layer-stacked leaves under 'blocks' lose one dim)."""

    def is_matrix(path, x):
        stacked = any(getattr(k, "key", None) == "blocks" for k in path)
        return x.ndim - (1 if stacked else 0) >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(o: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Clipping (when ``o.grad_clip > 0``) then AdamW with ``lr_schedule`` and ``decay_mask``."""
    parts = []
    if o.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    parts.append(optax.adamw(lr_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
