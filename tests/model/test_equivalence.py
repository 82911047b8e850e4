"""Section 4: MHA, MQA and GQA are non-contextual TPA (exact reproduction)."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax import Transformer
from tpa_jax.model.equivalence import head_factors, noncontextual_tpa_from_standard

from _util import BASE, forward, init_params, tokens


@pytest.mark.parametrize("fields", [dict(attention="mha"), dict(attention="mqa"),
                                    dict(attention="gqa", n_kv_head=2), dict(attention="gqa", n_kv_head=3),
                                    dict(attention="mha", attn_out_norm=True)])
def test_standard_attention_is_noncontextual_tpa(fields):
    cfg = dataclasses.replace(BASE, **fields)
    model, params = init_params(cfg)
    tok = tokens(cfg, seq=16)
    want = forward(model)(params, tok)
    tpa_cfg, tpa_params = noncontextual_tpa_from_standard(cfg, params)
    assert tpa_cfg.attention == "tpa" and not tpa_cfg.contextual_a
    assert (tpa_cfg.q_rank, tpa_cfg.k_rank) == (cfg.n_head, cfg.kv_heads)
    fwd = forward(Transformer(tpa_cfg))
    got = fwd(tpa_params, tok)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the TPA model really uses its head factors: perturbing one changes the output
    bad = dict(tpa_params, blocks=dict(tpa_params["blocks"], attn=dict(tpa_params["blocks"]["attn"])))
    bad["blocks"]["attn"]["a_k"] = bad["blocks"]["attn"]["a_k"] * 0.5
    assert float(jnp.abs(fwd(bad, tok) - want).max()) > 1e-3


def test_head_factors_are_scaled_group_masks():
    np.testing.assert_array_equal(head_factors(8, 2), 2 * np.array([[1, 1, 1, 1, 0, 0, 0, 0],
                                                                     [0, 0, 0, 0, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(head_factors(4, 4), 4 * np.eye(4))
    np.testing.assert_array_equal(head_factors(3, 1), np.ones((1, 3)))


def test_rejects_non_standard():
    with pytest.raises(ValueError, match="cfg.attention"):
        noncontextual_tpa_from_standard(BASE, {})
