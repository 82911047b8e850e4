"""Prefill time per token of TPA's cached prefill: FlashTPA Alg. 1 (``decode_impl="flash"``, K and
V never formed) against the materialising path (``"materialize"``: K and V rebuilt from the factor
cache, then softmax attention), for the decode benchmark (``tpa_jax.eval.decode_bench``).

What one measured point is (one d_model, one prompt length P, batch 1):

* The benchmark's TPA ``ModelConfig`` (``decode_bench.model_config``) with each ``decode_impl``, an
  empty cache of exactly P rows, and the prompt fed as P / C chunks of C tokens
  (``prefill_chunk``), each a call of the jitted model step ``logits_fn(cfg)(params, chunk,
  cache=cache)`` with the cache layers donated -- the first chunk fills an empty cache, every
  later chunk attends to the rows the earlier ones wrote.  Both impls run the same chunks, so the
  materialising path's [C, P] logits per head stay bounded (one whole 16k prompt would need
  16k x 16k x heads floats).
* ``per_token_s``: median seconds of the whole prompt (every chunk, ended by
  ``block_until_ready``) divided by P; the impls of one point are timed interleaved.
* ``temp_bytes``: XLA's temporary buffers of the compiled chunk step
  (``compiled.memory_analysis()``).  A point whose temporaries exceed the memory cap is skipped
  (listed with the reason), before it runs.
* ratios: ``"flash/materialize"`` of ``per_token_s`` (below 1: Alg. 1 faster) and of ``temp_bytes``.
"""
from __future__ import annotations

import statistics
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..inference import init_cache
from ..model import logits_fn
from .bench_timing import compile_timed, time_interleaved
from .bench_weights import filled_like

__all__ = ["PREFILL_IMPLS", "PREFILL_KEY", "check_prefill", "run_prefill"]

PREFILL_IMPLS = ("flash", "materialize")
PREFILL_KEY = "flash/materialize"


def check_prefill(lengths: tuple, chunk: int) -> None:
    """One-line errors for prompt lengths the chunk size does not divide."""
    bad = [p for p in lengths if p % min(chunk, p)]
    if bad:
        raise ValueError(f"prefill_chunk: expected a divisor of every prefill length, {chunk} does not divide {bad}")


def _make_step(cfg: ModelConfig):
    logits = logits_fn(cfg)

    def step(params, layers, lengths, tokens):
        out, cache = logits(params, tokens, cache={"lengths": lengths, "layers": layers})
        return out, cache["layers"], cache["lengths"]

    return jax.jit(step, donate_argnums=(1,))


class _Prefill:
    """One impl at one prompt length: the compiled chunk step and a donated cache carried between runs."""

    def __init__(self, cfg: ModelConfig, params, prompt: int, chunk: int, seed: int):
        abstract = jax.eval_shape(lambda: init_cache(cfg, 1, prompt))
        self.layers = filled_like(abstract["layers"], seed=seed)
        rng = np.random.default_rng(seed)
        self.chunks = [jnp.asarray(rng.integers(0, cfg.vocab_size, (1, chunk)), jnp.int32)
                       for _ in range(prompt // chunk)]
        self.params = params
        self.zero = jnp.zeros((1,), jnp.int32)
        self.step, self.compile_s = compile_timed(_make_step(cfg), params, self.layers, self.zero, self.chunks[0])
        mem = self.step.memory_analysis()
        self.temp_bytes = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0

    def run_once(self):
        """The whole prompt, chunk by chunk, from an empty cache; returns what to block on."""
        lengths, logits = self.zero, None
        for tokens in self.chunks:
            logits, self.layers, lengths = self.step(self.params, self.layers, lengths, tokens)
        return logits, self.layers


def run_prefill(cfg_of: Callable[[str], ModelConfig], params, *, prompts: tuple, chunk: int, reps: int,
                warmup: int, cap_bytes: int, seed: int = 0) -> tuple[list, list, list]:
    """Time the chunked prefill of each prompt length with both impls; ``cfg_of(impl)`` is the
    benchmark's TPA config with that ``decode_impl`` and ``max_seq_len >= max(prompts)``.
    Returns (entries, skipped, ratios) as the module docstring defines them."""
    entries, skipped, ratios = [], [], []
    for prompt in prompts:
        c = min(chunk, prompt)
        runs = {}
        for impl in PREFILL_IMPLS:
            cfg = cfg_of(impl)
            run = _Prefill(cfg, params, prompt, c, seed=seed + len(entries) + len(runs) + 1)
            if run.temp_bytes > cap_bytes:
                skipped.append(dict(prefill_impl=impl, d_model=cfg.d_model, prompt=prompt, chunk=c,
                                    temp_bytes=run.temp_bytes,
                                    reason=f"temporaries of {run.temp_bytes} bytes exceed the memory cap of "
                                           f"{cap_bytes} bytes"))
                continue
            for _ in range(warmup):
                jax.block_until_ready(run.run_once())
            runs[impl] = run
        times = time_interleaved({impl: run.run_once for impl, run in runs.items()}, reps)
        point = {}
        for impl, run in runs.items():
            cfg, wall = cfg_of(impl), times[impl]["wall"]
            med = statistics.median(wall)
            point[impl] = dict(mechanism=cfg.attention, prefill_impl=impl, d_model=cfg.d_model, n_head=cfg.n_head,
                               head_dim=cfg.head_dim, batch=1, prompt=prompt, chunk=c, n_chunks=prompt // c,
                               median_s=med, min_s=min(wall), per_token_s=med / prompt, times_s=list(wall),
                               temp_bytes=run.temp_bytes, compile_s=run.compile_s)
            entries.append(point[impl])
        del runs
        row = dict(d_model=cfg_of(PREFILL_IMPLS[0]).d_model, batch=1, prompt=prompt, chunk=c, time={}, temp_bytes={})
        if len(point) == 2:
            f, m = point["flash"], point["materialize"]
            row["time"][PREFILL_KEY] = f["per_token_s"] / m["per_token_s"]
            if m["temp_bytes"]:
                row["temp_bytes"][PREFILL_KEY] = f["temp_bytes"] / m["temp_bytes"]
        ratios.append(row)
    return entries, skipped, ratios
