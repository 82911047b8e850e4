"""What a decode cache's dtype costs in quality: teacher-forced decoding through the cache.

    run = tpa_jax.load("runs/t6-tiny")
    cache_quality(run, cache_dtypes=("float32", "int8"))   # loss / ppl through each cache, max |d logits|

Teacher-forced decoding scores a window of tokens the way generation reads them: the first token
is prefilled into an empty cache of the chosen dtype, then every later token goes through a
one-token decode step, each step attending to the history as the cache holds it (an int8 cache's
dequantised factors, K/V or latents).  The logits of the steps score the next tokens, exactly as
the plain forward's do, so with a float32 cache the loss equals the forward's (up to float
rounding) and any difference with another dtype is what that cache costs.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ..data.pipeline import eval_batches, resolve_manifest
from ..data.shards import check_compatible, load_manifest
from ..inference import init_cache
from ..model import logits_fn
from ..model.attention.quant import cache_dtype

__all__ = ["decode_logits", "cache_quality"]


@functools.lru_cache(maxsize=None)
def _decode_fn(cfg, cache_dtype: str):
    apply = logits_fn(cfg)

    @jax.jit
    def run(params, tokens_BT):
        b, t = tokens_BT.shape
        cache = init_cache(cfg, b, t, dtype=cache_dtype)
        first, cache = apply(params, tokens_BT[:, :1], cache=cache)

        def step(cache, token_B):
            out, cache = apply(params, token_B[:, None], cache=cache)
            return cache, out[:, 0]

        _, rest_TBV = jax.lax.scan(step, cache, tokens_BT[:, 1:].T)
        return jnp.concatenate([first, rest_TBV.transpose(1, 0, 2)], axis=1).astype(jnp.float32)

    return run


def decode_logits(cfg, params, tokens_BT: jax.Array, cache_dtype: str) -> jax.Array:
    """float32 logits [B, T, V] of teacher-forced decoding: token 0 prefilled into an empty cache of
    ``cache_dtype`` (T rows), tokens 1..T-1 one decode step each."""
    return _decode_fn(cfg, str(jnp.dtype(cache_dtype)))(params, jnp.asarray(tokens_BT, jnp.int32))


def _scored(logits_BTV: jax.Array, targets_BT: np.ndarray) -> tuple[float, int]:
    """(summed next-token loss over targets != -1, their count), float64 on the host."""
    logp = np.asarray(jax.nn.log_softmax(logits_BTV, axis=-1), np.float64)
    keep = targets_BT != -1
    picked = np.take_along_axis(logp, np.where(keep, targets_BT, 0)[..., None], axis=-1)[..., 0]
    return float(-(picked * keep).sum()), int(keep.sum())


def cache_quality(run, manifest: Union[str, dict, None] = None, *, cache_dtypes: Sequence[str] = ("float32", "int8"),
                  split: str = "val", seq_len: Optional[int] = None, batch_size: int = 8,
                  max_batches: Optional[int] = 4) -> dict:
    """Teacher-forced decoding of ``split`` (default: the run's own data) through a cache of each of
    ``cache_dtypes``: {"rows": {dtype: {"loss", "ppl", "ppl_change", "max_abs_dlogits"}}, ...}.
    ``ppl_change`` is the relative perplexity change and ``max_abs_dlogits`` the largest logit
    difference, both against the first dtype (the reference, float32 by default)."""
    if not cache_dtypes:
        raise ValueError("cache_quality: cache_dtypes is empty; expected at least the reference dtype")
    names = [str(cache_dtype(d)) for d in cache_dtypes]  # every dtype checked before any scoring
    tcfg = run.train_config
    seq_len = int(seq_len or tcfg.data.seq_len)
    man = resolve_manifest(tcfg.data) if manifest is None else load_manifest(manifest)
    check_compatible(man, run.config.vocab_size, seq_len, run.config.max_seq_len)
    ref_name = names[0]
    sums = {name: [0.0, 0, 0.0] for name in names}  # loss sum, count, max |d logits|
    t0, batches = time.time(), 0
    for batch in eval_batches(man, seq_len, batch_size, max_batches, split=split):
        targets = np.asarray(batch["targets"])
        ref = None
        for name in sums:
            logits = decode_logits(run.config, run.params, batch["inputs"], name)
            s, n = _scored(logits, targets)
            ref = logits if ref is None else ref
            sums[name][0] += s
            sums[name][1] += n
            sums[name][2] = max(sums[name][2], float(jnp.abs(logits - ref).max()))
        batches += 1
    rows = {}
    for name, (s, n, d) in sums.items():
        loss = s / max(n, 1)
        rows[name] = {"loss": loss, "ppl": float(math.exp(min(loss, 50.0))), "tokens": n, "max_abs_dlogits": d}
    for row in rows.values():
        row["ppl_change"] = row["ppl"] / rows[ref_name]["ppl"] - 1.0
    return {"rows": rows, "reference": ref_name, "mechanism": run.config.attention, "seq_len": seq_len,
            "batch_size": batch_size, "batches": batches, "split": split, "step": run.step,
            "seconds": time.time() - t0}
