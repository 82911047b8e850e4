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
    def __call__(self, x, rope, key_rope, mask, start, cache):
        cfg = self.cfg
        h = RMSNorm(cfg, cfg.d_model, cfg.norm_eps, cfg.norm_weight, name="attn_norm")(x)
        a, cache = attention_class(cfg)(cfg, name="attn")(h, rope, mask, cache=cache, key_rope=key_rope, start=start)
        x = x + a.astype(x.dtype)
        h = RMSNorm(cfg, cfg.d_model, cfg.norm_eps, cfg.norm_weight, name="mlp_norm")(x)
        x = x + SwiGLU(cfg, name="mlp")(h).astype(x.dtype)
        return x, cache


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
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.n_layer,
            unroll=1 if cfg.scan_layers else cfg.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="blocks")
        self.final_norm = RMSNorm(self.cfg, cfg.d_model, cfg.norm_eps, cfg.norm_weight)

    def __call__(self, tokens, positions=None, cache=None, valid_lengths=None):
        """Full causal forward, or with ``cache`` (see ``tpa_jax.inference.init_cache``) a prefill
        (T tokens) or decode (1 token) step returning ``(logits, cache)``; positions come from
        the cache.  ``valid_lengths`` [B] marks right-padded prompts of different lengths."""
        cfg = self.cfg
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected int array [batch, seq], got shape {tokens.shape}")
        t = tokens.shape[1]
        x = self.embed(tokens)
        if cache is None:
            if positions is None:
                positions = jnp.arange(t, dtype=jnp.int32)[None, :]
            rope = rope_tables(positions, cfg.rope_dim, cfg.rope_theta, cfg.rope_bf16_tables)
            x, _ = self.blocks(x, rope, None, causal_mask(positions, positions), None, None)
            return self.embed.attend(self.final_norm(x))
        lengths = cache["lengths"]
        max_len = jax.tree_util.tree_leaves(cache["layers"])[0].shape[2]
        if t > max_len:
            raise ValueError(f"tokens: {t} new tokens exceed the cache capacity max_len={max_len}")
        positions = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        key_positions = jnp.arange(max_len, dtype=jnp.int32)[None, :]
        rope = rope_tables(positions, cfg.rope_dim, cfg.rope_theta, cfg.rope_bf16_tables)
        key_rope = rope_tables(key_positions, cfg.rope_dim, cfg.rope_theta, cfg.rope_bf16_tables)
        x, layers = self.blocks(x, rope, key_rope, causal_mask(positions, key_positions), lengths, cache["layers"])
        new_len = lengths + (t if valid_lengths is None else jnp.asarray(valid_lengths, jnp.int32))
        return self.embed.attend(self.final_norm(x)), {"lengths": new_len, "layers": layers}


def cross_entropy(logits, targets, ignore_index: int = -1):
    """Mean next-token cross-entropy over targets != ignore_index (float32), as F.cross_entropy."""
    logits = logits.astype(jnp.float32)
    valid = targets != ignore_index
    safe = jnp.where(valid, targets, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, logz - picked, 0.0)
    return nll.sum() / jnp.maximum(valid.sum(), 1)
