"""Serving benchmark: continuous batching over the paged factor cache against padded batched
``generate``, and how many requests each mechanism's cache lets run at once in a memory budget.

Pure functions behind ``python eval.py serve-bench`` and ``bench/serve.py``
(:mod:`tpa_jax.eval.serve_report` holds the options, the summary and the figure):

* :func:`make_workload` -- a seeded list of requests with ragged prompt and output lengths (random
  token ids, no stop tokens, so every request generates exactly its ``max_new_tokens``);
* :func:`run_engine` -- the workload through ``inference.Engine``, every request submitted at
  once: wall time, tokens/s, the gaps between consecutive tokens of a request (p50 / p99, from the
  time each step returned) and the first-token latency (from the submission, queueing included);
* :func:`run_padded` -- the same requests through ``inference.generate`` in batches of
  ``max_batch``, each padded to its longest prompt and run to its largest ``max_new_tokens``;
  tokens/s counts only the tokens the requests asked for;
* :func:`concurrency` -- the most requests that run at once in a pool of each budget
  (``paged.max_concurrent``: first come first served, each request reserving pages for its
  :func:`cache_rows`, prompt + new tokens - 1, as the engine does), for the paper's configs of one
  size, so the ratios reflect the real cache sizes;
* :func:`run_serve_bench` -- all of it for every mechanism and cache dtype, as one JSON-ready dict.

Timing excludes compilation: each engine first serves a short warm-up request of the same shapes,
and each distinct padded batch shape is generated once before the timed pass; both timed passes run
under ``count_compiles``, whose count is recorded (0 when nothing was compiled in them).  The engine
runs with ``num_pages = budget // page_bytes``; its measured ``max_running`` before the first
request finished is checked against ``max_concurrent`` of the same budget and requests.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from .. import configs
from ..inference import count_compiles, generate
from ..inference.generate import CACHE_BUCKET, NEW_TOKENS_BUCKET, PROMPT_BUCKET, length_bucket
from ..inference.paged import max_concurrent, page_bytes, pages_for
from .bench_timing import environment
from .bench_weights import bench_params
from .decode_bench import model_config

__all__ = ["MECHANISMS", "CACHE_DTYPES", "GOALS", "GIB", "make_workload", "request_lengths", "cache_rows", "run_engine",
           "run_padded", "concurrency", "run_serve_bench"]

MECHANISMS = ("tpa", "mha", "gqa", "mla")
CACHE_DTYPES = ("bfloat16", "int8")
CONFIG_PREFIX = {"tpa": "t6", "mha": "mha", "gqa": "gqa", "mla": "mla"}  # names in tpa_jax.configs
GIB = 2 ** 30
VOCAB = 256  # the timed models' vocabulary (byte-sized, as the decode benchmark's)
# what the serving engine is for: concurrency ratios at equal memory, and no loss against padding
GOALS = {"tpa_bf16/mha_bf16": 4.0, "tpa_int8/mha_bf16": 7.0, "tpa_int8/mha_int8": None, "engine/padded": 1.0}


def _percentiles(xs: Sequence[float]) -> dict:
    if not len(xs):
        return dict(n=0, p50_s=None, p99_s=None, mean_s=None)
    a = np.asarray(xs, np.float64)
    return dict(n=int(a.size), p50_s=float(np.percentile(a, 50)), p99_s=float(np.percentile(a, 99)),
                mean_s=float(a.mean()))


def _check_range(name: str, r: Sequence[int]) -> tuple[int, int]:
    lo, hi = (int(v) for v in r)
    if not 1 <= lo <= hi:
        raise ValueError(f"{name}: expected 1 <= low <= high, got {tuple(r)}")
    return lo, hi


# ---------------------------------------------------------------------------------------------
# the workload
def request_lengths(n: int, prompt_range: Sequence[int], output_range: Sequence[int],
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, output lengths) of ``n`` requests, uniform over the inclusive ranges."""
    if n < 1:
        raise ValueError(f"requests: expected an integer >= 1, got {n}")
    (plo, phi), (olo, ohi) = _check_range("prompt_range", prompt_range), _check_range("output_range", output_range)
    rng = np.random.default_rng(seed)
    return rng.integers(plo, phi + 1, n), rng.integers(olo, ohi + 1, n)


def make_workload(n: int, prompt_range: Sequence[int], output_range: Sequence[int], vocab_size: int,
                  seed: int = 0) -> list[dict]:
    """``n`` requests ``{"prompt": [ids], "max_new_tokens": int}``: ragged lengths from
    :func:`request_lengths`, token ids uniform in the vocabulary."""
    prompts, outputs = request_lengths(n, prompt_range, output_range, seed)
    rng = np.random.default_rng(seed + 1)
    return [dict(prompt=rng.integers(0, vocab_size, int(p)).tolist(), max_new_tokens=int(o))
            for p, o in zip(prompts, outputs)]


def _tokens(workload: list[dict]) -> list[int]:
    return [len(r["prompt"]) + r["max_new_tokens"] for r in workload]


def cache_rows(prompt_tokens, new_tokens):
    """Cache rows a request fills, what the engine reserves pages for: its prompt and all but the
    last new token (the last one is returned, never written back)."""
    return prompt_tokens + new_tokens - 1


# ---------------------------------------------------------------------------------------------
# the engine
def run_engine(params, cfg, workload: list[dict], *, max_batch: int, page_size: int, num_pages: int,
               cache_dtype: str, prefill_chunk: int, decode_steps: int = 1, reps: int = 1,
               max_steps: Optional[int] = None) -> dict:
    """Serve ``workload`` (all submitted at once, greedy) ``reps`` times after an untimed warm-up
    request; returns the timings (``wall_s``: the median pass; latencies pooled over the passes),
    the engine's stats and each request's tokens of the first pass (``"outputs"``, in workload order)."""
    from ..inference import Engine

    eng = Engine(params, cfg, max_batch=max_batch, page_size=page_size, num_pages=num_pages,
                 cache_dtype=cache_dtype, prefill_chunk=prefill_chunk, decode_steps=decode_steps)
    # warm-up: a full prefill chunk and a partial one, then decode steps (no longer than the longest request)
    warm_len = max(1, min(prefill_chunk + 1, max(_tokens(workload)) - 2))
    warm_prompt = (list(workload[0]["prompt"]) * warm_len)[:warm_len]
    t0 = time.perf_counter()
    eng.warmup()  # compiles the decode and both prefill programs
    eng.submit(warm_prompt, 2)
    eng.run_until_done()
    warmup_s = time.perf_counter() - t0
    base = dict(eng.stats)
    max_steps = max_steps or 4 * sum(_tokens(workload)) + 16
    walls, gaps, firsts, before_first_finish, steps = [], [], [], None, 0
    with count_compiles() as compiles:
        for rep in range(reps):
            t0 = time.perf_counter()
            ids = [eng.submit(r["prompt"], r["max_new_tokens"]) for r in workload]
            stamps: dict[Any, list[float]] = {i: [] for i in ids}
            outputs: dict[Any, list[int]] = {i: [] for i in ids}
            left, n_steps = len(ids), 0
            while left:
                running_before = eng.stats["max_running"]
                events = eng.step()
                now = time.perf_counter() - t0
                n_steps += 1
                for rid, token, finished in events:
                    stamps[rid].append(now)
                    outputs[rid].append(int(token))
                    if finished:
                        left -= 1
                        if before_first_finish is None:
                            before_first_finish = running_before
                if n_steps > max_steps:
                    raise RuntimeError(f"engine: {left} requests unfinished after {n_steps} steps")
            walls.append(time.perf_counter() - t0)
            gaps += [b - a for v in stamps.values() for a, b in zip(v, v[1:])]
            firsts += [v[0] for v in stamps.values() if v]
            steps += n_steps
            if rep == 0:
                first_outputs = [outputs[i] for i in ids]
    generated, wall = sum(len(v) for v in first_outputs), float(np.median(walls))
    stats = dict(eng.stats)
    stats.update({k: stats[k] - base.get(k, 0) for k in ("steps", "prefill_calls", "decode_calls") if k in stats})
    return dict(wall_s=wall, times_s=walls, generated_tokens=generated, tokens_per_s=generated / wall,
                warmup_s=warmup_s, compiles_during_timing=compiles.count, steps=steps // reps,
                token_gap=_percentiles(gaps), first_token=_percentiles(firsts),
                exact_lengths=all(len(o) == r["max_new_tokens"] for o, r in zip(first_outputs, workload)),
                max_running_before_first_finish=before_first_finish, stats=stats, outputs=first_outputs)


# ---------------------------------------------------------------------------------------------
# the padded baseline
def _batches(workload: list[dict], max_batch: int) -> list[tuple[list[dict], int]]:
    """Batches of ``max_batch`` in order, the last one filled with copies of its first request
    (one batch shape); each with its count of real requests."""
    out = []
    for i in range(0, len(workload), max_batch):
        b = workload[i:i + max_batch]
        out.append((b + [b[0]] * (max_batch - len(b)), len(b)))
    return out


def _shape_key(batch: list[dict], cfg) -> tuple:
    longest, new = max(len(r["prompt"]) for r in batch), max(r["max_new_tokens"] for r in batch)
    cap = length_bucket(longest + new, CACHE_BUCKET, cfg.max_seq_len)
    return length_bucket(longest, PROMPT_BUCKET), length_bucket(new, NEW_TOKENS_BUCKET), cap


def run_padded(params, cfg, workload: list[dict], *, max_batch: int, cache_dtype: str, reps: int = 1) -> dict:
    """The workload through ``generate`` in padded batches of ``max_batch`` (greedy); each distinct
    compiled shape is generated once, untimed, first.  ``tokens_per_s`` counts the requested tokens;
    ``padded_tokens`` is what the batches generated (rows x their batch's largest output); ``wall_s``
    is the median of ``reps`` passes."""
    batches = _batches(workload, max_batch)

    def call(batch):
        return generate(params, cfg, [r["prompt"] for r in batch], max(r["max_new_tokens"] for r in batch),
                        cache_dtype=cache_dtype)

    shapes = {}
    t0 = time.perf_counter()
    for batch, _ in batches:
        shapes.setdefault(_shape_key(batch, cfg), batch)
    for batch in shapes.values():
        call(batch)
    warmup_s = time.perf_counter() - t0
    outputs, walls = [], []
    with count_compiles() as compiles:
        for rep in range(reps):
            t0 = time.perf_counter()
            for batch, real in batches:
                got = call(batch)  # generate returns host arrays: the batch has finished
                if rep == 0:
                    outputs += [got.tokens[j, :batch[j]["max_new_tokens"]].tolist() for j in range(real)]
            walls.append(time.perf_counter() - t0)
    wall = float(np.median(walls))
    useful = sum(r["max_new_tokens"] for r in workload)
    per_token = page_bytes(cfg, 1, cache_dtype)
    return dict(wall_s=wall, times_s=walls, generated_tokens=useful, tokens_per_s=useful / wall, warmup_s=warmup_s,
                compiles_during_timing=compiles.count, batches=len(batches), distinct_shapes=len(shapes),
                padded_tokens=sum(len(b) * max(r["max_new_tokens"] for r in b) for b, _ in batches),
                cache_bytes_per_batch_max=max(max_batch * k[2] * per_token for k in shapes),
                outputs=outputs)


# ---------------------------------------------------------------------------------------------
# concurrency at a memory budget
def concurrency(size: str, budgets_bytes: Sequence[int], page_size: int, request_tokens: Sequence[int], *,
                mechanisms: Sequence[str] = MECHANISMS, cache_dtypes: Sequence[str] = CACHE_DTYPES) -> dict:
    """``max_concurrent`` of ``request_tokens`` (cache rows per request) for each mechanism's
    ``<prefix>-<size>`` config, cache dtype and budget, with the TPA / MHA ratios at every budget
    (``saturated``: every request fit, so the figure is a lower bound)."""
    names = {m: f"{CONFIG_PREFIX[m]}-{size}" for m in mechanisms}
    entries = []
    for m in mechanisms:
        cfg = configs.get(names[m])
        for d in cache_dtypes:
            pb = page_bytes(cfg, page_size, d)
            for b in budgets_bytes:
                n = max_concurrent(int(b), cfg, page_size, d, list(request_tokens))
                entries.append(dict(mechanism=m, config=names[m], cache_dtype=d, budget_bytes=int(b),
                                    budget_gib=b / GIB, page_bytes=pb, num_pages=int(b) // pb,
                                    bytes_per_token=pb // page_size, max_concurrent=n,
                                    saturated=n == len(request_tokens)))
    by = {(e["mechanism"], e["cache_dtype"], e["budget_bytes"]): e["max_concurrent"] for e in entries}
    ratios = []
    for b in budgets_bytes:
        row = {"budget_bytes": int(b), "budget_gib": b / GIB}
        for key in GOALS:
            if key == "engine/padded":
                continue
            (m1, d1), (m2, d2) = (part.split("_") for part in key.split("/"))
            d1, d2 = ("bfloat16" if d == "bf16" else d for d in (d1, d2))
            a, z = by.get((m1, d1, int(b))), by.get((m2, d2, int(b)))
            if a is not None and z:
                row[key] = a / z
        ratios.append(row)
    return dict(size=size, configs=names, page_size=page_size, requests=len(request_tokens),
                budgets_bytes=[int(b) for b in budgets_bytes], entries=entries, ratios=ratios)


# ---------------------------------------------------------------------------------------------
# the benchmark
def run_serve_bench(*, mechanisms: Sequence[str] = MECHANISMS, cache_dtypes: Sequence[str] = CACHE_DTYPES,
                    requests: int = 32, prompt_range=(8, 96), output_range=(4, 64), seed: int = 0,
                    d_model: int = 256, head_dim: int = 64, n_layer: int = 2, dtype: str = "float32",
                    tpa_ranks=(6, 2, 2), gqa_groups: int = 2, max_batch: int = 8, page_size: int = 16,
                    prefill_chunk: int = 64, decode_steps: int = 8, run_budget_bytes: Optional[int] = None,
                    param_init: str = "fast", concurrency_size: str = "small", budgets_gib=(0.5, 1, 2, 4, 8),
                    concurrency_requests: int = 50_000, reps: int = 3, run: bool = True,
                    progress: bool = False) -> dict:
    """Every measurement of the module docstring, for each mechanism x cache dtype.

    ``run=False`` computes the concurrency part only (no model is built).  ``run_budget_bytes``: the
    page pool of the timed engine runs, the same bytes for every mechanism (default: what the
    largest bf16 cache of the timed configs needs for ``max_batch`` requests of the mean length).
    Raises ``ValueError`` on bad input before anything runs."""
    mechanisms, cache_dtypes = tuple(dict.fromkeys(mechanisms)), tuple(dict.fromkeys(cache_dtypes))
    if not mechanisms or any(m not in MECHANISMS for m in mechanisms):
        raise ValueError(f"mechanisms: expected some of {MECHANISMS}, got {list(mechanisms)}")
    if not cache_dtypes or any(d not in CACHE_DTYPES for d in cache_dtypes):
        raise ValueError(f"cache_dtypes: expected some of {CACHE_DTYPES}, got {list(cache_dtypes)}")
    for name, v in dict(requests=requests, max_batch=max_batch, page_size=page_size, prefill_chunk=prefill_chunk,
                        decode_steps=decode_steps, concurrency_requests=concurrency_requests, reps=reps).items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    if not budgets_gib or any(not b > 0 for b in budgets_gib):
        raise ValueError(f"budgets_gib: expected numbers > 0, got {list(budgets_gib)}")
    configs.get(f"t6-{concurrency_size}")  # an unknown size fails here
    workload = make_workload(requests, prompt_range, output_range, VOCAB, seed)
    need = [cache_rows(len(r["prompt"]), r["max_new_tokens"]) for r in workload]
    cfgs = {m: model_config(m, d_model, head_dim=head_dim, n_layer=n_layer, dtype=dtype,
                            max_seq_len=length_bucket(max(need) + 1, CACHE_BUCKET), tpa_ranks=tpa_ranks,
                            gqa_groups=gqa_groups, vocab_size=VOCAB) for m in mechanisms}
    mean_pages = pages_for(int(np.ceil(np.mean(need))), page_size)
    if run_budget_bytes is None:
        run_budget_bytes = max(page_bytes(c, page_size, "bfloat16") for c in cfgs.values()) * max_batch * mean_pages
    for m, c in cfgs.items():
        for d in cache_dtypes:
            pages = run_budget_bytes // page_bytes(c, page_size, d)
            if pages < pages_for(max(need), page_size):
                raise ValueError(f"run_budget_bytes={run_budget_bytes}: {pages} pages of {m}/{d} cannot hold the "
                                 f"longest request ({max(need)} cache rows)")
    budgets = [int(b * GIB) for b in budgets_gib]
    lengths = cache_rows(*request_lengths(concurrency_requests, prompt_range, output_range, seed))
    conc = concurrency(concurrency_size, budgets, page_size, lengths.tolist(), mechanisms=mechanisms,
                       cache_dtypes=cache_dtypes)
    runs = []
    for m in mechanisms if run else ():
        params = bench_params(cfgs[m], param_init)
        for d in cache_dtypes:
            pb = page_bytes(cfgs[m], page_size, d)
            num_pages = run_budget_bytes // pb
            eng = run_engine(params, cfgs[m], workload, max_batch=max_batch, page_size=page_size,
                             num_pages=num_pages, cache_dtype=d, prefill_chunk=prefill_chunk,
                             decode_steps=decode_steps, reps=reps)
            pad = run_padded(params, cfgs[m], workload, max_batch=max_batch, cache_dtype=d, reps=reps)
            predicted = max_concurrent(run_budget_bytes, cfgs[m], page_size, d, need, max_batch)
            e_out, p_out = eng.pop("outputs"), pad.pop("outputs")
            runs.append(dict(mechanism=m, cache_dtype=d, page_bytes=pb, num_pages=num_pages,
                             pool_bytes=num_pages * pb, max_concurrent=predicted,
                             admission_matches=eng["max_running_before_first_finish"] == predicted,
                             greedy_matching_requests=sum(a == b for a, b in zip(e_out, p_out)),
                             engine=eng, padded=pad, speedup=eng["tokens_per_s"] / pad["tokens_per_s"]))
            if progress:
                print(f"serve-bench {m}/{d}: engine {eng['tokens_per_s']:.1f} tok/s, padded "
                      f"{pad['tokens_per_s']:.1f} tok/s, running {predicted} (pool {num_pages} pages)",
                      file=sys.stderr, flush=True)
    settings = dict(locals())
    return _result(settings, conc, runs, workload, need)


def _result(kw: dict, conc: dict, runs: list, workload: list, need: list) -> dict:
    """The JSON object: configuration, workload, concurrency, runs, headline ratios and goals."""
    top = conc["ratios"][-1] if conc["ratios"] else {}
    ratios = {k: top[k] for k in GOALS if k in top}
    ratios["engine/padded"] = {f"{r['mechanism']}_{r['cache_dtype']}": r["speedup"] for r in runs}
    goals = {}
    for key, goal in GOALS.items():
        value = ratios.get(key)
        if key == "engine/padded" and value:
            value = min(value.values())
        if goal is not None and isinstance(value, float):
            goals[key] = dict(goal=goal, value=value, met=value >= goal)
    names = ("mechanisms", "cache_dtypes", "requests", "prompt_range", "output_range", "seed", "d_model", "head_dim",
             "n_layer", "dtype", "tpa_ranks", "gqa_groups", "max_batch", "page_size", "prefill_chunk", "decode_steps",
             "run_budget_bytes", "param_init", "concurrency_size", "budgets_gib", "concurrency_requests", "reps", "run")
    config = {k: list(kw[k]) if isinstance(kw[k], tuple) else kw[k] for k in names}
    config.update(environment())
    work = dict(requests=len(workload), prompt_tokens=sum(len(r["prompt"]) for r in workload),
                generated_tokens=sum(r["max_new_tokens"] for r in workload), cache_rows_max=max(need))
    return dict(benchmark="serving", config=config, workload=work, concurrency=conc, runs=runs, ratios=ratios,
                goals=goals, ratio_budget_gib=top.get("budget_gib"))
