"""Shared pieces of the model tests: independent float64 NumPy references written from the
paper's formulas (never from the code under test) -- the RoPE rotation matrix and masked softmax
attention from TPA factors -- and the eager initialisation of one attention layer."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tpa_jax.model.attention import AttentionMask
from tpa_jax.model.rope import rope_tables


def rotation_matrix(pos: float, dim: int, theta: float = 10000.0) -> np.ndarray:
    """The ``dim x dim`` matrix T with RoPE(x, pos) == x @ T in the official half-split convention:
    y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos, angles pos * theta^(-2j/dim), j < dim/2."""
    half = dim // 2
    angle = pos * theta ** (-2.0 * np.arange(half) / dim)
    c, s = np.cos(angle), np.sin(angle)
    t = np.zeros((dim, dim))
    j = np.arange(half)  # row = input index, column = output index
    t[j, j] = c
    t[j + half, j] = s
    t[j, j + half] = -s
    t[j + half, j + half] = c
    return t


def tpa_attention(a_q, b_q, a_k, b_k, a_v, b_v, *, q_rank, k_rank, v_rank, scale, q_positions=None,
                  kv_lengths=None):
    """TPA attention rebuilt from its factors: Q, K, V by eq. 3.1, masked softmax, o [B, T, H, E].

    a_q [B, T, P, H], b_q [B, T, P, D], a_k [B, S, R, H], b_k [B, S, R, D], a_v [B, S, U, H],
    b_v [B, S, U, E].  Key s is visible to a query at position p of sequence b iff s <= p and
    s < kv_lengths[b] (defaults: p = 0..T-1, kv_lengths = S).  Rows past a length may hold anything.
    A query that sees no key returns zeros.
    """
    a_q, b_q, a_k, b_k, a_v, b_v = (np.asarray(x, np.float64) for x in (a_q, b_q, a_k, b_k, a_v, b_v))
    batch, t = a_q.shape[:2]
    s = a_k.shape[1]
    pos = np.broadcast_to(np.arange(t) if q_positions is None else np.asarray(q_positions), (batch, t))
    lens = np.broadcast_to(s if kv_lengths is None else np.asarray(kv_lengths), (batch,))
    filled = np.arange(s)[None, :] < lens[:, None]  # [B, S]
    visible = (np.arange(s)[None, None, :] <= pos[:, :, None]) & filled[:, None, :]  # [B, T, S]
    keep = filled[:, :, None, None]
    a_k, b_k, a_v, b_v = (np.where(keep, x, 0.0) for x in (a_k, b_k, a_v, b_v))
    q = np.einsum("btph,btpd->bthd", a_q, b_q) / q_rank
    k = np.einsum("bsrh,bsrd->bshd", a_k, b_k) / k_rank
    v = np.einsum("bsuh,bsue->bshe", a_v, b_v) / v_rank
    logits = np.einsum("bthd,bshd->bhts", q, k) * scale
    logits = np.where(visible[:, None], logits, -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    w = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = w.sum(-1, keepdims=True)
    probs = np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)
    return np.einsum("bhts,bshe->bthe", probs, v)


def init_layer(module_cls, cfg, randomize=True, seed=0):
    """One attention layer's parameters as float64 NumPy (one jitted init of the layer alone, no model);
    with ``randomize`` the zero-initialised W_O gets random values so the tests can see it."""
    index = jnp.arange(2)
    # one compiled program (eager init compiles every small op separately, which is far slower)
    boxed = jax.jit(lambda key: module_cls(cfg).init(key, jnp.zeros((1, 2, cfg.d_model)),
                                                     rope_tables(index[None], cfg.rope_dim),
                                                     AttentionMask())["params"])(jax.random.key(seed))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(boxed))
    if randomize:
        p["w_o"] = 0.3 * np.random.default_rng(seed + 7).standard_normal(p["w_o"].shape)
    return p


def as_f32(p):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)


def run_layer(module_cls, cfg, p, x_TM):
    """The layer (float32) on one sequence x [T, M] at positions 0..T-1 with the causal mask -> [T, M]."""
    t = x_TM.shape[0]
    index = jnp.arange(t)
    out, _ = jax.jit(module_cls(cfg).apply)({"params": as_f32(p)}, jnp.asarray(x_TM, jnp.float32)[None],
                                            rope_tables(index[None], cfg.rope_dim), AttentionMask())
    return np.asarray(out[0])


def causal_softmax_attention(q, k, v, scale):
    """One sequence: q [T, H, D], k [S, H, D], v [S, H, E] -> [T, H, E], key s visible to query t iff s <= t."""
    out = np.zeros(q.shape[:2] + v.shape[-1:])
    for i in range(q.shape[1]):
        for t in range(q.shape[0]):
            z = k[: t + 1, i] @ q[t, i] * scale
            w = np.exp(z - z.max())
            out[t, i] = (w / w.sum()) @ v[: t + 1, i]
    return out
