"""Per-token decode time vs context length of every attention mechanism (paper Fig. 5, Figs. 7-8).

Pure functions behind ``python eval.py decode-bench`` and ``bench/decode.py``:

* :func:`run_decode_bench` -- times the model's real one-token decode step against a full cache and
  returns a JSON-ready dict (configuration, one entry per measured point, skipped points, ratios);
* :func:`model_config` -- the benchmark's ``ModelConfig`` of one mechanism;
* :func:`format_table` and :func:`plot` (from ``decode_report``) -- the result as text and figure.

Settings of the paper's figures (Sec. 6.2): d_h = 64, h = d_model / 64 for every mechanism, TPA
ranks (R_Q, R_K, R_V) = (16, 1, 1), GQA with 4 key/value groups, contexts 2^12 .. 2^19, batch sizes
1..16, d_model 1024 / 2048 / 3072.  The paper does not list MLA's latent sizes for these figures;
the default here scales App. I's worked example for d_model = 2048 (d_c = 256, d'_c = 768,
d^R_h = 32): ``d_c = d_model / 8``, ``d'_c = 3 d_model / 8``, ``d^R_h = d_h / 2`` (``mla_dims``
overrides them).

What one measured point is:

* A ``tpa_jax.ModelConfig`` with ``n_layer`` layers (default 1), a 256-token vocabulary and, by
  default, an MLP of width 8, so that the step time is the attention layer's (projections, cache
  read and output projection) -- the figures time the attention alone.  Weights are stored in the
  compute dtype, as for inference (``bench_weights.bench_params``: the model's init or a fill).
* The cache comes from ``tpa_jax.inference.init_cache(cfg, batch, S)``, its layer leaves are filled
  with pseudo-random values in [-1, 1) and ``lengths`` is ``S - 1`` for every sequence: the step
  writes the new token into the last slot and attends over all ``S`` positions (a full cache).
* The step is ``logits_fn(cfg)(params, tokens[B, 1], cache=cache)`` under ``jax.jit`` with the
  cache layers donated and ``inference.decode_compiler_options(cfg)``; the returned layers are fed
  back on every repetition, so no copy is made.
  After compiling and ``warmup`` untimed steps, the mechanisms of one (d_model, batch, context)
  point are timed interleaved (round robin, rotating order), ``reps`` steps each, each step ended
  by ``block_until_ready``.
* ``per_token_s`` is the median step time: one step emits one token for every sequence of the
  batch, which is the paper's "decoding time per token".  ``per_token_amortized_s`` is the step
  time divided by the batch size.
* ``cache_bytes`` is what one step reads from the cache:
  ``accounting.kv_cache_bytes_per_token(cfg, cache_dtype) * context * batch`` (checked against the
  bytes of the cache actually built; ``cache_dtype`` defaults to the compute dtype, ``"int8"``
  counts the float32 scales too).  ``cache_gb_per_s`` is ``cache_bytes / per_token_s
  / 1e9``; with a ``bandwidth`` (bytes/s) the memory-bound limit is ``cache_bytes / bandwidth``.
* The limit measured in the same run: ``limit_bytes`` = the cache's bytes plus the parameters'
  (``param_bytes``), what one step must read; ``limit_s`` is the median time of ``jnp.sum`` over a
  float32 buffer of that many bytes, timed interleaved with the steps; ``limit_gb_per_s`` =
  ``limit_bytes / limit_s / 1e9`` and ``x_limit = per_token_s / limit_s`` (1: the step streams
  its bytes as fast as a plain reduction).
* Ratios (per d_model, batch, context): ``"tpa/<mech>"`` = TPA's ``per_token_s`` over the other
  mechanism's (below 1: TPA is faster), and the same quotient of ``cache_bytes``.

Prefill (``result["prefill"]``, :mod:`tpa_jax.eval.prefill_bench`): TPA's cached prefill time per
token of ``prefill_lengths``-token prompts (default 4k and 16k), FlashTPA Alg. 1 against
``decode_impl="materialize"``, with the ratio ``"flash/materialize"``; ``prefill_only`` skips the
decode points.

Points whose cache would exceed ``memory_cap_gb`` GiB are not run; they are listed in ``skipped``
with the reason.  ``decode_impl="pallas"`` (the Pallas FlashTPA kernel) exists only for TPA with a
factorised query, so it times ``"tpa"`` alone: that is its default, and naming another mechanism
with it is refused before anything runs.
"""
from __future__ import annotations

import math
import statistics
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import accounting
from ..config import DECODE_IMPLS, DTYPES, ModelConfig
from ..inference import cache_bytes_per_token, decode_compiler_options, init_cache
from ..model import logits_fn
from ..model.attention.quant import cache_dtype as check_cache_dtype
from .bench_timing import compile_timed, environment, time_interleaved
from .bench_weights import PARAM_INITS, bench_params, filled_like, nbytes
from .decode_report import TARGET, format_table, plot  # noqa: F401 (format_table, plot re-exported)
from .kv_report import GIB
from .prefill_bench import PREFILL_IMPLS, check_prefill, run_prefill

__all__ = ["MECHANISMS", "PALLAS_MECHANISMS", "run_decode_bench", "model_config", "format_table", "plot"]

MECHANISMS = ("mha", "mqa", "gqa", "mla", "tpa")


# ---------------------------------------------------------------------------------------------
# configuration
def default_mla_dims(d_model: int, head_dim: int) -> tuple[int, int, int]:
    """(d'_c, d_c, d^R_h) = (3 d_model / 8, d_model / 8, d_h / 2): App. I's d_model = 2048 example."""
    return max(1, 3 * d_model // 8), max(1, d_model // 8), max(2, 2 * (head_dim // 4))


def model_config(mechanism: str, d_model: int, *, head_dim: int = 64, n_layer: int = 1,
                 dtype: str = "bfloat16", param_dtype: Optional[str] = None, max_seq_len: int = 2 ** 15,
                 decode_impl: str = "flash", vocab_size: int = 256, mlp_hidden: Optional[int] = 8,
                 tpa_ranks: Sequence[int] = (16, 1, 1), gqa_groups: int = 4,
                 mla_dims: Optional[Sequence[int]] = None) -> ModelConfig:
    """The benchmark's ModelConfig of one mechanism: ``h = d_model / head_dim`` heads for all."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism: expected one of {MECHANISMS}, got {mechanism!r}")
    if d_model % head_dim:
        raise ValueError(f"d_model: expected a multiple of head_dim={head_dim}, got {d_model}")
    n_head = d_model // head_dim
    kw = dict(vocab_size=vocab_size, n_layer=n_layer, d_model=d_model, n_head=n_head, head_dim=head_dim,
              attention=mechanism, compute_dtype=dtype, param_dtype=param_dtype or dtype,
              max_seq_len=max_seq_len, decode_impl=decode_impl, mlp_hidden=mlp_hidden)
    if mechanism == "tpa":
        if len(tuple(tpa_ranks)) != 3:
            raise ValueError(f"tpa_ranks: expected (R_Q, R_K, R_V), got {tpa_ranks!r}")
        kw.update(zip(("q_rank", "k_rank", "v_rank"), tpa_ranks))
    elif mechanism == "gqa":
        if n_head % gqa_groups:
            raise ValueError(f"gqa_groups: expected a divisor of n_head={n_head} (d_model={d_model}), "
                             f"got {gqa_groups}")
        kw["n_kv_head"] = gqa_groups
    elif mechanism == "mla":
        dims = tuple(mla_dims) if mla_dims is not None else default_mla_dims(d_model, head_dim)
        if len(dims) != 3:
            raise ValueError(f"mla_dims: expected (q_lora_rank, kv_lora_rank, rope_head_dim), got {mla_dims!r}")
        kw.update(q_lora_rank=dims[0], kv_lora_rank=dims[1], rope_head_dim=dims[2], v_head_dim=head_dim)
    return ModelConfig(**kw)


def _pallas_covers(mechanism: str) -> bool:
    """Whether ``ModelConfig`` (where the rule lives) accepts ``decode_impl="pallas"`` for ``mechanism``."""
    try:
        model_config(mechanism, 64, head_dim=16, gqa_groups=1, decode_impl="pallas")
    except ValueError:
        return False
    return True


PALLAS_MECHANISMS = tuple(m for m in MECHANISMS if _pallas_covers(m))  # ("tpa",): TPA with a factorised query


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _int_tuple(name: str, values, minimum: int = 1) -> tuple:
    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        values = (values,)
    values = tuple(values)
    if not values:
        raise ValueError(f"{name}: expected at least one value")
    for v in values:
        _check_int(name, v, minimum)
    return tuple(dict.fromkeys(int(v) for v in values))


# ---------------------------------------------------------------------------------------------
# one measured point
def _make_step(cfg: ModelConfig):
    logits = logits_fn(cfg)

    def step(params, layers, lengths, tokens):
        out, cache = logits(params, tokens, cache={"lengths": lengths, "layers": layers})
        return out, cache["layers"]

    return jax.jit(step, donate_argnums=(1,), compiler_options=decode_compiler_options(cfg))


class _Run:
    """One mechanism at one (d_model, batch, context) point: compiled step, donated cache, timings."""

    def __init__(self, cfg: ModelConfig, params, batch: int, context: int, warmup: int, seed: int, cache_dtype: str):
        abstract = jax.eval_shape(lambda: init_cache(cfg, batch, context, dtype=cache_dtype))
        self.measured_bytes_per_token, self.cache_dtype = cache_bytes_per_token(abstract), cache_dtype
        self.layers = filled_like(abstract["layers"], seed=seed)
        self.lengths = jnp.full((batch,), context - 1, jnp.int32)  # full cache: the step fills slot S-1
        self.tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, 1)), jnp.int32)
        self.params = params
        self.step, self.compile_s = compile_timed(_make_step(cfg), params, self.layers, self.lengths, self.tokens)
        # the memory-bound limit measured here: one reduction streaming as many bytes as a step must read
        self.limit_bytes = self.measured_bytes_per_token * batch * context + nbytes(params)
        self.stream = jnp.ones((-(-self.limit_bytes // 4),), jnp.float32)
        self.sum, _ = compile_timed(jax.jit(jnp.sum), self.stream)
        for _ in range(warmup):
            self.run_once()
            self.stream_once()

    def run_once(self):
        """One step; returns what to block on (the logits and the new cache layers)."""
        logits, self.layers = self.step(self.params, self.layers, self.lengths, self.tokens)
        return logits, self.layers

    def stream_once(self):
        """One read of a buffer of the step's bytes (cache + parameters): the limit of this point."""
        return self.sum(self.stream)


# ---------------------------------------------------------------------------------------------
# the benchmark
def _check_mechanisms(mechanisms, decode_impl: str) -> tuple:
    if decode_impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl: expected one of {DECODE_IMPLS}, got {decode_impl!r}")
    if mechanisms is None:
        return PALLAS_MECHANISMS if decode_impl == "pallas" else MECHANISMS
    if isinstance(mechanisms, str):
        mechanisms = (mechanisms,)
    mechanisms = tuple(dict.fromkeys(mechanisms))
    unknown = [m for m in mechanisms if m not in MECHANISMS]
    if unknown or not mechanisms:
        raise ValueError(f"mechanisms: expected some of {MECHANISMS}, got {list(mechanisms)}")
    if decode_impl == "pallas":
        other = [m for m in mechanisms if m not in PALLAS_MECHANISMS]
        if other:
            raise ValueError(f"decode_impl='pallas': the Pallas decode kernel covers only {list(PALLAS_MECHANISMS)}, "
                             f"not {other}; time those with decode_impl='flash'")
    return mechanisms


def _check_number(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")


def _entry(run: _Run, cfg: ModelConfig, times: list, limit_times: list, cache_bytes: int, param_bytes: int,
           batch: int, context: int, bandwidth: Optional[float]) -> dict:
    med, limit = statistics.median(times), statistics.median(limit_times)
    e = dict(mechanism=cfg.attention, d_model=cfg.d_model, n_head=cfg.n_head, kv_heads=cfg.kv_heads,
             head_dim=cfg.head_dim, batch=batch, context=context, cache_dtype=run.cache_dtype, median_s=med,
             min_s=min(times), per_token_s=med,
             per_token_amortized_s=med / batch, times_s=list(times),
             kv_numbers_per_token_per_layer=accounting.kv_cache_per_token(cfg),
             cache_bytes_per_token=run.measured_bytes_per_token, cache_bytes=cache_bytes,
             cache_gb_per_s=cache_bytes / med / 1e9, param_bytes=param_bytes, compile_s=run.compile_s,
             limit_bytes=run.limit_bytes, limit_s=limit, limit_times_s=list(limit_times),
             limit_gb_per_s=run.limit_bytes / limit / 1e9, x_limit=med / limit)
    if bandwidth is not None:
        e["memory_bound_s"] = cache_bytes / bandwidth
        e["fraction_of_memory_bound"] = e["memory_bound_s"] / med
    return e


def _ratio_row(mechanisms: tuple, point: dict, point_bytes: dict, d_model: int, batch: int, context: int) -> dict:
    """TPA's time and cache bytes over each other mechanism's at one point (a time needs both timed)."""
    t = point.get(TARGET)
    row = dict(d_model=d_model, batch=batch, context=context, time={}, cache_bytes={})
    for m in mechanisms:
        if m == TARGET:
            continue
        key = f"{TARGET}/{m}"
        row["cache_bytes"][key] = point_bytes[TARGET] / point_bytes[m]
        if t is not None and m in point:
            row["time"][key] = t["per_token_s"] / point[m]["per_token_s"]
    return row


def run_decode_bench(*, d_models=(1024, 2048), batch_sizes=(1, 4), min_log2: int = 10, max_log2: int = 15,
                     mechanisms=None, n_layer: int = 1, head_dim: int = 64, dtype: str = "auto",
                     param_dtype: Optional[str] = None, reps: int = 10, warmup: int = 2,
                     decode_impl: str = "flash", bandwidth: Optional[float] = None, memory_cap_gb: float = 4.0,
                     vocab_size: int = 256, mlp_hidden: Optional[int] = 8, tpa_ranks=(16, 1, 1),
                     gqa_groups: int = 4, mla_dims=None, param_init: str = "model",
                     prefill_lengths=(4096, 16384), prefill_chunk: int = 1024, prefill_reps: int = 3,
                     prefill_only: bool = False, progress: bool = False, cache_dtype: Optional[str] = None) -> dict:
    """Time one-token decode steps of each mechanism at contexts ``2**min_log2 .. 2**max_log2``.

    Returns ``{"benchmark", "paper", "config", "entries", "skipped", "ratios"}`` (see the module
    docstring for every definition).  ``mechanisms``: default all of ``MECHANISMS`` (``"tpa"`` alone
    with ``decode_impl="pallas"``).  ``param_init="model"`` initialises the weights with the model's
    own init; ``"fast"`` fills the same shapes with pseudo-random values (faster to compile on CPU;
    the values do not change the speed).  ``cache_dtype``: the decode cache's (default ``dtype``; float32,
    bfloat16, float16 or int8).  Raises ``ValueError`` on bad input before anything is run.
    """
    d_models = _int_tuple("d_models", d_models)
    batch_sizes = _int_tuple("batch_sizes", batch_sizes)
    _check_int("min_log2", min_log2, 0)
    _check_int("max_log2", max_log2, 0)
    if min_log2 > max_log2:
        raise ValueError(f"min_log2: expected <= max_log2={max_log2}, got {min_log2}")
    if max_log2 > 30:
        raise ValueError(f"max_log2: expected <= 30, got {max_log2}")
    mechanisms = _check_mechanisms(mechanisms, decode_impl)
    _check_int("n_layer", n_layer, 1)
    _check_int("head_dim", head_dim, 2)
    _check_int("reps", reps, 1)
    _check_int("warmup", warmup, 0)
    if dtype == "auto":  # bf16 matmuls are emulated (slow) on CPU: time the dtype the backend runs natively
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected 'auto' or one of {DTYPES}, got {dtype!r}")
    cache_dtype = check_cache_dtype(dtype if cache_dtype is None else cache_dtype).name
    if param_init not in PARAM_INITS:
        raise ValueError(f"param_init: expected one of {PARAM_INITS}, got {param_init!r}")
    if bandwidth is not None:
        _check_number("bandwidth", bandwidth)
    _check_number("memory_cap_gb", memory_cap_gb)
    prefill_lengths = () if prefill_lengths in ((), [], None) else _int_tuple("prefill_lengths", prefill_lengths)
    _check_int("prefill_chunk", prefill_chunk, 1)
    _check_int("prefill_reps", prefill_reps, 1)
    check_prefill(prefill_lengths, prefill_chunk)
    if prefill_only and (TARGET not in mechanisms or not prefill_lengths):
        raise ValueError(f"prefill_only: times {TARGET!r}'s prefill; needs it among the mechanisms and at least one "
                         f"prefill length")

    contexts = [2 ** k for k in range(min_log2, max_log2 + 1)]
    itemsize = jnp.dtype(dtype).itemsize
    cap_bytes = int(memory_cap_gb * GIB)
    # every config is built (and so validated) before anything runs
    cfgs = {d: {m: model_config(m, d, head_dim=head_dim, n_layer=n_layer, dtype=dtype, param_dtype=param_dtype,
                                max_seq_len=contexts[-1], decode_impl=decode_impl, vocab_size=vocab_size,
                                mlp_hidden=mlp_hidden, tpa_ranks=tpa_ranks, gqa_groups=gqa_groups,
                                mla_dims=mla_dims)
                for m in mechanisms}
            for d in d_models}

    entries, skipped, ratios = [], [], []
    for d in () if prefill_only else d_models:
        params, param_bytes = {}, {}
        for b in batch_sizes:
            for s in contexts:
                runs, point_bytes = {}, {}
                for m in mechanisms:
                    cfg = cfgs[d][m]
                    per_token = accounting.kv_cache_bytes_per_token(cfg, cache_dtype)
                    point_bytes[m] = per_token * s * b
                    if point_bytes[m] > cap_bytes:
                        skipped.append(dict(mechanism=m, d_model=d, n_head=cfg.n_head, batch=b, context=s,
                                            cache_bytes=point_bytes[m],
                                            reason=f"cache of {point_bytes[m]} bytes exceeds the memory cap of "
                                                   f"{cap_bytes} bytes ({memory_cap_gb:g} GiB)"))
                        continue
                    if m not in params:
                        params[m] = bench_params(cfg, param_init)
                        param_bytes[m] = nbytes(params[m])
                    run = _Run(cfg, params[m], b, s, warmup, seed=len(entries) + len(runs) + 1, cache_dtype=cache_dtype)
                    if run.measured_bytes_per_token * s * b != point_bytes[m]:
                        raise RuntimeError(
                            f"{m}: cache built by init_cache holds {run.measured_bytes_per_token} bytes per "
                            f"token, accounting.kv_cache_bytes_per_token gives {per_token}")
                    runs[m] = run
                steps = {}
                for m, run in runs.items():
                    steps.update({m: run.run_once, f"{m}:limit": run.stream_once})
                times = time_interleaved(steps, reps)
                point = {}
                for m, run in runs.items():
                    e = _entry(run, cfgs[d][m], times[m]["wall"], times[f"{m}:limit"]["wall"], point_bytes[m],
                               param_bytes[m], b, s, bandwidth)
                    entries.append(e)
                    point[m] = e
                    if progress:
                        print(f"decode-bench d_model={d} batch={b} context={s} {m}: {1e3 * e['median_s']:.3f} "
                              f"ms/step, {e['x_limit']:.2f}x the limit {1e3 * e['limit_s']:.3f} ms "
                              f"(compile {run.compile_s:.1f} s)", file=sys.stderr, flush=True)
                del runs
                if TARGET in mechanisms:
                    ratios.append(_ratio_row(mechanisms, point, point_bytes, d, b, s))
        del params
    prefill = dict(lengths=list(prefill_lengths), chunk=prefill_chunk, reps=prefill_reps, batch=1,
                   impls=list(PREFILL_IMPLS), entries=[], skipped=[], ratios=[])
    for d in d_models if TARGET in mechanisms and prefill_lengths else ():
        cfg_of = lambda impl: model_config(  # noqa: E731
            TARGET, d, head_dim=head_dim, n_layer=n_layer, dtype=dtype, param_dtype=param_dtype,
            max_seq_len=max(prefill_lengths), decode_impl=impl, vocab_size=vocab_size, mlp_hidden=mlp_hidden,
            tpa_ranks=tpa_ranks)
        got = run_prefill(cfg_of, bench_params(cfg_of("flash"), param_init), prompts=prefill_lengths,
                          chunk=prefill_chunk, reps=prefill_reps, warmup=min(warmup, 1), cap_bytes=cap_bytes)
        for key, part in zip(("entries", "skipped", "ratios"), got):
            prefill[key] += part
        if progress:
            for e in got[0]:
                print(f"decode-bench prefill d_model={d} prompt={e['prompt']} {e['prefill_impl']}: "
                      f"{1e6 * e['per_token_s']:.2f} us/token", file=sys.stderr, flush=True)

    mla = default_mla_dims(d_models[0], head_dim) if mla_dims is None else tuple(mla_dims)
    config = dict(d_models=list(d_models), n_heads={str(d): d // head_dim for d in d_models},
                  batch_sizes=list(batch_sizes), contexts=contexts, min_log2=min_log2, max_log2=max_log2,
                  mechanisms=list(mechanisms), n_layer=n_layer, head_dim=head_dim, dtype=dtype,
                  dtype_bytes=itemsize, cache_dtype=cache_dtype, param_dtype=param_dtype or dtype, reps=reps,
                  warmup=warmup,
                  decode_impl=decode_impl, bandwidth_bytes_per_s=bandwidth, memory_cap_gb=memory_cap_gb,
                  memory_cap_bytes=cap_bytes, vocab_size=vocab_size, mlp_hidden=mlp_hidden,
                  tpa_ranks=list(tpa_ranks), gqa_groups=gqa_groups,
                  mla_dims=("3*d_model/8, d_model/8, head_dim/2" if mla_dims is None else list(mla_dims)),
                  mla_dims_first_d_model=dict(q_lora_rank=mla[0], kv_lora_rank=mla[1], rope_head_dim=mla[2]),
                  param_init=param_init, timing="median of reps one-token steps, mechanisms interleaved",
                  prefill_only=prefill_only,
                  **environment())
    return dict(benchmark="decode_per_token", paper="Fig. 5 (Sec. 6.2), Figs. 7-8 (App. B)", config=config,
                entries=entries, skipped=skipped, ratios=ratios, prefill=prefill)
