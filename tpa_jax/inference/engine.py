"""A continuous-batching engine over a paged decode cache.

    eng = Engine(params, cfg, max_batch=8, page_size=16, num_pages=256, cache_dtype="int8")
    rid = eng.submit([1, 2, 3], 32, temperature=0.8, top_p=0.95, seed=0, stop_tokens=[0])
    for request_id, token, finished in eng.step(): ...
    outputs = eng.run_until_done()   # {request_id: [tokens]}

Requests share one page pool (``paged``): a request is admitted, first come first served, when a
batch slot is free and the pool can reserve the pages its prompt and ``max_new_tokens`` may fill
(``pages_for(prompt + max_new_tokens - 1)``: the last new token is never written back); otherwise
it waits, and the requests behind it wait too.  Pages are taken as the request grows and all of
them go back to the pool when it ends, so the pool holds the tokens of the requests running now,
not ``max_batch * max_len``.  A request that could never fit (longer than ``max_len``, or more
pages than the pool has) is a one-line error at ``submit``.

Each :meth:`Engine.step` admits what fits, advances every request still reading its prompt by one
chunk of ``prefill_chunk`` tokens -- all of them in one [R, chunk] call, R the next power of two at
or above their number; the last chunk also samples the first token -- and then runs one decode step
for all slots that are generating (a [max_batch, 1] call; idle rows read and write no page).  Every
call has one of a fixed set of shapes (rows, chunk, page table [rows, J] with J = max_len / page_size
pages, the pool), so requests join and leave without recompiling: 2 + log2(max_batch) programs per
engine, which :meth:`Engine.warmup` compiles ahead if asked.  ``decode_steps`` > 1 adds one that runs
up to that many decode steps in one call (an on-device loop feeding each token back) whenever only
decoding is going on and no stop token can end a request early: the host then steps once per burst,
as admitting a waiting request needs a running one to finish anyway and no request finishes inside
a burst.

Sampling follows ``tpa_jax.generate`` row by row: greedy at ``temperature < GREEDY_BELOW``, else
softmax(logits / temperature) within ``top_k`` and ``top_p``, the i-th token drawn with
``fold_in(key(seed), i)``.  So a request's tokens equal ``generate`` on that request alone (up to
the float rounding of a different blocking of its attention), greedy or sampled.  Errors in a
call (bad ids, an unknown request) are raised before anything changes, so the other requests go
on as if nothing happened.
"""
from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..model import logits_fn
from ..model.attention.quant import cache_dtype as _cache_dtype
from .cache import paged_compiler_options
from .generate import GREEDY_BELOW, nucleus, prepare_prompts
from .paged import PageAllocator, empty_page_table, init_pool, page_bytes, pages_for

__all__ = ["Engine"]


@dataclass
class _Request:
    rid: int
    prompt: np.ndarray
    max_new: int
    sampling: tuple  # (temperature, top_k, top_p, seed, greedy)
    stops: frozenset
    reserved: int  # pages reserved and not yet taken
    pages: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    slot: int = -1
    length: int = 0  # rows in the cache


def _sample_row(logits_V: jax.Array, step: jax.Array, seed: jax.Array, temperature: jax.Array, top_k: jax.Array,
                top_p: jax.Array, use_top_p: jax.Array, greedy: jax.Array) -> jax.Array:
    """One row's next token, as ``generate.sample_logits`` draws it for a batch of one (the k-th
    largest logit by a sort, since k varies by row)."""
    logits = logits_V.astype(jnp.float32)[None]
    key = jax.random.fold_in(jax.random.key(seed), step)
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    kth = jnp.sort(scaled, axis=-1)[:, scaled.shape[-1] - top_k]
    scaled = jnp.where(scaled < kth[:, None], jnp.finfo(jnp.float32).min, scaled)
    scaled = jnp.where(use_top_p, nucleus(scaled, top_p), scaled)
    drawn = jax.random.categorical(key, scaled, axis=-1)[0]
    return jnp.where(greedy, jnp.argmax(logits[0]), drawn).astype(jnp.int32)


def _forward(params: Any, pool: dict, tokens_BT: jax.Array, start_B: jax.Array, valid_B: jax.Array,
             table_BJ: jax.Array, sampling: tuple, cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """One model call on the paged cache and every row's next token from its last real position."""
    cache = {"lengths": start_B, "layers": pool, "page_table": table_BJ}
    logits_BTV, cache = logits_fn(cfg)(params, tokens_BT, cache=cache, valid_lengths=valid_B)
    last_BV = jnp.take_along_axis(logits_BTV, jnp.maximum(valid_B - 1, 0)[:, None, None], axis=1)[:, 0]
    # greedy rows only (the usual case): skip the sort and nucleus of every row
    token_B = jax.lax.cond(jnp.all(sampling[-1]), lambda: jnp.argmax(last_BV, axis=-1).astype(jnp.int32),
                           lambda: jax.vmap(_sample_row)(last_BV, *sampling))
    return token_B, cache["layers"]


def _step_impl(params: Any, pool: dict, ints: jax.Array, floats: jax.Array, n_steps: jax.Array, *,
               cfg: ModelConfig, t: int, burst: int) -> tuple[jax.Array, dict]:
    """A prefill chunk (T tokens, ``valid`` of them real) or ``n_steps <= burst`` decode steps (T = 1,
    each token fed back), on the paged cache; returns the sampled tokens [B, burst] (the first
    ``n_steps`` columns hold them).  Each row's inputs arrive packed (two host-to-device copies per
    call instead of a dozen): ``ints`` [B, T + 7 + J] = tokens, start, valid, step, seed bits, top_k,
    use_top_p, greedy, page table; ``floats`` [B, 2] = temperature, top_p."""
    tokens_BT, (start_B, valid_B, step_B, seed_B, top_k_B, use_top_p_B, greedy_B) = ints[:, :t], ints[:, t:t + 7].T
    table_BJ = ints[:, t + 7:]
    fixed = (jax.lax.bitcast_convert_type(seed_B, jnp.uint32), floats[:, 0], top_k_B, floats[:, 1],
             use_top_p_B.astype(bool), greedy_B.astype(bool))
    if burst == 1:
        token_B, pool = _forward(params, pool, tokens_BT, start_B, valid_B, table_BJ, (step_B, *fixed), cfg)
        return token_B[:, None], pool

    def body(i, carry):
        pool, tok_B, start_B, out_BK = carry
        tok_B, pool = _forward(params, pool, tok_B[:, None], start_B, valid_B, table_BJ, (step_B + i, *fixed), cfg)
        return pool, tok_B, start_B + 1, out_BK.at[:, i].set(tok_B)

    out_BK = jnp.zeros((tokens_BT.shape[0], burst), jnp.int32)
    pool, _, _, out_BK = jax.lax.fori_loop(0, n_steps, body, (pool, tokens_BT[:, 0], start_B, out_BK))
    return out_BK, pool


@functools.cache
def _step_jit(cfg: ModelConfig):
    return jax.jit(functools.partial(_step_impl, cfg=cfg), static_argnames=("t", "burst"), donate_argnums=(1,),
                   compiler_options=paged_compiler_options(cfg))


class Engine:
    """Continuous batching of requests over one paged cache (see the module docstring)."""

    def __init__(self, params: Any, cfg: ModelConfig, *, max_batch: int, page_size: int, num_pages: int,
                 cache_dtype: Any = None, max_len: Optional[int] = None, prefill_chunk: int = 64,
                 decode_steps: int = 1) -> None:
        def positive(name: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Engine: {name} must be an integer >= 1, got {value!r}")
            return int(value)

        max_batch, num_pages = positive("max_batch", max_batch), positive("num_pages", num_pages)
        page_size, prefill_chunk = positive("page_size", page_size), positive("prefill_chunk", prefill_chunk)
        self.decode_steps = positive("decode_steps", decode_steps)
        max_len = cfg.max_seq_len if max_len is None else positive("max_len", max_len)
        if max_len > cfg.max_seq_len:
            raise ValueError(f"Engine: max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        if page_size > max_len:
            raise ValueError(f"Engine: page_size={page_size} is longer than max_len={max_len}")
        if cfg.decode_impl == "pallas" and page_size % 8:
            raise ValueError(f"Engine: page_size={page_size} must be a multiple of 8 for the Pallas decode kernel")
        if num_pages < max_batch:
            raise ValueError(f"Engine: num_pages={num_pages} is smaller than one page per batch slot "
                             f"(max_batch={max_batch})")
        self.params, self.cfg = params, cfg
        self.max_batch, self.page_size, self.num_pages = max_batch, page_size, num_pages
        self.max_len, self.prefill_chunk = max_len, prefill_chunk
        self.cache_dtype = _cache_dtype(cache_dtype if cache_dtype is not None else cfg.compute_dtype)
        self.pages_per_seq = pages_for(max_len, page_size)
        self.pool = init_pool(cfg, num_pages, page_size, self.cache_dtype)["layers"]
        self.pool_bytes = num_pages * page_bytes(cfg, page_size, self.cache_dtype)
        self._alloc = PageAllocator(num_pages)
        self._table = empty_page_table(max_batch, self.pages_per_seq, num_pages)
        self._slots: list[Optional[_Request]] = [None] * max_batch
        self._waiting: deque[_Request] = deque()
        self._live: dict[int, _Request] = {}  # waiting or running
        self._done: dict[int, _Request] = {}
        self._next_id = 0
        self._step = _step_jit(cfg)
        self.stats = {"steps": 0, "max_running": 0, "pages_in_use": 0, "num_pages": num_pages,
                      "pool_bytes": self.pool_bytes, "prefill_calls": 0, "decode_calls": 0}

    # ------------------------------------------------------------------------------ requests
    def submit(self, prompt_tokens: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
               stop_tokens: Sequence[int] = ()) -> int:
        """Queue one request; returns its id.  Arguments as ``tpa_jax.generate`` for one prompt."""
        cfg = self.cfg
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise ValueError(f"submit: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and temperature >= 0 and np.isfinite(temperature)):
            raise ValueError(f"submit: temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
            raise ValueError(f"submit: top_k must be None or an integer >= 1, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"submit: top_p must be None or a number in (0, 1], got {top_p!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"submit: seed must be an integer in 0..2**32-1, got {seed!r}")
        stops = np.asarray(list(stop_tokens), np.int64).reshape(-1)
        if stops.size and ((stops < 0) | (stops >= cfg.vocab_size)).any():
            raise ValueError(f"submit: stop_tokens must lie in 0..{cfg.vocab_size - 1}, got {stops.tolist()}")
        if isinstance(prompt_tokens, (np.ndarray, jax.Array)) and np.ndim(prompt_tokens) != 1:
            raise ValueError(f"submit: expected one prompt (a flat sequence of ids), got shape "
                             f"{np.shape(prompt_tokens)}")
        prompt = prepare_prompts([prompt_tokens], cfg.vocab_size)[0][0]
        total = len(prompt) + int(max_new_tokens)
        if total > self.max_len:
            raise ValueError(f"submit: prompt {len(prompt)} + max_new_tokens {max_new_tokens} = {total} tokens "
                             f"exceeds the engine's max_len={self.max_len}")
        need = pages_for(total - 1, self.page_size)
        if need > self.num_pages:
            raise ValueError(f"submit: the request needs {need} pages of {self.page_size} tokens but the pool has "
                             f"only {self.num_pages}; it could never run")
        greedy = temperature < GREEDY_BELOW
        k = cfg.vocab_size if top_k is None else min(int(top_k), cfg.vocab_size)
        sampling = (np.float32(1.0 if greedy else temperature), np.int32(k), np.float32(top_p or 1.0),
                    top_p is not None, greedy, np.uint32(seed))
        rid = self._next_id
        self._next_id += 1
        req = _Request(rid, prompt, int(max_new_tokens), sampling, frozenset(stops.tolist()), need)
        self._waiting.append(req)
        self._live[rid] = req
        return rid

    def _request(self, rid: int, what: str) -> _Request:
        req = self._live.get(rid) or self._done.get(rid)
        if req is None:
            raise ValueError(f"{what}: unknown request id {rid!r}")
        return req

    def result(self, rid: int) -> list[int]:
        """The tokens request ``rid`` has generated so far (all of them once it finished)."""
        return list(self._request(rid, "result").tokens)

    def is_finished(self, rid: int) -> bool:
        self._request(rid, "is_finished")
        return rid in self._done

    def cancel(self, rid: int) -> None:
        """Stop request ``rid`` (waiting or running): its pages go back to the pool, its tokens so far stay
        readable with :meth:`result`."""
        req = self._request(rid, "cancel")
        if rid in self._live:
            if req in self._waiting:
                self._waiting.remove(req)
            self._finish(req)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._slots)

    # ------------------------------------------------------------------------------ scheduling
    def _admit(self) -> None:
        while self._waiting and None in self._slots and self._alloc.can_reserve(self._waiting[0].reserved):
            req = self._waiting.popleft()
            self._alloc.reserve(req.reserved)
            req.slot = self._slots.index(None)
            self._slots[req.slot] = req

    def _grow(self, req: _Request, rows: int) -> None:
        """Take pages until ``req`` holds ``rows`` rows."""
        while len(req.pages) * self.page_size < rows:
            page = self._alloc.take()
            req.reserved -= 1
            self._table[req.slot, len(req.pages)] = page
            req.pages.append(page)

    def _finish(self, req: _Request) -> None:
        if req.slot >= 0:
            self._table[req.slot] = self.num_pages
            self._slots[req.slot] = None
        self._alloc.release(req.pages, req.reserved)
        req.pages, req.reserved, req.slot = [], 0, -1
        self._live.pop(req.rid, None)
        self._done[req.rid] = req

    def _pack(self, rows: Sequence[Optional[_Request]], tokens: np.ndarray, starts: np.ndarray, valid: np.ndarray,
              table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The step program's (ints, floats) for these rows (``None``: an idle row, greedy)."""
        idle = (np.float32(1.0), np.int32(self.cfg.vocab_size), np.float32(1.0), False, True, np.uint32(0))
        temperature, top_k, top_p, use_top_p, greedy, seed = zip(*[(r.sampling if r is not None else idle)
                                                                  for r in rows])
        steps = [len(r.tokens) if r is not None else 0 for r in rows]
        cols = [starts, valid, steps, np.asarray(seed, np.uint32).view(np.int32), top_k, use_top_p, greedy]
        ints = np.concatenate([tokens, np.asarray(cols, np.int32).T, table], axis=1)
        return ints, np.stack([np.asarray(temperature, np.float32), np.asarray(top_p, np.float32)], axis=1)

    def _call(self, rows: Sequence[Optional[_Request]], *arrays: np.ndarray, n_steps: int = 1) -> np.ndarray:
        """Run a step program on these rows (see :meth:`_pack`); returns their sampled tokens [rows, n_steps]
        (more than one step: decoding with the ``decode_steps`` program)."""
        burst = 1 if n_steps == 1 else self.decode_steps
        out, self.pool = self._step(self.params, self.pool, *self._pack(rows, *arrays), np.int32(n_steps),
                                    t=arrays[0].shape[1], burst=burst)
        return np.asarray(out)[:, :n_steps]

    def _emit(self, req: _Request, token: int, events: list) -> None:
        req.tokens.append(token)
        finished = len(req.tokens) >= req.max_new or token in req.stops
        events.append((req.rid, token, finished))
        if finished:
            self._finish(req)

    def step(self) -> list[tuple[int, int, bool]]:
        """Admit what fits, advance every prompt by one chunk, decode one token for every generating
        request -- or, with ``decode_steps`` > 1 while no prompt is being read and no request has stop
        tokens, up to that many (no more than any request has left, so none ends inside the call).
        Returns this step's (request_id, token, finished) in order."""
        events: list[tuple[int, int, bool]] = []
        self._admit()
        running = [r for r in self._slots if r is not None]
        decoding = [r for r in running if r.tokens]
        prefilling = [r for r in running if not r.tokens]
        if prefilling:
            self._prefill(prefilling, events)
        if decoding:
            n_steps = 1  # several only while no prompt waits on the next step and no stop token can end one early
            if self.decode_steps > 1 and not prefilling and not any(r.stops for r in decoding):
                n_steps = min(self.decode_steps, min(r.max_new - len(r.tokens) for r in decoding))
            self._decode(decoding, events, n_steps)
        self.stats["steps"] += 1
        self.stats["max_running"] = max(self.stats["max_running"], len(running))
        self.stats["pages_in_use"] = self._alloc.in_use
        return events

    def _prefill(self, reqs: list[_Request], events: list) -> None:
        """One chunk of every prompt in ``reqs`` in one [R, chunk] call, R the next power of two at or above
        their count (at most ``max_batch``; the rows past them hold no page and write nothing)."""
        c = self.prefill_chunk
        n_rows = self._prefill_rows(len(reqs))
        rows: list[Optional[_Request]] = [None] * n_rows
        tokens = np.zeros((n_rows, c), np.int32)
        starts, valid = np.zeros((n_rows,), np.int32), np.zeros((n_rows,), np.int32)
        table = empty_page_table(n_rows, self.pages_per_seq, self.num_pages)
        for row, req in enumerate(reqs):
            piece = req.prompt[req.length:req.length + c]
            self._grow(req, req.length + len(piece))
            rows[row], tokens[row, :len(piece)] = req, piece
            starts[row], valid[row], table[row] = req.length, len(piece), self._table[req.slot]
        out = self._call(rows, tokens, starts, valid, table)[:, 0]
        self.stats["prefill_calls"] += 1
        for row, req in enumerate(rows):
            if req is not None:
                req.length += int(valid[row])
                if req.length == len(req.prompt):
                    self._emit(req, int(out[row]), events)

    def _prefill_rows(self, n: int) -> int:
        return min(self.max_batch, 1 << (n - 1).bit_length())

    def warmup(self) -> None:
        """Compile (and run once, on rows that hold no page, so nothing changes) every program of the
        engine -- decode, the decode burst, and prefill chunks of 1, 2, 4, ... prompts -- ahead of the
        first requests."""
        prefill_rows = sorted({self._prefill_rows(n) for n in range(1, self.max_batch + 1)})
        shapes = [(self.max_batch, 1, 1)] + [(r, self.prefill_chunk, 1) for r in prefill_rows]
        for n_rows, t, n_steps in shapes + ([(self.max_batch, 1, 2)] if self.decode_steps > 1 else []):
            table = empty_page_table(n_rows, self.pages_per_seq, self.num_pages)
            zeros = np.zeros((n_rows,), np.int32)
            self._call([None] * n_rows, np.zeros((n_rows, t), np.int32), zeros, zeros + 1, table, n_steps=n_steps)

    def _decode(self, decoding: list[_Request], events: list, n_steps: int) -> None:
        """``n_steps`` tokens of every generating request in one call (each request has at least that
        many left, so none finishes before the last)."""
        rows: list[Optional[_Request]] = [None] * self.max_batch
        tokens = np.zeros((self.max_batch, 1), np.int32)
        lengths = np.zeros((self.max_batch,), np.int32)
        table = empty_page_table(self.max_batch, self.pages_per_seq, self.num_pages)
        for req in decoding:
            self._grow(req, req.length + n_steps)
            rows[req.slot] = req
            tokens[req.slot, 0], lengths[req.slot] = req.tokens[-1], req.length
            table[req.slot] = self._table[req.slot]
        valid = np.ones((self.max_batch,), np.int32)
        out = self._call(rows, tokens, lengths, valid, table, n_steps=n_steps)
        self.stats["decode_calls"] += 1
        for i in range(n_steps):
            for req in decoding:
                req.length += 1
                self._emit(req, int(out[req.slot, i]), events)

    def run_until_done(self) -> dict[int, list[int]]:
        """Step until no request waits or runs; returns every finished request's tokens by id."""
        while self._waiting or any(r is not None for r in self._slots):
            self.step()
        return {rid: list(req.tokens) for rid, req in self._done.items()}

    def __repr__(self) -> str:
        return (f"Engine({self.cfg.attention}, max_batch={self.max_batch}, page_size={self.page_size}, "
                f"num_pages={self.num_pages}, cache_dtype={self.cache_dtype.name}, running={self.num_running}, "
                f"waiting={self.num_waiting})")
