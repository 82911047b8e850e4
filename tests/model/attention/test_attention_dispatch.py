"""tpa_jax.model.attention.dispatch: what "auto" picks per backend and length (logged once), and the
one-line errors for an implementation the backend lacks or shapes it cannot take, raised while
tracing (before anything is compiled)."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpa_jax
from tpa_jax.model.attention import dispatch
from tpa_jax.model.attention.core import AttentionMask

from _util import cfg_of, init_params


def shapes(t, s=None, dtype=jnp.float32, d=8, e=8):
    s = t if s is None else s
    return (jax.ShapeDtypeStruct((2, t, 4, d), dtype), jax.ShapeDtypeStruct((2, s, 2, d), dtype),
            jax.ShapeDtypeStruct((2, s, 2, e), dtype))


@pytest.mark.parametrize("backend, t, dtype, want", [
    ("cpu", 16, jnp.float32, "xla"), ("cpu", 2047, jnp.bfloat16, "xla"), ("cpu", 2048, jnp.float32, "blocked"),
    ("tpu", 16, jnp.bfloat16, "splash"), ("tpu", 8192, jnp.float32, "splash"),
    # no NVIDIA device here, so cuDNN is refused and auto falls back as on a CPU
    ("gpu", 16, jnp.bfloat16, "xla"), ("gpu", 4096, jnp.bfloat16, "blocked")])
def test_auto_choice(backend, t, dtype, want):
    assert dispatch.resolve_impl("auto", *shapes(t, dtype=dtype), backend=backend) == want


def test_auto_logs_its_choice_once(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="tpa_jax.model.attention.dispatch"):
        for _ in range(3):
            dispatch.resolve_impl("auto", *shapes(4096), backend="cpu")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["attention_impl='auto' on backend 'cpu': blocked for 4096 queries (float32)"]


def test_cudnn_reasons_on_a_gpu():
    """What cuDNN refuses (checked without a GPU by handing the backend and compute capability in)."""
    q, _, v = shapes(16, dtype=jnp.float32)
    assert "bfloat16 or float16, got float32" in dispatch._cudnn_refusal("gpu", 9.0, q, v)
    q, _, v = shapes(16, dtype=jnp.bfloat16, d=136, e=64)
    assert "exceed cuDNN's 128" in dispatch._cudnn_refusal("gpu", 8.0, q, v)
    assert dispatch._cudnn_refusal("gpu", 9.0, q, v) is None  # Hopper takes up to 256
    assert "NVIDIA GPUs only" in dispatch._cudnn_refusal("cpu", None, q, v)


def one_line_error(fn, *match):
    with pytest.raises(ValueError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg and all(m in msg for m in match), msg


def test_cudnn_on_cpu_fails_while_tracing_the_model():
    cfg = cfg_of("gqa", attention_impl="cudnn")
    _, params = init_params(cfg_of("gqa"), randomize=False)
    tokens = jnp.zeros((1, 8), jnp.int32)
    one_line_error(lambda: jax.jit(tpa_jax.logits_fn(cfg)).trace(params, tokens),
                   "attention_impl='cudnn'", "backend 'cpu'", "NVIDIA GPUs only")


def test_splash_refusals():
    one_line_error(lambda: dispatch.resolve_impl("splash", *shapes(16), backend="gpu"),
                   "attention_impl='splash'", "backend 'gpu'", "TPU")
    q, k, v = (jnp.zeros(s.shape, s.dtype) for s in shapes(8, s=4))
    one_line_error(lambda: dispatch.attention(q, k, v, scale=1.0, mask=AttentionMask(jnp.arange(8)[None],
                                                                                      jnp.asarray([4])),
                                              impl="splash"),
                   "attention_impl='splash'", "backend 'cpu'", "T=8 queries, S=4 keys")
    one_line_error(lambda: dispatch.resolve_impl("fast", *shapes(8)), "attention_impl", "'fast'")


def test_one_token_decode_keeps_the_dense_path():
    """T == 1 (a decode step) is computed by core.attend whatever the setting (here blocked)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s.shape), jnp.float32) for s in shapes(1, s=6))
    mask = AttentionMask(jnp.asarray([[3], [5]]), jnp.asarray([4, 6]))
    jaxpr = str(jax.make_jaxpr(lambda *a: dispatch.attention(*a, scale=0.5, mask=mask, impl="blocked"))(q, k, v))
    assert "while" not in jaxpr and "custom_vjp" not in jaxpr
    want = dispatch.attend(q, k, v, scale=0.5, mask_BTS=mask.dense(1, 6))
    np.testing.assert_allclose(dispatch.attention(q, k, v, scale=0.5, mask=mask, impl="blocked"), want, rtol=1e-6)
