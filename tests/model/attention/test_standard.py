"""tpa_jax.model.attention.standard: MHA, MQA and GQA layers against explicit float64 NumPy
(RoPE'd q and k, query head h reading kv head h // G, causal softmax, W_O)."""
import numpy as np
import pytest

from tpa_jax.model.attention import StandardAttention

from _util import cfg_of
from model_reference import causal_softmax_attention, init_layer, rotation_matrix, run_layer


def reference_standard(cfg, p, x):
    t_len, m = x.shape
    h, kv, d = cfg.n_head, cfg.kv_heads, cfg.head_dim
    rot = [rotation_matrix(t, d) for t in range(t_len)]
    q = np.stack([(x[t] @ p["w_q"].reshape(m, h * d)).reshape(h, d) @ rot[t] for t in range(t_len)])
    k = np.stack([(x[t] @ p["w_k"].reshape(m, kv * d)).reshape(kv, d) @ rot[t] for t in range(t_len)])
    v = (x @ p["w_v"].reshape(m, kv * cfg.value_dim)).reshape(t_len, kv, cfg.value_dim)
    group = np.arange(h) // (h // kv)  # the kv head of each query head
    out = causal_softmax_attention(q, k[:, group], v[:, group], 1 / np.sqrt(d))
    return np.einsum("the,hem->tm", out, p["w_o"])


@pytest.mark.parametrize("name", ["mha", "mqa", "gqa"])
def test_layer_matches_explicit_formula(name):
    cfg = cfg_of(name)
    p = init_layer(StandardAttention, cfg)
    assert p["w_k"].shape[1] == {"mha": cfg.n_head, "mqa": 1, "gqa": 3}[name]
    x = np.random.default_rng(1).standard_normal((9, cfg.d_model))
    want = reference_standard(cfg, p, x)
    np.testing.assert_allclose(run_layer(StandardAttention, cfg, p, x), want, rtol=2e-4, atol=2e-5)
    assert np.abs(want).max() > 1e-2
