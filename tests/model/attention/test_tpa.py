"""tpa_jax.model.attention.tpa: the TPA layer and its variants against the paper's equations
written as explicit, slow float64 NumPy (eqs. 3.1-3.5, Theorems 3.1 and C.1), and its initialisers."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax.model.attention import TPAttention
from tpa_jax.model.attention.tpa import contract
from tpa_jax.model.rope import apply_rope, rope_tables

import model_reference
from _util import BASE, cfg_of
from model_reference import as_f32, causal_softmax_attention, rotation_matrix, run_layer

TPA_VARIANTS = ["tpa", "tpa_kvonly", "tpa_nonctx_a", "tpa_nonctx_b", "tpa_shared_b", "tpa_order3", "tpa_sigmoid",
                "tpa_softmax", "tpa_outnorm", "tpa_r1"]


def init_layer(cfg, randomize=True):
    return model_reference.init_layer(TPAttention, cfg, randomize)


def reference_tpa(cfg, p, x):
    """One TPA layer for one sequence x [T, M], written as in the paper: explicit outer products."""
    t_len, m = x.shape
    h, db = cfg.n_head, cfg.b_dim

    def act(a):
        if cfg.head_factor_activation == "sigmoid":
            return 1 / (1 + np.exp(-a))
        if cfg.head_factor_activation == "softmax":
            e = np.exp(a - a.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        return a

    def a_factor(name, r):
        if cfg.contextual_a:
            return act((x @ p[f"w_a{name}"].reshape(m, r * h)).reshape(t_len, r, h))
        return act(np.broadcast_to(p[f"a_{name}"], (t_len, r, h)))

    def b_factor(name, r, rope):
        if cfg.contextual_b:
            b = (x @ p[f"w_b{name}"].reshape(m, r * db)).reshape(t_len, r, db)
        else:
            b = np.broadcast_to(p[f"b_{name}"], (t_len, r, db)).copy()
        if rope:  # RoPE_t applied to each row of B (eq. 3.5)
            b = np.stack([b[t] @ rotation_matrix(t, db) for t in range(t_len)])
        if cfg.tpa_order == 3:  # vec(b (x) c), column-stacking vec
            c = (x @ p[f"w_c{name}"].reshape(m, r * cfg.tpa_c_dim)).reshape(t_len, r, cfg.tpa_c_dim)
            b = np.stack([[np.outer(b[t, i], c[t, i]).flatten(order="F") for i in range(r)] for t in range(t_len)])
        return b

    def tensor(a, b, r):  # eq. 3.1: (1/R) sum_r a_r (x) b_r, per token
        return np.stack([sum(np.outer(a[t, i], b[t, i]) for i in range(r)) / r for t in range(t_len)])

    if cfg.attention == "tpa":
        q = tensor(a_factor("q", cfg.q_rank), b_factor("q", cfg.q_rank, True), cfg.q_rank)
    else:
        q = (x @ p["w_q"].reshape(m, -1)).reshape(t_len, h, cfg.head_dim)
        q = np.stack([q[t] @ rotation_matrix(t, cfg.head_dim) for t in range(t_len)])
    k = tensor(a_factor("k", cfg.k_rank), b_factor("k", cfg.k_rank, True), cfg.k_rank)
    if cfg.shared_kv_b:
        v = tensor(a_factor("v", cfg.v_rank), b_factor("k", cfg.v_rank, False), cfg.v_rank)
    else:
        v = tensor(a_factor("v", cfg.v_rank), b_factor("v", cfg.v_rank, False), cfg.v_rank)
    out = causal_softmax_attention(q, k, v, 1 / np.sqrt(cfg.head_dim))  # eq. 3.2
    if cfg.attn_out_norm:
        out = out / np.sqrt((out ** 2).mean(-1, keepdims=True) + cfg.attn_out_norm_eps) * p["out_norm"]["scale"]
    return np.einsum("the,hem->tm", out, p["w_o"])  # eq. 3.3


@pytest.mark.parametrize("name", TPA_VARIANTS)
def test_tpa_layer_matches_explicit_formula(name):
    cfg = cfg_of(name)
    p = init_layer(cfg)
    x = np.random.default_rng(1).standard_normal((10, cfg.d_model))
    got = run_layer(TPAttention, cfg, p, x)
    want = reference_tpa(cfg, p, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)
    assert np.abs(want).max() > 1e-2  # not a vacuous comparison


@pytest.mark.parametrize("n", ["q", "k", "v"])
def test_eq31_contraction_is_sum_of_outer_products(n):
    rng = np.random.default_rng(0)
    r, h, d = 5, 7, 6
    a, b = rng.standard_normal((2, 3, r, h)), rng.standard_normal((2, 3, r, d))
    got = np.asarray(contract(n, jnp.asarray(a), jnp.asarray(b), r))
    for bi in range(2):
        for t in range(3):
            want = sum(np.outer(a[bi, t, i], b[bi, t, i]) for i in range(r)) / r
            np.testing.assert_allclose(got[bi, t], want, rtol=1e-5, atol=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _factors(cfg, p, x, rope, identity):
    """The layer's factors with RoPE and with the identity rotation (one compiled program, not eager ops)."""
    mod = TPAttention(cfg)
    return (mod.apply({"params": p}, x, rope, method=TPAttention.factors),
            mod.apply({"params": p}, x, identity, method=TPAttention.factors))


def test_theorem_3_1_rotate_factors_equals_rotate_query():
    cfg = cfg_of("tpa")
    p = as_f32(init_layer(cfg))
    t_len = 9
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, t_len, cfg.d_model)), jnp.float32)
    pos = jnp.arange(t_len)[None]
    rope = rope_tables(pos, cfg.head_dim)
    identity = (jnp.ones_like(rope[0]), jnp.zeros_like(rope[1]))
    f_rot, f_raw = _factors(cfg, p, x, rope, identity)
    for n, r in (("q", cfg.q_rank), ("k", cfg.k_rank)):
        rotated_then_contracted = contract(n, f_rot[f"a_{n}"], f_rot[f"b_{n}"], r)
        contracted_then_rotated = apply_rope(contract(n, f_raw[f"a_{n}"], f_raw[f"b_{n}"], r), *rope)
        np.testing.assert_allclose(rotated_then_contracted, contracted_then_rotated, rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(f_rot[f"b_{n}"] - f_raw[f"b_{n}"]).max()) > 1e-2  # RoPE really acted
    # V is never rotated
    np.testing.assert_array_equal(f_rot["b_v"], f_raw["b_v"])
    # relative-position identity: q~_t k~_s^T = q_t T_{t-s} k_s^T
    q = np.asarray(contract("q", f_raw["a_q"], f_raw["b_q"], cfg.q_rank))[0].astype(np.float64)
    k = np.asarray(contract("k", f_raw["a_k"], f_raw["b_k"], cfg.k_rank))[0].astype(np.float64)
    qr = np.asarray(contract("q", f_rot["a_q"], f_rot["b_q"], cfg.q_rank))[0]
    kr = np.asarray(contract("k", f_rot["a_k"], f_rot["b_k"], cfg.k_rank))[0]
    for t, s in ((5, 2), (8, 0), (3, 3)):
        lhs = np.einsum("hd,hd->h", qr[t], kr[s])
        rhs = np.einsum("hd,de,he->h", q[t], rotation_matrix(t - s, cfg.head_dim), k[s])
        np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_theorem_c1_third_order_rope():
    """RoPE on b then vec(b (x) c) == the unrotated Q_t times I_dc (x) R_t (Thm C.1), position by position."""
    rng = np.random.default_rng(3)
    cfg = cfg_of("tpa_order3")
    p = as_f32(init_layer(cfg))
    x = jnp.asarray(rng.standard_normal((1, 7, cfg.d_model)), jnp.float32)
    rope = rope_tables(jnp.arange(7)[None], cfg.rope_dim)
    identity = (jnp.ones_like(rope[0]), jnp.zeros_like(rope[1]))
    f_rot, f_raw = _factors(cfg, p, x, rope, identity)
    q_rot = np.asarray(contract("q", f_rot["a_q"], f_rot["b_q"], cfg.q_rank))[0]
    q_raw = np.asarray(contract("q", f_raw["a_q"], f_raw["b_q"], cfg.q_rank))[0]
    for t in range(7):
        big_t = np.kron(np.eye(cfg.tpa_c_dim), rotation_matrix(t, cfg.b_dim))
        np.testing.assert_allclose(q_rot[t], q_raw[t] @ big_t, rtol=1e-4, atol=1e-5)


def test_official_factor_init_bounds():
    cfg = dataclasses.replace(BASE, d_model=64, n_head=4, head_dim=16, q_rank=6, k_rank=2)
    a = init_layer(cfg, randomize=False)
    m, h, d = 64, 4, 16
    # xavier_uniform_ on the (M, H, R) / (M, R, D) views of the official code
    for w, bound in ((a["w_aq"], np.sqrt(6 / (6 * (h + m)))), (a["w_bk"], np.sqrt(6 / (d * (2 + m))))):
        assert 0.9 * bound < np.abs(w).max() <= bound
    assert not np.any(a["w_o"])  # zero-initialised output projection
    p2 = init_layer(dataclasses.replace(cfg, factor_init="xavier"), randomize=False)
    bound = np.sqrt(6 / (m + 6 * h))  # App. G: U(+-sqrt(6/(n_in + n_out))) on W^a in R^{R h x d_model}
    assert bound * 0.9 < np.abs(p2["w_aq"]).max() <= bound
