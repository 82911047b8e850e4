"""One-token decoding of MHA / MQA / GQA against a cache of K and V, read at the speed of memory.

A decode step reads the whole cache once, so its cost is the cache's bytes over the memory's
bandwidth; everything else is overhead.  Two rules keep the overhead small:

* **Read the old rows, then write the new one.**  Attention reads the rows already in the cache
  (``kv_len_B = start_B`` of them) and takes the new token's K and V as a separate operand; the
  two parts are merged by log-sum-exp (``core.merge_parts``), and the new row is written after.
  No read of the cache follows its write, so XLA updates the donated cache in place instead of
  copying it every step.
* **Stream the cache in its own [B, S, K, D] order.**  No transposed or up-cast copy of it is made.
  The form depends on the backend, and was picked by measuring each on XLA's CPU backend, whose
  16-bit matrix-vector products and materialised 16-bit conversions run far below memory speed
  while its fused multiply-reduce loops and GEMMs stream at it:

  ``"reduce"``  (CPU, one query head per kv head, 16-bit cache) logits and output are fused
                multiply-reduce loops over the cache rows, upcasting inside the loop;
  ``"gemm"``    (CPU otherwise) the logits are one GEMM of the rows [S, K D] against the
                block-diagonal queries [K D, H] (query head h meets only its kv head's features)
                and the output one GEMM [H, S] x [S, K E] whose diagonal blocks are kept: K-fold
                flops, cheap next to the reads;
  ``"einsum"``  (GPU, TPU) the head-major batched contractions of ``core.attend``.

All statistics are float32, and every form equals the dense softmax (tested against it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .core import filled_BS, merge_parts, row_softmax

_F32 = jnp.float32
DECODE_FORMS = ("reduce", "gemm", "einsum")


def decode_form(kv_heads: int, n_head: int, dtype, backend: str | None = None) -> str:
    """The form of :func:`rows_attention` for this backend, grouping and cache dtype."""
    if (backend or jax.default_backend()) != "cpu":
        return "einsum"
    return "reduce" if kv_heads == n_head and jnp.dtype(dtype).itemsize == 2 else "gemm"


def rows_attention(q_BHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, kv_len_B: jax.Array, *, scale: float,
                   form: str) -> tuple[jax.Array, jax.Array]:
    """(o [B, H, E] float32, lse [B, H]) of one query per sequence against the cache rows
    ``s < kv_len_B[b]`` (head h reads kv head h // G); lse is -inf where no row is filled.  Rows past
    a length get probability exactly 0: their keys may hold anything, their values must be finite
    (the model's caches are zero-initialised and hold only what the model wrote), so that no masked
    copy of V is made."""
    b, h, d = q_BHD.shape
    s, kv, e = k_BSKD.shape[1], k_BSKD.shape[2], v_BSKE.shape[-1]
    g = h // kv
    filled_BS_ = filled_BS(kv_len_B, jnp.arange(s, dtype=jnp.int32))
    q_BHD = q_BHD.astype(_F32) * scale
    if form == "reduce":  # fused multiply-reduce loops over the rows (chosen for G == 1)
        q_B1KGD = q_BHD.reshape(b, 1, kv, g, d)
        logits_BSH = jnp.sum(k_BSKD.astype(_F32)[:, :, :, None] * q_B1KGD, axis=-1).reshape(b, s, h)
    elif form == "gemm":
        eye_KJ = jnp.eye(kv, dtype=_F32)
        q_bd_BCN = jnp.einsum("bkgd,kj->bkdjg", q_BHD.reshape(b, kv, g, d), eye_KJ).reshape(b, kv * d, h)
        logits_BSH = jnp.einsum("bsc,bcn->bsn", k_BSKD.reshape(b, s, kv * d), q_bd_BCN.astype(k_BSKD.dtype),
                                preferred_element_type=_F32)
    else:
        q_BKGD = q_BHD.reshape(b, kv, g, d).astype(k_BSKD.dtype)
        logits_BSH = jnp.einsum("bkgd,bskd->bskg", q_BKGD, k_BSKD, preferred_element_type=_F32).reshape(b, s, h)
    p_BSH, l_BH, lse_BH = row_softmax(logits_BSH, filled_BS_)  # unfilled rows: p exactly 0
    if form == "reduce":
        v_BSKE = jnp.where(filled_BS_[:, :, None, None], v_BSKE, 0).astype(_F32)
        y_BHE = jnp.sum(v_BSKE[:, :, :, None] * p_BSH.reshape(b, s, kv, g)[..., None], axis=1).reshape(b, h, e)
    elif form == "gemm":
        v_BSC = v_BSKE.reshape(b, s, kv * e)  # unfilled rows: p is exactly 0 there (and the rows finite)
        y_BNJE = jnp.einsum("bsn,bsc->bnc", p_BSH.astype(v_BSC.dtype), v_BSC,
                            preferred_element_type=_F32).reshape(b, kv, g, kv, e)
        y_BHE = jnp.einsum("bkgje,kj->bkge", y_BNJE, jnp.eye(kv, dtype=_F32)).reshape(b, h, e)
    else:
        p_BSKG = p_BSH.reshape(b, s, kv, g).astype(v_BSKE.dtype)
        y_BHE = jnp.einsum("bskg,bske->bkge", p_BSKG, v_BSKE, preferred_element_type=_F32).reshape(b, h, e)
    return y_BHE / l_BH[..., None], lse_BH


def new_token_part(q_BHD: jax.Array, k_BKD: jax.Array, v_BKE: jax.Array, *, scale: float
                   ) -> tuple[jax.Array, jax.Array]:
    """(o, lse) of each query against its own token alone: o = v, lse = the one logit."""
    b, h, _ = q_BHD.shape
    kv = k_BKD.shape[1]
    g = h // kv
    k_BHD = jnp.repeat(k_BKD.astype(_F32), g, axis=1)
    v_BHE = jnp.repeat(v_BKE.astype(_F32), g, axis=1)
    return v_BHE, jnp.einsum("bhd,bhd->bh", q_BHD.astype(_F32), k_BHD) * scale


def with_token(q_BHD: jax.Array, o_BHE: jax.Array, lse_BH: jax.Array, new: tuple[jax.Array, jax.Array], *,
               scale: float) -> jax.Array:
    """o [B, 1, H, E] float32 of the new token over the cache rows (their ``(o, lse)``) and itself
    (``new`` = its K [B, 1, K, D] and V [B, 1, K, E])."""
    o_new, lse_new = new_token_part(q_BHD, new[0][:, 0], new[1][:, 0], scale=scale)
    return merge_parts(o_BHE, lse_BH, o_new, lse_new)[0][:, None]

