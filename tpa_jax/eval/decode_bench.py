"""Per-token decode time vs context length of every attention mechanism (paper Fig. 5, Figs. 7-8).

Pure functions behind ``python eval.py decode-bench`` and ``bench/decode.py``:

* :func:`run_decode_bench` -- times the model's real one-token decode step against a full cache and
  returns a JSON-ready dict (configuration, one entry per measured point, skipped points, ratios);
* :func:`format_table` -- that dict as text (ms per step per mechanism and TPA's ratios);
* :func:`plot` -- log2(time per token) vs log2(context length), one panel per d_model (Agg).

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
  compute dtype, as for inference.
* The cache comes from ``tpa_jax.inference.init_cache(cfg, batch, S)``, its layer leaves are filled
  with pseudo-random values in [-1, 1) and ``lengths`` is ``S - 1`` for every sequence: the step
  writes the new token into the last slot and attends over all ``S`` positions (a full cache).
* The step is ``model.apply({"params": p}, tokens[B, 1], cache=cache)`` under ``jax.jit`` with the
  cache layers donated; the returned layers are fed back on every repetition, so no copy is made.
  After compiling and ``warmup`` untimed steps, the mechanisms of one (d_model, batch, context)
  point are timed interleaved (round robin, rotating order), ``reps`` steps each, each step ended
  by ``block_until_ready``.
* ``per_token_s`` is the median step time: one step emits one token for every sequence of the
  batch, which is the paper's "decoding time per token".  ``per_token_amortized_s`` is the step
  time divided by the batch size.
* ``cache_bytes`` is what one step reads from the cache:
  ``accounting.kv_cache_per_token(cfg) * n_layer * dtype bytes * context * batch`` (checked
  against the bytes of the cache actually built).  ``cache_gb_per_s`` is ``cache_bytes / per_token_s
  / 1e9``; with a ``bandwidth`` (bytes/s) the memory-bound limit is ``cache_bytes / bandwidth``.
* Ratios (per d_model, batch, context): ``"tpa/<mech>"`` = TPA's ``per_token_s`` over the other
  mechanism's (below 1: TPA is faster), and the same quotient of ``cache_bytes``.

Points whose cache would exceed ``memory_cap_gb`` GiB are not run; they are listed in ``skipped``
with the reason.
"""
from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import accounting
from ..config import DECODE_IMPLS, DTYPES, ModelConfig
from ..inference import cache_bytes_per_token, init_cache
from ..model import Transformer

__all__ = ["MECHANISMS", "run_decode_bench", "model_config", "format_table", "plot"]

MECHANISMS = ("mha", "mqa", "gqa", "mla", "tpa")
TARGET = "tpa"
GIB = 2 ** 30
PARAM_INITS = ("model", "fast")
# colours of the paper's Figs. 7-8 (MHA orange, MQA purple, GQA green, MLA blue, TPA red)
COLORS = {"mha": "tab:orange", "mqa": "tab:purple", "gqa": "tab:green", "mla": "tab:blue", "tpa": "tab:red"}


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
# arrays: cheap pseudo-random fills (threefry is slow to compile on CPU; values do not change speed)
def _hash_uniform(shape, dtype, seed: int):
    n = math.prod(shape)
    h = jax.lax.iota(jnp.uint32, n) * jnp.uint32(0x9E3779B1) + jnp.uint32((seed * 0x85EBCA77) & 0xFFFFFFFF)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x2C1B3C6D)
    h = h ^ (h >> 12)
    h = h * jnp.uint32(0x297A2D39)
    h = h ^ (h >> 15)
    u = (h >> 8).astype(jnp.float32) * (2.0 / (1 << 24)) - 1.0  # uniform in [-1, 1)
    return u.reshape(shape).astype(dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fill_leaves(specs, seed, scale):
    return [_hash_uniform(shape, dtype, seed + 7919 * i) * jnp.asarray(scale, dtype)
            for i, (shape, dtype) in enumerate(specs)]


HOST_FILL_MAX = 2 ** 22  # leaves up to this many elements are filled on the host (no compile)


def _filled_like(abstract, seed: int, scale: float = 1.0):
    """A pytree of the abstract tree's shapes and dtypes filled with values in [-scale, scale).

    Small leaves come from numpy; large ones (big caches) are generated on the device by one
    jitted integer hash, so no host copy of a multi-GiB cache is ever made.
    """
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    rng = np.random.default_rng(seed)
    out, big = [], []
    for i, x in enumerate(leaves):
        shape, dtype = tuple(x.shape), jnp.dtype(x.dtype)
        if math.prod(shape) <= HOST_FILL_MAX:
            out.append(jnp.asarray(rng.uniform(-scale, scale, shape).astype(np.float32).astype(dtype)))
        else:
            out.append(None)
            big.append((i, shape, dtype))
    if big:
        filled = _fill_leaves(tuple((shape, dtype) for _, shape, dtype in big), seed, float(scale))
        for (i, _, _), value in zip(big, filled):
            out[i] = value
    return jax.tree_util.tree_unflatten(treedef, out)


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def _init_params(cfg: ModelConfig, how: str):
    model = Transformer(cfg)
    tok = jnp.zeros((1, 1), jnp.int32)
    if how == "model":
        return jax.jit(lambda k: _unbox(model.init(k, tok)["params"]))(jax.random.key(0))
    abstract = _unbox(jax.eval_shape(model.init, jax.random.key(0), tok)["params"])
    return _filled_like(abstract, seed=1, scale=0.02)


def _nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def _make_step(model):
    def step(params, layers, lengths, tokens):
        logits, cache = model.apply({"params": params}, tokens, cache={"lengths": lengths, "layers": layers})
        return logits, cache["layers"]

    return jax.jit(step, donate_argnums=(1,))


class _Run:
    """One mechanism at one (d_model, batch, context) point: compiled step, donated cache, timings."""

    def __init__(self, cfg: ModelConfig, params, batch: int, context: int, warmup: int, seed: int):
        abstract = jax.eval_shape(lambda: init_cache(cfg, batch, context))
        self.measured_bytes_per_token = cache_bytes_per_token(abstract)
        self.layers = _filled_like(abstract["layers"], seed=seed)
        self.lengths = jnp.full((batch,), context - 1, jnp.int32)  # full cache: the step fills slot S-1
        self.tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, 1)), jnp.int32)
        self.params = params
        t0 = time.perf_counter()
        self.step = _make_step(Transformer(cfg)).lower(params, self.layers, self.lengths, self.tokens).compile()
        self.compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            self.run_once()
        self.times: list[float] = []

    def run_once(self) -> float:
        t0 = time.perf_counter()
        logits, self.layers = self.step(self.params, self.layers, self.lengths, self.tokens)
        jax.block_until_ready((logits, self.layers))
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# the benchmark
def _device_info() -> dict:
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count()}


def run_decode_bench(*, d_models=(1024, 2048), batch_sizes=(1, 4), min_log2: int = 10, max_log2: int = 15,
                     mechanisms=MECHANISMS, n_layer: int = 1, head_dim: int = 64, dtype: str = "auto",
                     param_dtype: Optional[str] = None, reps: int = 10, warmup: int = 2,
                     decode_impl: str = "flash", bandwidth: Optional[float] = None, memory_cap_gb: float = 4.0,
                     vocab_size: int = 256, mlp_hidden: Optional[int] = 8, tpa_ranks=(16, 1, 1),
                     gqa_groups: int = 4, mla_dims=None, param_init: str = "model",
                     progress: bool = False) -> dict:
    """Time one-token decode steps of each mechanism at contexts ``2**min_log2 .. 2**max_log2``.

    Returns ``{"benchmark", "paper", "config", "entries", "skipped", "ratios"}`` (see the module
    docstring for every definition).  ``param_init="model"`` initialises the weights with the
    model's own (jitted) ``init``; ``"fast"`` fills the same shapes with pseudo-random values
    (faster to compile on CPU; the values do not change the speed).  Raises ``ValueError`` on
    bad input before anything is run.
    """
    d_models = _int_tuple("d_models", d_models)
    batch_sizes = _int_tuple("batch_sizes", batch_sizes)
    _check_int("min_log2", min_log2, 0)
    _check_int("max_log2", max_log2, 0)
    if min_log2 > max_log2:
        raise ValueError(f"min_log2: expected <= max_log2={max_log2}, got {min_log2}")
    if max_log2 > 30:
        raise ValueError(f"max_log2: expected <= 30, got {max_log2}")
    if isinstance(mechanisms, str):
        mechanisms = (mechanisms,)
    mechanisms = tuple(dict.fromkeys(mechanisms))
    unknown = [m for m in mechanisms if m not in MECHANISMS]
    if unknown or not mechanisms:
        raise ValueError(f"mechanisms: expected some of {MECHANISMS}, got {list(mechanisms)}")
    _check_int("n_layer", n_layer, 1)
    _check_int("head_dim", head_dim, 2)
    _check_int("reps", reps, 1)
    _check_int("warmup", warmup, 0)
    if dtype == "auto":  # bf16 matmuls are emulated (slow) on CPU: time the dtype the backend runs natively
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected 'auto' or one of {DTYPES}, got {dtype!r}")
    if decode_impl not in DECODE_IMPLS:
        raise ValueError(f"decode_impl: expected one of {DECODE_IMPLS}, got {decode_impl!r}")
    if param_init not in PARAM_INITS:
        raise ValueError(f"param_init: expected one of {PARAM_INITS}, got {param_init!r}")
    for name, v in (("bandwidth", bandwidth), ("memory_cap_gb", memory_cap_gb)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
    if memory_cap_gb is None:
        raise ValueError("memory_cap_gb: expected a finite number > 0, got None")

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
    for d in d_models:
        params, param_bytes = {}, {}
        for b in batch_sizes:
            for s in contexts:
                runs, point_bytes = {}, {}
                for m in mechanisms:
                    cfg = cfgs[d][m]
                    per_token = accounting.kv_cache_per_token(cfg) * n_layer * itemsize
                    nbytes = per_token * s * b
                    point_bytes[m] = nbytes
                    if nbytes > cap_bytes:
                        skipped.append(dict(mechanism=m, d_model=d, n_head=cfg.n_head, batch=b, context=s,
                                            cache_bytes=nbytes,
                                            reason=f"cache of {nbytes} bytes exceeds the memory cap of "
                                                   f"{cap_bytes} bytes ({memory_cap_gb:g} GiB)"))
                        continue
                    if m not in params:
                        params[m] = _init_params(cfg, param_init)
                        param_bytes[m] = _nbytes(params[m])
                    run = _Run(cfg, params[m], b, s, warmup, seed=len(entries) + len(runs) + 1)
                    if run.measured_bytes_per_token * s * b != nbytes:
                        raise RuntimeError(
                            f"{m}: cache built by init_cache holds {run.measured_bytes_per_token} bytes per "
                            f"token, accounting.kv_cache_per_token gives {per_token}")
                    runs[m] = run
                names = list(runs)
                for r in range(reps):
                    k = r % max(1, len(names))
                    for m in names[k:] + names[:k]:
                        runs[m].times.append(runs[m].run_once())
                point = {}
                for m in names:
                    run, cfg = runs[m], cfgs[d][m]
                    med = statistics.median(run.times)
                    e = dict(mechanism=m, d_model=d, n_head=cfg.n_head, kv_heads=cfg.kv_heads, head_dim=head_dim,
                             batch=b, context=s, median_s=med, min_s=min(run.times), per_token_s=med,
                             per_token_amortized_s=med / b, times_s=list(run.times),
                             kv_numbers_per_token_per_layer=accounting.kv_cache_per_token(cfg),
                             cache_bytes_per_token=run.measured_bytes_per_token, cache_bytes=point_bytes[m],
                             cache_gb_per_s=point_bytes[m] / med / 1e9, param_bytes=param_bytes[m],
                             compile_s=run.compile_s)
                    if bandwidth is not None:
                        e["memory_bound_s"] = point_bytes[m] / bandwidth
                        e["fraction_of_memory_bound"] = e["memory_bound_s"] / med
                    entries.append(e)
                    point[m] = e
                    if progress:
                        print(f"decode-bench d_model={d} batch={b} context={s} {m}: {1e3 * med:.3f} ms/step "
                              f"(compile {run.compile_s:.1f} s)", file=sys.stderr, flush=True)
                del runs
                if TARGET in mechanisms:
                    t = point.get(TARGET)
                    row = dict(d_model=d, batch=b, context=s, time={}, cache_bytes={})
                    for m in mechanisms:
                        if m == TARGET:
                            continue
                        key = f"{TARGET}/{m}"
                        row["cache_bytes"][key] = point_bytes[TARGET] / point_bytes[m]
                        if t is not None and m in point:
                            row["time"][key] = t["per_token_s"] / point[m]["per_token_s"]
                    ratios.append(row)
        del params

    mla = default_mla_dims(d_models[0], head_dim) if mla_dims is None else tuple(mla_dims)
    config = dict(d_models=list(d_models), n_heads={str(d): d // head_dim for d in d_models},
                  batch_sizes=list(batch_sizes), contexts=contexts, min_log2=min_log2, max_log2=max_log2,
                  mechanisms=list(mechanisms), n_layer=n_layer, head_dim=head_dim, dtype=dtype,
                  dtype_bytes=itemsize, param_dtype=param_dtype or dtype, reps=reps, warmup=warmup,
                  decode_impl=decode_impl, bandwidth_bytes_per_s=bandwidth, memory_cap_gb=memory_cap_gb,
                  memory_cap_bytes=cap_bytes, vocab_size=vocab_size, mlp_hidden=mlp_hidden,
                  tpa_ranks=list(tpa_ranks), gqa_groups=gqa_groups,
                  mla_dims=("3*d_model/8, d_model/8, head_dim/2" if mla_dims is None else list(mla_dims)),
                  mla_dims_first_d_model=dict(q_lora_rank=mla[0], kv_lora_rank=mla[1], rope_head_dim=mla[2]),
                  param_init=param_init, timing="median of reps one-token steps, mechanisms interleaved",
                  **_device_info())
    return dict(benchmark="decode_per_token", paper="Fig. 5 (Sec. 6.2), Figs. 7-8 (App. B)", config=config,
                entries=entries, skipped=skipped, ratios=ratios)


# ---------------------------------------------------------------------------------------------
# reporting
def _fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "skip"
    ms = 1e3 * seconds
    return f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def format_table(result: dict) -> str:
    """Per (d_model, batch): one line per context with ms per step of each mechanism and TPA's ratios."""
    cfg = result["config"]
    mechs = cfg["mechanisms"]
    timed = {(e["d_model"], e["batch"], e["context"], e["mechanism"]): e for e in result["entries"]}
    ratio_rows = {(r["d_model"], r["batch"], r["context"]): r for r in result["ratios"]}
    keys = [f"{TARGET}/{m}" for m in mechs if m != TARGET] if TARGET in mechs else []
    head = ["context"] + list(mechs) + keys
    blocks = [f"per-token decode time in ms (one step = one token for each sequence; {cfg['dtype']}, "
              f"decode_impl={cfg['decode_impl']}, {cfg['n_layer']} layer(s), {cfg['device_kind']}); "
              f"ratios < 1: TPA faster"]
    for d in cfg["d_models"]:
        for b in cfg["batch_sizes"]:
            rows = [head]
            for s in cfg["contexts"]:
                cells = [f"{s:,}"]
                cells += [_fmt_ms(timed[(d, b, s, m)]["per_token_s"]) if (d, b, s, m) in timed else "skip"
                          for m in mechs]
                rr = ratio_rows.get((d, b, s), {"time": {}})["time"]
                cells += [f"{rr[k]:.3f}" if k in rr else "-" for k in keys]
                rows.append(cells)
            widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
            lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
            lines.insert(1, "  ".join("-" * w for w in widths))
            blocks.append(f"\nd_model {d} ({d // cfg['head_dim']} heads, d_h {cfg['head_dim']}), batch {b}\n"
                          + "\n".join(lines))
    if result["skipped"]:
        blocks.append(f"\n{len(result['skipped'])} point(s) skipped: cache above the "
                      f"{cfg['memory_cap_gb']:g} GiB memory cap")
    return "\n".join(blocks)


def plot(result: dict, png_path: str) -> str:
    """log2(seconds per token) vs log2(context), one panel per d_model, a line per mechanism and batch.

    Batch sizes differ by line style; with a ``bandwidth`` the memory-bound limits of the largest
    batch are drawn as thin dotted lines.  Agg canvas (no display); returns ``png_path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cfg = result["config"]
    if not result["entries"]:
        raise ValueError("plot: the result has no measured entries")
    d_models = cfg["d_models"]
    styles, markers = ["-", "--", "-.", ":"], "os^vDP"
    fig = Figure(figsize=(6.5 * len(d_models), 5), dpi=110)
    FigureCanvasAgg(fig)
    for i, d in enumerate(d_models):
        ax = fig.add_subplot(1, len(d_models), i + 1)
        for j, b in enumerate(cfg["batch_sizes"]):
            for m in cfg["mechanisms"]:
                pts = sorted((e["context"], e) for e in result["entries"]
                             if e["d_model"] == d and e["batch"] == b and e["mechanism"] == m)
                if not pts:
                    continue
                x = [math.log2(c) for c, _ in pts]
                ax.plot(x, [math.log2(e["per_token_s"]) for _, e in pts], color=COLORS.get(m),
                        linestyle=styles[j % len(styles)], marker=markers[j % len(markers)], markersize=3,
                        linewidth=1.5, label=f"{m.upper()} (batch {b})")
                if cfg.get("bandwidth_bytes_per_s") and b == cfg["batch_sizes"][-1]:
                    ax.plot(x, [math.log2(e["memory_bound_s"]) for _, e in pts], color=COLORS.get(m),
                            linestyle=":", linewidth=0.8, alpha=0.6)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("log2(context length)")
        ax.set_ylabel("log2(time per token) (seconds)")
        ax.set_title(f"d_model {d} ({d // cfg['head_dim']} heads, d_h {cfg['head_dim']})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=len(cfg["batch_sizes"]))
    fig.suptitle(f"One-token decode step vs context ({cfg['dtype']}, decode_impl={cfg['decode_impl']}, "
                 f"{cfg['n_layer']} layer(s), {cfg['device_kind']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, format="png")
    return png_path
