"""``ModelConfig.attention_impl``: which implementation computes softmax(scale q k^T, masked) v for
T > 1 queries (training, the full forward, cached prefill), and the checks that pick or refuse one.

    "xla"      core.attend: einsum with the dense [B, T, S] mask (the reference)
    "blocked"  blocked.blocked_attention: online softmax over key blocks, custom VJP, any backend
    "cudnn"    jax.nn.dot_product_attention(implementation="cudnn"): NVIDIA GPUs, bfloat16/float16
    "splash"   kernels.splash: the Pallas TPU splash kernel (the Pallas interpreter on a CPU)
    "auto"     cudnn on a GPU when it takes the shapes and dtype, splash on a TPU, else blocked
               for T >= AUTO_BLOCKED_MIN_T queries, else xla (the choice is logged once)

One-token decoding (T == 1) keeps the decode paths (``decode_impl``) and the dense mask, whatever
the setting.  An implementation the backend lacks, or shapes it cannot take, is a one-line
``ValueError`` naming the implementation, the backend and the reason, raised while tracing.
"""
from __future__ import annotations

import logging
from typing import Optional

import jax
import jax.numpy as jnp

from ...config import ATTENTION_IMPLS
from ...parallel import constrain
from ..rope import Rope
from .blocked import blocked_attention
from .context import context_attention, context_size
from .core import AttentionMask, attend

log = logging.getLogger(__name__)

AUTO_BLOCKED_MIN_T = 2048  # "auto" without a fused kernel: blocked from this many queries on
_LOGGED: set[str] = set()


def _compute_capability() -> Optional[float]:
    """The first device's CUDA compute capability (None off NVIDIA GPUs)."""
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return float(cc) if cc else None


def _cudnn_refusal(backend: str, capability: Optional[float], q_BTHD: jax.Array, v_BSKE: jax.Array) -> Optional[str]:
    if backend != "gpu" or capability is None:
        return "cuDNN attention runs on NVIDIA GPUs only"
    if q_BTHD.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes bfloat16 or float16, got {q_BTHD.dtype} (compute_dtype)"
    h_max = 256 if capability >= 9.0 else 128
    if -(-max(q_BTHD.shape[-1], v_BSKE.shape[-1]) // 8) * 8 > h_max:
        return f"head dims (q/k {q_BTHD.shape[-1]}, v {v_BSKE.shape[-1]}) exceed cuDNN's {h_max} on this GPU"
    return None


def _splash_refusal(backend: str, q_BTHD: jax.Array, k_BSKD: jax.Array) -> Optional[str]:
    if backend not in ("tpu", "cpu"):
        return "the Pallas splash kernel runs on TPUs (and interpreted on the CPU)"
    from .kernels.splash import splash_refusal  # imports Pallas: only when asked for

    return splash_refusal(q_BTHD.shape[1], k_BSKD.shape[1])


def resolve_impl(impl: str, q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array,
                 backend: Optional[str] = None) -> str:
    """The implementation ``impl`` means for these shapes on ``backend`` (default: jax's): one of
    "xla", "blocked", "cudnn", "splash"; or a one-line ValueError."""
    backend = backend or jax.default_backend()
    capability = _compute_capability() if backend == "gpu" else None
    refusals = {"cudnn": lambda: _cudnn_refusal(backend, capability, q_BTHD, v_BSKE),
                "splash": lambda: _splash_refusal(backend, q_BTHD, k_BSKD)}
    if impl in refusals:
        why = refusals[impl]()
        if why:
            raise ValueError(f"attention_impl={impl!r} on backend {backend!r}: {why}")
    if impl != "auto":
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl: expected one of {ATTENTION_IMPLS}, got {impl!r}")
        return impl
    t = q_BTHD.shape[1]
    if backend == "gpu" and not refusals["cudnn"]():
        choice = "cudnn"
    elif backend == "tpu" and not refusals["splash"]():
        choice = "splash"
    else:
        choice = "blocked" if t >= AUTO_BLOCKED_MIN_T else "xla"
    msg = f"attention_impl='auto' on backend {backend!r}: {choice} for {t} queries ({q_BTHD.dtype})"
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.info(msg)
    return choice


def _cudnn(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, mask: AttentionMask, scale: float) -> jax.Array:
    """jax.nn.dot_product_attention on cuDNN.  Its value head dim must equal q/k's and be a multiple
    of 8, so all three are zero-padded to that (zero features change no logit; padded value
    columns are cut off).  The full forward uses cuDNN's causal mask; a cached prefill, whose
    causal diagonal is offset per row, passes the dense mask."""
    d, e = q_BTHD.shape[-1], v_BSKE.shape[-1]
    dim = -(-max(d, e) // 8) * 8
    pad = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, dim - x.shape[-1]),))
    t, s = q_BTHD.shape[1], k_BSKD.shape[1]
    kw = dict(is_causal=True) if mask.is_causal else dict(mask=mask.dense(t, s)[:, None])
    o_BTHE = jax.nn.dot_product_attention(pad(q_BTHD), pad(k_BSKD), pad(v_BSKE), scale=scale, implementation="cudnn",
                                          **kw)
    return o_BTHE[..., :e]


def attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, *, scale: float, mask: AttentionMask,
              impl: str = "xla", block_size: int = 512) -> jax.Array:
    """softmax(scale q k^T, masked) v -> [B, T, H, E] (head h reads kv head h // G) by ``impl``."""
    name = resolve_impl(impl, q_BTHD, k_BSKD, v_BSKE)
    t, s = q_BTHD.shape[1], k_BSKD.shape[1]
    if name == "xla" or t == 1:
        return attend(q_BTHD, k_BSKD, v_BSKE, scale=scale, mask_BTS=mask.dense(t, s))
    if name == "blocked":
        q_pos_BT, kv_len_B = mask.arrays(q_BTHD.shape[0], t, s)
        return blocked_attention(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale=scale, block_size=block_size)
    if name == "cudnn":
        return _cudnn(q_BTHD, k_BSKD, v_BSKE, mask, scale)
    from .kernels.splash import splash_attention

    return splash_attention(q_BTHD, k_BSKD, v_BSKE, mask, scale=scale, block_size=block_size)


def attention_of(cfg, q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, mask: AttentionMask) -> jax.Array:
    """:func:`attention` with ``cfg``'s scale, ``attention_impl`` and ``attention_block_size``.  Under a
    mesh, Q, K, V and the output are pinned to their logical layouts (heads over ``tensor``, batch
    over ``data``/``fsdp``), whichever mechanism produced them."""
    q_BTHD = constrain(q_BTHD, ("batch", "length", "heads", "head_dim"))
    k_BSKD = constrain(k_BSKD, ("batch", "cache_length", "kv_heads", "head_dim"))
    v_BSKE = constrain(v_BSKE, ("batch", "cache_length", "kv_heads", "value_dim"))
    o_BTHE = attention(q_BTHD, k_BSKD, v_BSKE, scale=cfg.attn_scale, mask=mask, impl=cfg.attention_impl,
                       block_size=cfg.attention_block_size)
    return constrain(o_BTHE, ("batch", "length", "heads", "value_dim"))


def attention_items(cfg, q_BTHD: jax.Array, items: dict[str, jax.Array], keys_values, key_rope: Rope,
                    mask: AttentionMask, key_rope_travels: bool = False) -> jax.Array:
    """Attention of queries against the keys and values of per-token ``items`` (what the mechanism
    caches), ``keys_values(items, key_rope, batch, length) -> (k, v)`` expanding them.

    The full forward under a mesh with ``context`` > 1 runs context-parallel
    (:func:`context.context_attention`): the devices exchange the items, not K and V.  When the
    expansion needs the keys' RoPE tables (``key_rope_travels``: TPA's unrotated shared or constant
    B factors), the tables travel with the items.  Everything else is :func:`attention_of` of the
    expanded K and V."""
    batch = q_BTHD.shape[0]
    if mask.is_causal and context_size() > 1:
        if key_rope_travels:
            items = {**items, "key_rope_cos": key_rope[0], "key_rope_sin": key_rope[1]}

        def expand(block: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
            block = dict(block)
            rope = (block.pop("key_rope_cos"), block.pop("key_rope_sin")) if key_rope_travels else None
            return keys_values(block, rope, batch, jax.tree_util.tree_leaves(block if block else rope)[0].shape[1])

        o_BTHE = context_attention(cfg, q_BTHD, items, expand)
        return constrain(o_BTHE, ("batch", "length", "heads", "value_dim"))
    length = jax.tree_util.tree_leaves(items)[0].shape[1] if items else key_rope[0].shape[-2]
    k_BSKD, v_BSKE = keys_values(items, key_rope, batch, length)
    return attention_of(cfg, q_BTHD, k_BSKD, v_BSKE, mask)
