"""The T6 / LLaMA-style decoder (blocks, layer stack, loss) and the one model entry point every
consumer uses.

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
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import parallel
from ..parallel import constrain
from ..config import ModelConfig
from .attention import AttentionMask, attention_class
from .attention.context import check_divides, context_size, stripe, unstripe
from .attention.core import LayerCache, write_stack
from .layers import Embedding, RMSNorm, SwiGLU
from .rope import Rope, rope_tables

ACTIVATION_AXES = ("batch", "length", "embed")
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecodeCarry(NamedTuple):
    """The layer scan's carry in one-token decoding: the residual stream and the cache stack, which
    the layers only read (its type tells the blocks so, and survives remat and scan)."""

    x: jax.Array
    layers: dict[str, jax.Array]
    page_table: Optional[jax.Array] = None


class Block(nn.Module):
    """Pre-norm block: x + attn(RMSNorm(x)), then + SwiGLU(RMSNorm(x)).

    The scan carry is x, or with a decode cache (x, the stacked cache {name: [L, B, S, ...]}) with
    ``layer`` this block's index: the layer reads its rows from the stack and writes its new tokens
    into it in place, so the whole cache travels through the layer loop without copies.  With a
    :class:`DecodeCarry` (one-token decoding) the loop only reads the stack: the layer's new items
    are its scan output, written into the stack after the loop (``core.LayerCache``)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry: Any, rope: Rope, key_rope: Optional[Rope], mask: AttentionMask,
                 start_B: Optional[jax.Array], layer: Optional[jax.Array]) -> tuple[Any, Any]:
        cfg = self.cfg
        x_BTM, cache = ((carry[0], LayerCache(carry[1], layer, isinstance(carry, DecodeCarry),
                                              page_table=carry[2]))
                        if isinstance(carry, tuple) else (carry, None))
        x_BTM = constrain(x_BTM, ACTIVATION_AXES)  # the residual stream's layout at every block boundary
        h_BTM = RMSNorm(cfg, cfg.d_model, cfg.norm_eps, cfg.norm_weight, name="attn_norm")(x_BTM)
        a_BTM, cache = attention_class(cfg)(cfg, name="attn")(h_BTM, rope, mask, cache=cache, key_rope=key_rope,
                                                              start_B=start_B)
        x_BTM = x_BTM + a_BTM.astype(x_BTM.dtype)
        h_BTM = RMSNorm(cfg, cfg.d_model, cfg.norm_eps, cfg.norm_weight, name="mlp_norm")(x_BTM)
        x_BTM = x_BTM + SwiGLU(cfg, name="mlp")(h_BTM).astype(x_BTM.dtype)
        x_BTM = constrain(x_BTM, ACTIVATION_AXES)
        if cache is None:
            return x_BTM, None
        out = (x_BTM, cache.layers, cache.page_table)
        return (DecodeCarry(*out) if cache.deferred else out), cache.pending


class Transformer(nn.Module):
    """tokens int32 [B, T] -> logits float32 [B, T, vocab]."""

    cfg: ModelConfig

    def setup(self) -> None:
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

    def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
                 cache: Optional[dict[str, Any]] = None, valid_lengths: Optional[jax.Array] = None,
                 ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        """Full causal forward of ``tokens`` int [B, T] -> logits float32 [B, T, V], or with
        ``cache`` (see ``tpa_jax.inference.init_cache``) a prefill (T tokens) or decode (1 token)
        step returning ``(logits, cache)`` whose positions come from the cache.  ``positions``
        ([T] or [B, T]) sets the RoPE positions of a full forward; its mask follows token order.
        ``valid_lengths`` [B] marks right-padded prompts of different lengths."""
        cfg = self.cfg
        tokens_BT = jnp.asarray(tokens)
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens: expected int array [batch, seq], got shape {tokens_BT.shape}")
        t = tokens_BT.shape[1]
        x_BTM = self.embed(tokens_BT)
        tables = functools.partial(rope_tables, dim=cfg.rope_dim, theta=cfg.rope_theta, bf16_round=cfg.rope_bf16_tables)
        index_T = jnp.arange(t, dtype=jnp.int32)
        if cache is None:
            positions = index_T[None, :] if positions is None else jnp.asarray(positions)
            c = context_size()
            striped = c > 1 and cfg.context_layout == "striped"
            if c > 1:
                check_divides(t, c)
            if striped:  # every context shard holds every C-th token (context.py); undone before the head
                x_BTM, positions = stripe(x_BTM, c), stripe(positions, c, axis=positions.ndim - 1)
            x_BTM, _ = self.blocks(x_BTM, tables(positions), None, AttentionMask(), None, None)
            x_BTM = unstripe(x_BTM, c) if striped else x_BTM
            return self.embed.attend(self.final_norm(x_BTM))
        lengths_B = cache["lengths"]
        page_table = cache.get("page_table")  # a paged cache: pools [L, N, page_size, ...] (inference.paged)
        max_len = jax.tree_util.tree_leaves(cache["layers"])[0].shape[2]
        if page_table is not None:
            max_len *= page_table.shape[1]
        if t > max_len:
            raise ValueError(f"tokens: {t} new tokens exceed the cache capacity max_len={max_len}")
        q_positions_BT = lengths_B[:, None] + index_T[None, :]
        key_positions_S = jnp.arange(max_len, dtype=jnp.int32)
        mask = AttentionMask(q_positions_BT, lengths_B + t)  # keys: the cache rows 0..max_len-1
        deferred = t == 1 and context_size() == 1  # decode: the layer loop only reads the cache
        carry = (DecodeCarry(x_BTM, cache["layers"], page_table) if deferred
                 else (x_BTM, cache["layers"], page_table))
        (x_BTM, layers, _), pending = self.blocks(carry, tables(q_positions_BT), tables(key_positions_S[None, :]), mask,
                                               lengths_B, jnp.arange(cfg.n_layer, dtype=jnp.int32))
        if deferred:
            layers = write_stack(layers, pending, lengths_B, page_table)
        new_lengths_B = lengths_B + (t if valid_lengths is None else jnp.asarray(valid_lengths, jnp.int32))
        new_cache = {"lengths": new_lengths_B, "layers": layers}
        if page_table is not None:
            new_cache["page_table"] = page_table
        return self.embed.attend(self.final_norm(x_BTM)), new_cache


def cross_entropy(logits: jax.Array, targets: jax.Array, ignore_index: int = -1) -> jax.Array:
    """Mean next-token cross-entropy of logits [..., V] at int targets [...] over targets !=
    ignore_index (float32), as F.cross_entropy."""
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

    def logits(params: Any, tokens: jax.Array, *, positions: Optional[jax.Array] = None, cache: Any = None,
               valid_lengths: Optional[jax.Array] = None) -> Any:
        return model.apply({"params": params}, tokens, positions=positions, cache=cache,
                           valid_lengths=valid_lengths)

    return logits


@functools.lru_cache(maxsize=None)
def loss_fn(cfg: ModelConfig) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``(params, inputs [B, T], targets [B, T]) -> float32`` mean cross-entropy over targets != -1."""
    logits = logits_fn(cfg)

    def loss(params: Any, inputs: jax.Array, targets: jax.Array) -> jax.Array:
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
