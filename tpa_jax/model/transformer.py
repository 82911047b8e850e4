"""T6 / LLaMA-style decoder: tied embedding, L pre-norm blocks (RMSNorm, attention, RMSNorm,
SwiGLU), final RMSNorm, float32 logits.  T6 is this model with ``attention="tpa"``.

Layers run through ``nn.scan`` (parameters stacked on a leading ``layers`` axis); with
``scan_layers=False`` the same stack is fully unrolled, so both settings share one parameter tree.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import ModelConfig
from .attention import attention_class, causal_mask
from .layers import Embedding, RMSNorm, SwiGLU
from .rope import rope_tables

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, rope, mask):
        cfg = self.cfg
        h = RMSNorm(cfg, cfg.d_model, cfg.norm_eps, cfg.norm_weight, name="attn_norm")(x)
        x = x + attention_class(cfg)(cfg, name="attn")(h, rope, mask).astype(x.dtype)
        h = RMSNorm(cfg, cfg.d_model, cfg.norm_eps, cfg.norm_weight, name="mlp_norm")(x)
        x = x + SwiGLU(cfg, name="mlp")(h).astype(x.dtype)
        return x, None


class Transformer(nn.Module):
    """tokens int32 [B, T] -> logits float32 [B, T, vocab]."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = Embedding(cfg)
        block = Block
        if cfg.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        self.blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.n_layer,
            unroll=1 if cfg.scan_layers else cfg.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="blocks")
        self.final_norm = RMSNorm(self.cfg, cfg.d_model, cfg.norm_eps, cfg.norm_weight)

    def __call__(self, tokens, positions=None):
        cfg = self.cfg
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected int array [batch, seq], got shape {tokens.shape}")
        t = tokens.shape[1]
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)[None, :]
        rope = rope_tables(positions, cfg.rope_dim, cfg.rope_theta, cfg.rope_bf16_tables)
        mask = causal_mask(positions, positions)
        x = self.embed(tokens)
        x, _ = self.blocks(x, rope, mask)
        return self.embed.attend(self.final_norm(x))


def cross_entropy(logits, targets, ignore_index: int = -1):
    """Mean next-token cross-entropy over targets != ignore_index (float32), as F.cross_entropy."""
    logits = logits.astype(jnp.float32)
    valid = targets != ignore_index
    safe = jnp.where(valid, targets, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, logz - picked, 0.0)
    return nll.sum() / jnp.maximum(valid.sum(), 1)
