"""The Pallas FlashTPA decode kernel lowers for real devices from a CPU host: ``jax.export`` with
``platforms=("tpu",)`` builds the Mosaic kernel (a ``tpu_custom_call``) for the kernel alone and
for a whole cached one-token T6 decode step with ``decode_impl="pallas"``; for ``("cuda",)`` the
default mode lowers the documented fallback (the jnp FlashTPA, no custom call).

These prove the Pallas -> Mosaic lowering and the Pallas TPU block-shape checks; Mosaic's own
compilation of the kernel runs only on a TPU."""
import functools

import jax
import jax.numpy as jnp
import pytest

import tpa_jax
from tpa_jax import configs
from tpa_jax.inference.cache import init_cache
from tpa_jax.model.attention.kernels import flashtpa_decode_pallas

B, S = 2, 40
KERNEL = "tpu_custom_call"


def _structs(rq, rk, rv, h, d, e, dtype):
    shapes = [(B, rq, h), (B, rq, d), (B, S, rk, h), (B, S, rk, d), (B, S, rv, h), (B, S, rv, e)]
    return [jax.ShapeDtypeStruct(sh, dtype) for sh in shapes] + [jax.ShapeDtypeStruct((B,), jnp.int32)]


def _export(fn, platform, *structs):
    return jax.export.export(jax.jit(fn), platforms=(platform,))(*structs)


# (R_Q, R_K, R_V, H, D, E): the paper's head counts, odd ranks, and a block of all S (64 > 40)
SHAPES = [((6, 2, 2, 34, 64, 64), 16, jnp.float32), ((1, 1, 1, 47, 8, 6), 8, jnp.bfloat16),
          ((16, 1, 1, 61, 4, 10), 64, jnp.float32), ((3, 3, 5, 78, 8, 5), 8, jnp.bfloat16)]


@pytest.mark.parametrize("ranks, block, dtype", SHAPES)
def test_kernel_exports_for_tpu(ranks, block, dtype):
    """interpret=False and the default mode both lower to one Mosaic kernel for TPU."""
    rq, rk, rv, h, d, e = ranks
    for interpret in (False, None):
        fn = functools.partial(flashtpa_decode_pallas, q_rank=rq, k_rank=rk, v_rank=rv, scale=0.125,
                               block_size=block, interpret=interpret)
        exported = _export(fn, "tpu", *_structs(*ranks, dtype))
        assert exported.mlir_module().count(KERNEL) == 1
        assert exported.out_avals[0].shape == (B, h, e) and exported.out_avals[0].dtype == dtype


def test_default_mode_falls_back_to_jnp_flashtpa_on_gpu():
    """No Triton form is written: lowered for CUDA, the default mode is the jnp FlashTPA (no custom
    call), while interpret=False is Mosaic-only and does not lower for CUDA."""
    ranks = (6, 2, 2, 34, 8, 8)
    structs = _structs(*ranks, jnp.float32)
    kw = dict(q_rank=6, k_rank=2, v_rank=2, scale=0.125, block_size=16)
    exported = _export(functools.partial(flashtpa_decode_pallas, **kw), "cuda", *structs)
    text = exported.mlir_module()
    assert "custom_call" not in text and exported.out_avals[0].shape == (B, 34, 8)
    with pytest.raises(ValueError):
        _export(functools.partial(flashtpa_decode_pallas, **kw, interpret=False), "cuda", *structs)


def _t6_decode_step(**fields):
    cfg = configs.get("t6-tiny", compute_dtype="float32", decode_impl="pallas", decode_block_size=16, **fields)
    params = jax.eval_shape(lambda: tpa_jax.init_params(cfg, jax.random.key(0)))
    cache = jax.eval_shape(lambda: init_cache(cfg, B, S))
    step = lambda p, t, c: tpa_jax.logits_fn(cfg)(p, t, cache=c)  # noqa: E731
    return cfg, step, (params, jax.ShapeDtypeStruct((B, 1), jnp.int32), cache)


def test_t6_decode_step_exports_for_tpu_with_the_kernel():
    """One cached one-token forward of a tiny T6 (layers scanned): the TPU export holds the Mosaic
    kernel; the CPU and CUDA exports hold none (interpreter / jnp FlashTPA)."""
    cfg, step, structs = _t6_decode_step()
    exported = _export(step, "tpu", *structs)
    assert exported.mlir_module().count(KERNEL) == 1  # one scanned layer body
    logits_aval, cache_avals = exported.out_avals[0], exported.out_avals[1:]
    assert logits_aval.shape == (B, 1, cfg.vocab_size) and len(cache_avals) == 1 + 4  # lengths + 4 factor leaves
    for platform in ("cpu", "cuda"):
        assert KERNEL not in _export(step, platform, *structs).mlir_module()

