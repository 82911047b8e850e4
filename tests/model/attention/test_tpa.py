"""The equations of the paper against explicit, slow formulas (NumPy, float64)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax.model.attention import TPAttention, causal_mask
from tpa_jax.model.rope import apply_rope, rope_tables, rotation_matrix

from _util import BASE, VARIANTS, cfg_of, forward, init_params, tokens

TPA_VARIANTS = ["tpa", "tpa_kvonly", "tpa_nonctx_a", "tpa_nonctx_b", "tpa_shared_b", "tpa_order3", "tpa_sigmoid",
                "tpa_softmax", "tpa_outnorm", "tpa_r1"]


def layer0(params):
    return jax.tree_util.tree_map(lambda a: np.asarray(a[0], np.float64), params["blocks"]["attn"])


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
    out = np.zeros((t_len, h, cfg.head_dim))
    for i in range(h):  # eq. 3.2, causal
        for t in range(t_len):
            s = np.array([q[t, i] @ k[u, i] for u in range(t + 1)]) / np.sqrt(cfg.head_dim)
            w = np.exp(s - s.max())
            out[t, i] = (w / w.sum()) @ v[: t + 1, i]
    if cfg.attn_out_norm:
        out = out / np.sqrt((out ** 2).mean(-1, keepdims=True) + cfg.attn_out_norm_eps) * p["out_norm"]["scale"]
    return np.einsum("the,hem->tm", out, p["w_o"])  # eq. 3.3


def run_layer(cfg, p, x_TM, positions=None):
    t = x_TM.shape[0]
    positions = jnp.arange(t)[None] if positions is None else positions
    rope = rope_tables(positions, cfg.rope_dim)
    mod = TPAttention(cfg)
    p32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
    return mod, p32, rope, mod.apply({"params": p32}, jnp.asarray(x_TM, jnp.float32)[None], rope,
                                     causal_mask(positions, positions))[0][0]


@pytest.mark.parametrize("name", TPA_VARIANTS)
def test_tpa_layer_matches_explicit_formula(name):
    cfg = cfg_of(name)
    _, params = init_params(cfg)
    p = layer0(params)
    x = np.random.default_rng(1).standard_normal((10, cfg.d_model))
    *_, got = run_layer(cfg, p, x)
    want = reference_tpa(cfg, p, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)
    assert np.abs(want).max() > 1e-2  # not a vacuous comparison


def test_eq31_contraction_is_sum_of_outer_products():
    rng = np.random.default_rng(0)
    r, h, d = 5, 7, 6
    a, b = rng.standard_normal((2, 3, r, h)), rng.standard_normal((2, 3, r, d))
    got = np.asarray(TPAttention.contract(jnp.asarray(a), jnp.asarray(b), r))
    for bi in range(2):
        for t in range(3):
            want = sum(np.outer(a[bi, t, i], b[bi, t, i]) for i in range(r)) / r
            np.testing.assert_allclose(got[bi, t], want, rtol=1e-5, atol=1e-6)


def test_rope_matches_rotation_matrix_and_official_sign():
    rng = np.random.default_rng(0)
    d, pos = 10, np.array([0, 3, 17])
    x = rng.standard_normal((1, 3, 2, d)).astype(np.float32)
    cos, sin = rope_tables(jnp.asarray(pos)[None], d)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    for j, t in enumerate(pos):
        np.testing.assert_allclose(got[0, j], x[0, j] @ rotation_matrix(t, d), rtol=1e-5, atol=1e-5)
    # official sign: first half y1 = x1 cos + x2 sin
    theta = 1.0 * 3
    e = np.zeros(d, np.float32)
    e[d // 2] = 1.0  # x2[0] = 1
    y = np.asarray(apply_rope(jnp.asarray(e)[None, None], *rope_tables(jnp.asarray([[3]]), d)))[0, 0]
    assert np.isclose(y[0], np.sin(theta), atol=1e-6) and np.isclose(y[d // 2], np.cos(theta), atol=1e-6)


def test_theorem_3_1_rotate_factors_equals_rotate_query():
    cfg = cfg_of("tpa")
    _, params = init_params(cfg)
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), layer0(params))
    t_len = 9
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, t_len, cfg.d_model)), jnp.float32)
    pos = jnp.arange(t_len)[None]
    rope = rope_tables(pos, cfg.head_dim)
    identity = (jnp.ones_like(rope[0]), jnp.zeros_like(rope[1]))
    mod = TPAttention(cfg)
    f_rot = mod.apply({"params": p}, x, rope, method=TPAttention.factors)
    f_raw = mod.apply({"params": p}, x, identity, method=TPAttention.factors)
    for n, r in (("q", cfg.q_rank), ("k", cfg.k_rank)):
        rotated_then_contracted = TPAttention.contract(f_rot[f"a_{n}"], f_rot[f"b_{n}"], r)
        contracted_then_rotated = apply_rope(TPAttention.contract(f_raw[f"a_{n}"], f_raw[f"b_{n}"], r), *rope)
        np.testing.assert_allclose(rotated_then_contracted, contracted_then_rotated, rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(f_rot[f"b_{n}"] - f_raw[f"b_{n}"]).max()) > 1e-2  # RoPE really acted
    # V is never rotated
    np.testing.assert_array_equal(f_rot["b_v"], f_raw["b_v"])
    # relative-position identity: q~_t k~_s^T = q_t T_{t-s} k_s^T
    q = np.asarray(TPAttention.contract(f_raw["a_q"], f_raw["b_q"], cfg.q_rank))[0].astype(np.float64)
    k = np.asarray(TPAttention.contract(f_raw["a_k"], f_raw["b_k"], cfg.k_rank))[0].astype(np.float64)
    qr = np.asarray(TPAttention.contract(f_rot["a_q"], f_rot["b_q"], cfg.q_rank))[0]
    kr = np.asarray(TPAttention.contract(f_rot["a_k"], f_rot["b_k"], cfg.k_rank))[0]
    for t, s in ((5, 2), (8, 0), (3, 3)):
        lhs = np.einsum("hd,hd->h", qr[t], kr[s])
        rhs = np.einsum("hd,de,he->h", q[t], rotation_matrix(t - s, cfg.head_dim), k[s])
        np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_theorem_c1_third_order_rope():
    # explicit: vec(R b (x) c) == vec(b (x) c) T with T = I_dc (x) R^T (row-vector convention)
    rng = np.random.default_rng(3)
    db, dc, t = 6, 3, 11
    b, c = rng.standard_normal(db), rng.standard_normal(dc)
    rot = rotation_matrix(t, db)
    lhs = np.outer(b @ rot, c).flatten(order="F")
    rhs = np.outer(b, c).flatten(order="F") @ np.kron(np.eye(dc), rot)
    np.testing.assert_allclose(lhs, rhs, atol=1e-12)
    # in the model: factors built with RoPE on b == unrotated Q_t times I (x) R_t, position by position
    cfg = cfg_of("tpa_order3")
    _, params = init_params(cfg)
    p = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), layer0(params))
    x = jnp.asarray(rng.standard_normal((1, 7, cfg.d_model)), jnp.float32)
    rope = rope_tables(jnp.arange(7)[None], cfg.rope_dim)
    identity = (jnp.ones_like(rope[0]), jnp.zeros_like(rope[1]))
    mod = TPAttention(cfg)
    f_rot = mod.apply({"params": p}, x, rope, method=TPAttention.factors)
    f_raw = mod.apply({"params": p}, x, identity, method=TPAttention.factors)
    q_rot = np.asarray(TPAttention.contract(f_rot["a_q"], f_rot["b_q"], cfg.q_rank))[0]
    q_raw = np.asarray(TPAttention.contract(f_raw["a_q"], f_raw["b_q"], cfg.q_rank))[0]
    for t in range(7):
        big_t = np.kron(np.eye(cfg.tpa_c_dim), rotation_matrix(t, cfg.b_dim))
        np.testing.assert_allclose(q_rot[t], q_raw[t] @ big_t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality(name):
    cfg = cfg_of(name)
    model, params = init_params(cfg)
    tok = tokens(cfg, seq=12)
    fwd = forward(model)
    base = fwd(params, tok)
    assert base.dtype == jnp.float32 and base.shape == (2, 12, cfg.vocab_size)
    for t in (0, 5, 10):
        changed = tok.at[:, t + 1:].set((tok[:, t + 1:] + 7) % cfg.vocab_size)
        out = fwd(params, changed)
        np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(base[:, : t + 1]))
        assert float(jnp.abs(out[:, t + 1:] - base[:, t + 1:]).max()) > 1e-4  # the future did change


@pytest.mark.parametrize("name", ["tpa"])
def test_unrolled_and_remat_match_scan(name):
    cfg = cfg_of(name)
    model, params = init_params(cfg)
    tok = tokens(cfg)
    from tpa_jax import Transformer

    def value_and_grad(m):
        return jax.jit(jax.value_and_grad(lambda p: (m.apply({"params": p}, tok) ** 2).mean()))

    base, ref = value_and_grad(model)(params)
    for change in (dict(scan_layers=False), dict(remat_policy="full"), dict(remat_policy="dots")):
        other = Transformer(dataclasses.replace(cfg, **change))
        val, grads = value_and_grad(other)(params)
        np.testing.assert_allclose(val, base, rtol=1e-5)
        for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = dataclasses.replace(cfg_of("tpa"), compute_dtype="bfloat16")
    model, params = init_params(cfg)
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(params))
    tok = tokens(cfg)
    out = forward(model)(params, tok)
    ref = forward(init_params(dataclasses.replace(cfg, compute_dtype="float32"))[0])(params, tok)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_official_factor_init_bounds():
    cfg = dataclasses.replace(BASE, d_model=64, n_head=4, head_dim=16, q_rank=6, k_rank=2)
    _, params = init_params(cfg, randomize=False)
    a = params["blocks"]["attn"]
    m, h, d = 64, 4, 16
    # xavier_uniform_ on the (M, H, R) / (M, R, D) views of the official code
    assert np.abs(a["w_aq"]).max() <= np.sqrt(6 / (6 * (h + m))) and np.abs(a["w_aq"]).max() > 0.9 * np.sqrt(6 / (6 * (h + m)))
    assert np.abs(a["w_bk"]).max() <= np.sqrt(6 / (d * (2 + m))) and np.abs(a["w_bk"]).max() > 0.9 * np.sqrt(6 / (d * (2 + m)))
    assert not np.any(a["w_o"]) and not np.any(params["blocks"]["mlp"]["w3"])  # zero-initialised outputs
    _, p2 = init_params(dataclasses.replace(cfg, factor_init="xavier"), randomize=False)
    bound = np.sqrt(6 / (m + 6 * h))  # App. G: U(+-sqrt(6/(n_in + n_out))) on W^a in R^{R h x d_model}
    assert bound * 0.9 < np.abs(p2["blocks"]["attn"]["w_aq"]).max() <= bound


def test_attend_gqa_against_loops():
    from tpa_jax.model.attention import attend

    rng = np.random.default_rng(5)
    b, t, s, h, kv, d, e = 2, 4, 6, 6, 2, 5, 3
    q, k, v = rng.standard_normal((b, t, h, d)), rng.standard_normal((b, s, kv, d)), rng.standard_normal((b, s, kv, e))
    mask = rng.random((b, t, s)) < 0.7
    mask[..., 0] = True
    got = np.asarray(attend(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), scale=0.3, mask_BTS=jnp.asarray(mask)))
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                j = hi // (h // kv)  # consecutive blocks of query heads share a kv head
                sc = np.where(mask[bi, ti], 0.3 * k[bi, :, j] @ q[bi, ti, hi], -np.inf)
                w = np.exp(sc - sc.max())
                np.testing.assert_allclose(got[bi, ti, hi], (w / w.sum()) @ v[bi, :, j], rtol=1e-5, atol=1e-5)
