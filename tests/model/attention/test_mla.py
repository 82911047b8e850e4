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
    q_C.(c_KV W^UK) + q_R.k_R with values c_KV W^UV, under an arbitrary mask."""
    cfg = cfg_of("mla")
    p = init_layer(MLAttention, cfg)
    rng = np.random.default_rng(2)
    b, t, s, h = 2, 3, 7, cfg.n_head
    q_c = rng.standard_normal((b, t, h, cfg.head_dim))
    q_r = rng.standard_normal((b, t, h, cfg.rope_head_dim))
    c_kv = rng.standard_normal((b, s, cfg.kv_lora_rank))
    k_r = rng.standard_normal((b, s, cfg.rope_head_dim))
    mask = rng.random((b, t, s)) < 0.6
    mask[..., 0] = True
    got = MLAttention(cfg).apply({"params": as_f32(p)}, jnp.asarray(q_c, jnp.float32), jnp.asarray(q_r, jnp.float32),
                                 {"c_kv": jnp.asarray(c_kv, jnp.float32), "k_r": jnp.asarray(k_r, jnp.float32)},
                                 jnp.asarray(mask), method=MLAttention.absorbed_attention)
    k_c = np.einsum("bsc,chd->bshd", c_kv, p["w_uk"])
    v = np.einsum("bsc,che->bshe", c_kv, p["w_uv"])
    logits = (np.einsum("bthd,bshd->bhts", q_c, k_c) + np.einsum("bthf,bsf->bhts", q_r, k_r)) * cfg.attn_scale
    logits = np.where(mask[:, None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bhts,bshe->bthe", w / w.sum(-1, keepdims=True), v)
    assert got.shape == (b, t, h, cfg.value_dim)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
