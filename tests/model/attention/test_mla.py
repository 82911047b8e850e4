"""tpa_jax.model.attention.mla: the MLA layer (App. F.3, decoupled RoPE) and its absorbed decode
against explicit float64 NumPy that builds per-head K and V."""
import jax.numpy as jnp
import numpy as np

from tpa_jax.model.attention import MLAttention

from _util import cfg_of
from model_reference import as_f32, causal_softmax_attention, init_layer, rotation_matrix, run_layer


def _rms(x, eps, gain):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * gain


def reference_mla(cfg, p, x):
    t_len = x.shape[0]
    h, d, f = cfg.n_head, cfg.head_dim, cfg.rope_head_dim
    c_q = _rms(x @ p["w_dq"], cfg.mla_norm_eps, p["q_norm"]["scale"])  # [T, d'_c]
    c_kv = _rms(x @ p["w_dkv"], cfg.mla_norm_eps, p["kv_norm"]["scale"])  # [T, d_c]
    q_c = np.einsum("tc,chd->thd", c_q, p["w_uq"])
    q_r = np.stack([np.einsum("c,chf->hf", c_q[t], p["w_qr"]) @ rotation_matrix(t, f) for t in range(t_len)])
    k_r = np.stack([x[t] @ p["w_kr"] @ rotation_matrix(t, f) for t in range(t_len)])  # one head, shared
    k_c = np.einsum("tc,chd->thd", c_kv, p["w_uk"])
    v = np.einsum("tc,che->the", c_kv, p["w_uv"])
    q = np.concatenate([q_c, q_r], -1)
    k = np.concatenate([k_c, np.broadcast_to(k_r[:, None], (t_len, h, f))], -1)
    out = causal_softmax_attention(q, k, v, 1 / np.sqrt(d + f))
    return np.einsum("the,hem->tm", out, p["w_o"])


def test_layer_matches_explicit_formula():
    cfg = cfg_of("mla")
    assert cfg.value_dim != cfg.head_dim  # d_v != d_h is exercised
    p = init_layer(MLAttention, cfg)
    x = np.random.default_rng(1).standard_normal((9, cfg.d_model))
    want = reference_mla(cfg, p, x)
    np.testing.assert_allclose(run_layer(MLAttention, cfg, p, x), want, rtol=2e-4, atol=2e-5)
    assert np.abs(want).max() > 1e-2


def test_absorbed_attention_equals_explicit_keys_and_values():
    """Scoring and aggregating in the latent space (weight absorption) == softmax over
    q_C.(c_KV W^UK) + q_R.k_R with values c_KV W^UV, over the cache rows before each sequence's
    length (rows past it hold junk) and the new token, whose items come separately."""
    cfg = cfg_of("mla")
    p = init_layer(MLAttention, cfg)
    rng = np.random.default_rng(2)
    b, s, h = 2, 7, cfg.n_head
    start = np.array([4, 6])
    q_c = rng.standard_normal((b, 1, h, cfg.head_dim))
    q_r = rng.standard_normal((b, 1, h, cfg.rope_head_dim))
    c_kv = rng.standard_normal((b, s, cfg.kv_lora_rank))
    k_r = rng.standard_normal((b, s, cfg.rope_head_dim))
    new = {"c_kv": rng.standard_normal((b, 1, cfg.kv_lora_rank)), "k_r": rng.standard_normal((b, 1, cfg.rope_head_dim))}
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = MLAttention(cfg).apply({"params": as_f32(p)}, f32(q_c), f32(q_r), {"c_kv": f32(c_kv), "k_r": f32(k_r)},
                                 jnp.asarray(start, jnp.int32), {n: f32(x) for n, x in new.items()},
                                 method=MLAttention.absorbed_attention)
    assert got.shape == (b, 1, h, cfg.value_dim)
    for i in range(b):  # the union: the filled rows, then the new token
        c_i = np.concatenate([c_kv[i, :start[i]], new["c_kv"][i]])
        r_i = np.concatenate([k_r[i, :start[i]], new["k_r"][i]])
        k_c = np.einsum("sc,chd->shd", c_i, p["w_uk"])
        v = np.einsum("sc,che->she", c_i, p["w_uv"])
        logits = (np.einsum("hd,shd->hs", q_c[i, 0], k_c) + np.einsum("hf,sf->hs", q_r[i, 0], r_i)) * cfg.attn_scale
        w = np.exp(logits - logits.max(-1, keepdims=True))
        want = np.einsum("hs,she->he", w / w.sum(-1, keepdims=True), v)
        np.testing.assert_allclose(got[i, 0], want, rtol=1e-4, atol=1e-4)
