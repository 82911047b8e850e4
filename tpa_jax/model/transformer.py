"""T6 / LLaMA-style decoder and the one model entry point every consumer uses.

The model: tied embedding, L pre-norm blocks (RMSNorm, attention, RMSNorm, SwiGLU), final RMSNorm,
float32 logits.  T6 is this model with ``attention="tpa"``.  Layers run through ``nn.scan``
(parameters stacked on a leading ``layers`` axis); with ``scan_layers=False`` the same stack is
fully unrolled, so both settings share one parameter tree.

The entry point, pure functions of a (hashable, frozen) ``ModelConfig``, each built once per config:

    params = init_params(cfg, jax.random.key(0), mesh=None)   # unboxed; sharded when given a mesh
    logits = logits_fn(cfg)(params, tokens)                    # [B, T] -> float32 [B, T, V]
    logits, cache = logits_fn(cfg)(params, tokens, cache=cache)   # cached prefill / decode
    loss = loss_fn(cfg)(params, inputs, targets)               # mean next-token cross-entropy
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import parallel
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


# ---------------------------------------------------------------------------------- entry point
@functools.lru_cache(maxsize=None)
def model_of(cfg: ModelConfig) -> Transformer:
    """The one ``Transformer`` of ``cfg`` (modules are stateless; one per config suffices)."""
    return Transformer(cfg)


@functools.lru_cache(maxsize=None)
def logits_fn(cfg: ModelConfig) -> Callable[..., Any]:
    """``(params, tokens, *, positions=None, cache=None, valid_lengths=None)`` -> logits, or
    ``(logits, cache)`` when a cache is given.  The same function object for equal configs, so
    ``jax.jit`` of it compiles once."""
    model = model_of(cfg)

    def logits(params, tokens: jax.Array, *, positions: Optional[jax.Array] = None, cache: Any = None,
               valid_lengths: Optional[jax.Array] = None):
        return model.apply({"params": params}, tokens, positions=positions, cache=cache,
                           valid_lengths=valid_lengths)

    return logits


@functools.lru_cache(maxsize=None)
def loss_fn(cfg: ModelConfig) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``(params, inputs [B, T], targets [B, T]) -> float32`` mean cross-entropy over targets != -1."""
    logits = logits_fn(cfg)

    def loss(params, inputs: jax.Array, targets: jax.Array) -> jax.Array:
        return cross_entropy(logits(params, inputs), targets)

    return loss


def _example_tokens(cfg: ModelConfig) -> jax.Array:
    return jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)


def init_params(cfg: ModelConfig, rng: jax.Array, mesh: Optional[jax.sharding.Mesh] = None) -> Any:
    """Freshly initialised, unboxed parameters: on the default device, or created directly sharded
    over ``mesh`` by their logical axes (no host copy).  Shapes do not depend on the sequence
    length, so one example length serves every use."""
    model = model_of(cfg)
    if mesh is not None:
        return parallel.shard_params(model, cfg, mesh, rng, _example_tokens(cfg))
    return jax.jit(lambda key: parallel.unbox(model.init(key, _example_tokens(cfg))["params"]))(rng)


def abstract_params(cfg: ModelConfig, mesh: Optional[jax.sharding.Mesh] = None) -> Any:
    """``ShapeDtypeStruct``s of the parameter tree (a restore target): replicated on the first local
    device, or carrying the shardings ``init_params(cfg, rng, mesh)`` would give."""
    boxed = jax.eval_shape(model_of(cfg).init, jax.random.key(0), _example_tokens(cfg))["params"]
    abstract = parallel.unbox(boxed)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    shardings = parallel.param_shardings(boxed, mesh)
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
