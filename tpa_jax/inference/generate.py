"""Batched generation: one cached prefill, then a jit-compiled ``lax.while_loop`` of one-token
decode steps that stops when every sequence has hit a stop token or ``max_new_tokens``.

    out = tpa_jax.generate(params, cfg, [[1, 2, 3], [4, 5]], 32, temperature=0.8, top_p=0.95, seed=0)
    out.tokens   # int32 [B, 32]: generated ids, ``pad_id`` after a row's end
    out.lengths  # int32 [B]: tokens generated per row (a stop token that ended it included)

Prompts may have different lengths: they are right-padded, prefilled in one call with
``valid_lengths``, and every row then decodes at its own position.  Sampling is greedy at
``temperature == 0`` and at any ``temperature < GREEDY_BELOW`` (1e-5: dividing logits by a smaller
temperature only overflows float32, while the softmax is already one-hot); otherwise softmax(logits / temperature) restricted to the ``top_k`` most
likely tokens and to the smallest set whose probability reaches ``top_p``.  For a given seed the
result is deterministic (``seed``: an integer in 0..2**32-1).  The decode cache is pre-allocated to ``max_len`` (default: the longest
prompt plus ``max_new_tokens``, rounded up to its length bucket and capped at the model's
``max_seq_len``) and, given a ``mesh``, sharded by its logical axes.  ``cache_dtype``: the cache's
dtype (default the compute dtype; ``"int8"``: quantised factors with float32 scales, see
``tpa_jax.model.attention.quant``).

Compiling once per bucket: the compiled program depends on the batch size and on three length
buckets -- the padded prompt length, the new-token buffer and the cache length -- each the next
power of two at or above the need, with floors ``PROMPT_BUCKET``, ``NEW_TOKENS_BUCKET`` and
``CACHE_BUCKET`` (and capped at ``max_seq_len``).  ``max_new_tokens`` itself is a traced bound of
the decode loop.  So in a notebook, prompts of 5 and 9 tokens, or 20 and 30 new tokens, reuse one
compiled program; sampling settings that change the program are ``top_k`` and greedy vs sampled
(``temperature``, ``top_p`` and ``seed`` are traced).  ``count_compiles`` counts compilations.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..config import ModelConfig
from ..model import logits_fn
from ..model.attention import quant
from .. import parallel
from .cache import check_context_divides, decode_compiler_options, init_cache

__all__ = ["Generation", "generate", "sample_logits", "prepare_prompts", "length_bucket", "count_compiles"]

PROMPT_BUCKET = 16  # smallest padded prompt length; longer prompts pad to the next power of two
NEW_TOKENS_BUCKET = 16  # smallest new-token buffer
CACHE_BUCKET = 64  # smallest cache length
GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (see the module docstring)


class Generation(NamedTuple):
    """What ``generate`` returns: the new tokens and how many of them each row generated."""

    tokens: np.ndarray  # int32 [B, max_new_tokens]
    lengths: np.ndarray  # int32 [B]


def length_bucket(n: int, floor: int, cap: Optional[int] = None) -> int:
    """The bucket of a length ``n``: the next power of two >= max(n, floor), at most ``cap``
    (when n <= cap)."""
    b = max(int(floor), 1 << max(int(n) - 1, 0).bit_length())
    return b if cap is None else min(b, max(int(cap), int(n)))


Prompts = Union[Sequence[Sequence[int]], Sequence[int], np.ndarray, jax.Array]


_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # one per program traced and lowered


class CompileCount:
    """How many programs were lowered for compilation while a ``count_compiles`` block ran."""

    def __init__(self) -> None:
        self.count = 0
        self.names: list[str] = []


@contextlib.contextmanager
def count_compiles():
    """Count jit compilations inside the block (``jax.monitoring``'s lowering event, one per program
    traced and lowered, whether or not the persistent compilation cache then has it):

        with count_compiles() as c:
            run.generate("def ", 20)
        c.count, c.names
    """
    counter = CompileCount()

    def listener(event: str, duration: float, **kw: Any) -> None:
        if event == _LOWERING_EVENT:
            counter.count += 1
            counter.names.append(str(kw.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
        if unregister is None:  # older jax
            from jax._src import monitoring as _monitoring

            unregister = _monitoring._unregister_event_duration_listener_by_callback
        unregister(listener)


def prepare_prompts(prompt_tokens: Prompts, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts (sequences of ids, or an int array [B, T]) -> right-padded [B, T] and lengths."""
    if isinstance(prompt_tokens, (np.ndarray, jax.Array)):
        arr = np.asarray(prompt_tokens)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2:
            raise ValueError(f"prompt_tokens: expected [batch, length] ids, got shape {arr.shape}")
        rows = list(arr)
    else:
        rows = [np.asarray(list(r) if not isinstance(r, np.ndarray) else r) for r in prompt_tokens]
        if rows and rows[0].ndim == 0:  # one flat prompt given as a list of ints
            rows = [np.asarray(prompt_tokens)]
    if not rows:
        raise ValueError("prompt_tokens: expected at least one prompt, got none")
    lengths = np.asarray([len(r) for r in rows], np.int32)
    if lengths.min() < 1:
        raise ValueError(f"prompt_tokens: prompt {int(np.argmin(lengths))} is empty; every prompt needs >= 1 token")
    for i, r in enumerate(rows):
        if r.ndim != 1 or not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"prompt_tokens: prompt {i} must be a flat sequence of integer ids, got {r.dtype} "
                             f"shape {r.shape}")
        bad = (r < 0) | (r >= vocab_size)
        if bad.any():
            raise ValueError(f"prompt_tokens: prompt {i} has token id {int(r[bad][0])} outside the vocabulary "
                             f"0..{vocab_size - 1}")
    out = np.zeros((len(rows), int(lengths.max())), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


def sample_logits(logits_BV: jax.Array, key: jax.Array, *, temperature: Union[float, jax.Array],
                  top_k: Optional[int], top_p: Union[None, float, jax.Array], greedy: bool) -> jax.Array:
    """Next token ids [B] from float logits [B, V] (see the module docstring)."""
    logits = logits_BV.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        logits = nucleus(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def nucleus(logits_BV: jax.Array, top_p: Union[float, jax.Array]) -> jax.Array:
    """float32 logits [B, V] with every token outside the smallest set whose probability reaches
    ``top_p`` set to the float32 minimum (the most likely token is always kept)."""
    order = jnp.argsort(-logits_BV, axis=-1)
    sorted_logits = jnp.take_along_axis(logits_BV, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits_BV.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits_BV, jnp.finfo(jnp.float32).min)


def _generate_impl(params, prompts, prompt_lengths, cache, key, temperature, top_p, stop_tokens, max_new_tokens, *,
              cfg: ModelConfig, buffer: int, top_k, greedy: bool, use_top_p: bool, pad_id: int):
    forward = logits_fn(cfg)
    batch = prompts.shape[0]
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k,
                               top_p=top_p if use_top_p else None, greedy=greedy)
    logits, cache = forward(params, prompts, cache=cache, valid_lengths=prompt_lengths)
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    tok = sample(last, jax.random.fold_in(key, 0))
    is_stop = lambda t: jnp.any(t[:, None] == stop_tokens[None, :], axis=-1)
    out = jnp.full((batch, buffer), pad_id, jnp.int32).at[:, 0].set(tok)
    done = is_stop(tok)
    n_gen = jnp.ones((batch,), jnp.int32)

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, tok, out, done, n_gen = state
        logits, cache = forward(params, tok[:, None], cache=cache)
        new = sample(logits[:, 0], jax.random.fold_in(key, i))
        out = out.at[:, i].set(jnp.where(done, pad_id, new))
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | is_stop(new)
        return i + 1, cache, new, out, done, n_gen

    state = (jnp.int32(1), cache, tok, out, done, n_gen)
    _, _, _, out, _, n_gen = lax.while_loop(cond, body, state)
    return out, n_gen



@functools.cache
def _generate_jit(options: tuple = ()):
    """The jitted prefill-and-decode loop, compiled with ``options`` (``decode_compiler_options``'s
    items: made on first use, since they depend on the backend and the mechanism)."""
    return jax.jit(_generate_impl, static_argnames=("cfg", "buffer", "top_k", "greedy", "use_top_p", "pad_id"),
                   compiler_options=dict(options))


def generate(params: Any, cfg: ModelConfig, prompt_tokens: Prompts, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
             stop_tokens: Sequence[int] = (), max_len: Optional[int] = None, pad_id: int = 0,
             cache_dtype: Any = None, mesh: Optional[jax.sharding.Mesh] = None) -> Generation:
    """Generate up to ``max_new_tokens`` tokens after each prompt (see the module docstring)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an integer in 0..2**32-1, got {seed!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
    stops = np.asarray(list(stop_tokens), np.int32).reshape(-1)
    if stops.size and ((stops < 0) | (stops >= cfg.vocab_size)).any():
        raise ValueError(f"stop_tokens: ids must lie in 0..{cfg.vocab_size - 1}, got {stops.tolist()}")
    prompts, lengths = prepare_prompts(prompt_tokens, cfg.vocab_size)
    longest = int(lengths.max())
    capacity = cfg.max_seq_len if max_len is None else int(max_len)
    if capacity > cfg.max_seq_len:
        raise ValueError(f"max_len={capacity} exceeds the model's max_seq_len={cfg.max_seq_len}")
    if longest > capacity:
        raise ValueError(f"prompt of {longest} tokens is longer than max_len={capacity}")
    if longest + max_new_tokens > capacity:
        raise ValueError(f"generation past the cache capacity: prompt {longest} + max_new_tokens {max_new_tokens} "
                         f"> max_len={capacity}; shorten the prompt or ask for fewer tokens")
    if max_len is None:
        capacity = length_bucket(longest + max_new_tokens, CACHE_BUCKET, cfg.max_seq_len)
    padded_len = min(length_bucket(longest, PROMPT_BUCKET), capacity)
    buffer = length_bucket(max_new_tokens, NEW_TOKENS_BUCKET)
    prompts = np.pad(prompts, ((0, 0), (0, padded_len - prompts.shape[1])), constant_values=pad_id)
    if not stops.size:
        stops = np.asarray([-1], np.int32)  # matches nothing
    dtype = quant.cache_dtype(cache_dtype if cache_dtype is not None else cfg.compute_dtype)
    check_context_divides(capacity, mesh, "generate: cache length max_len")
    cache = init_cache(cfg, prompts.shape[0], capacity, dtype=dtype, mesh=mesh)
    greedy = temperature < GREEDY_BELOW
    # host arrays go to the jitted call as numpy: jnp.asarray would compile a transfer per new shape
    run = _generate_jit(tuple(sorted(decode_compiler_options(cfg).items())))
    with parallel.mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
        out, n = run(params, prompts, lengths, cache, jax.random.key(int(seed)),
                     np.float32(temperature if not greedy else 1.0), np.float32(top_p or 1.0),
                     stops, np.int32(max_new_tokens), cfg=cfg, buffer=buffer, top_k=top_k,
                     greedy=greedy, use_top_p=top_p is not None, pad_id=int(pad_id))
    return Generation(np.asarray(out)[:, :max_new_tokens], np.asarray(n))
