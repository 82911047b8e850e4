"""Batched log-likelihood scoring behind ``TPAJaxLM`` (``tpa_jax.eval.lm_eval_adapter``).

* :func:`score_rows` -- for ``(inputs, targets)`` rows (the targets label the last
  ``len(targets)`` inputs): the sum of the targets' log-probabilities and whether every target is
  the argmax, from one forward pass per batch of rows;
* :func:`rolling_windows` -- disjoint prediction windows over a long text.

Rows are sorted by length (longest first), taken ``batch_size`` at a time and right-padded to a
bucketed length (a power of two, at least 8, at most ``max_length``); the batch dimension is
padded to a power of two no larger than ``batch_size``.  The model is causal, so padding never
changes a score; results come back in the order of the rows.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..inference.generate import length_bucket
from ..model import logits_fn

__all__ = ["MIN_BUCKET", "next_pow2", "bucket", "rolling_windows", "score_rows"]

MIN_BUCKET = 8
Row = Tuple[Sequence[int], Sequence[int]]


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return length_bucket(n, 1)


def bucket(n: int, max_length: int) -> int:
    """Padded length of a batch whose longest row has ``n`` tokens (generation's length buckets)."""
    return min(max_length, length_bucket(n, MIN_BUCKET))


@functools.lru_cache(maxsize=None)
def _score_fn(cfg: ModelConfig) -> Callable:
    """jitted ``(params, tokens [B, T], targets [B, T]) -> (log p(targets) [B, T], targets are the
    argmax [B, T])`` (only [B, T] arrays leave the device, never the [B, T, vocab] logits)."""
    logits_of = logits_fn(cfg)

    @jax.jit
    def score(params, tokens, targets):
        logits = logits_of(params, tokens).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return picked, jnp.argmax(logits, axis=-1) == targets

    return score


def rolling_windows(tokens: Sequence[int], prefix: int, window: int) -> List[Tuple[List[int], List[int]]]:
    """Disjoint prediction windows over ``tokens``: a list of ``(inputs, targets)`` where the targets
    are the next-token labels of the last ``len(targets)`` inputs.

    The first window predicts ``tokens[:window]`` from ``[prefix] + tokens[:window - 1]``; each
    later one predicts the next (up to) ``window`` tokens from the ``window`` tokens before its last
    target.  Every token is predicted exactly once (the harness's scheme with ``context_len=1``)."""
    tokens = list(tokens)
    if window < 1:
        raise ValueError(f"rolling_windows: window must be >= 1, got {window}")
    out: List[Tuple[List[int], List[int]]] = []
    if not tokens:
        return out
    first = min(window, len(tokens))
    out.append(([prefix] + tokens[: first - 1], tokens[:first]))
    done = first
    while done < len(tokens):
        end = min(done + window, len(tokens))
        out.append((tokens[end - window - 1: end - 1], tokens[done:end]))
        done = end
    return out


def _progress(chunks: list, desc: str, disable: bool) -> Iterable:
    try:
        from tqdm.auto import tqdm

        return tqdm(chunks, desc=desc, disable=disable)
    except Exception:  # pragma: no cover - tqdm missing or broken
        return chunks


def score_rows(cfg: ModelConfig, params: Any, rows: Sequence[Row], *, batch_size: int, max_length: int,
               disable_tqdm: bool = True, desc: str = "") -> List[Tuple[float, bool]]:
    """(sum of target log-probs, all targets greedy) per ``(inputs, targets)`` row, in row order."""
    score = _score_fn(cfg)
    out: List[Optional[Tuple[float, bool]]] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in _progress(chunks, desc, disable_tqdm):
        t = bucket(max(len(rows[i][0]) for i in chunk), max_length)
        b = min(batch_size, next_pow2(len(chunk)))
        tokens = np.zeros((b, t), np.int32)
        targets = np.zeros((b, t), np.int32)
        mask = np.zeros((b, t), bool)
        for r, i in enumerate(chunk):
            inp, tgt = rows[i]
            n, k = len(inp), len(tgt)
            tokens[r, :n] = inp
            targets[r, n - k: n] = tgt
            mask[r, n - k: n] = True
        picked, greedy = score(params, tokens, targets)
        picked = np.asarray(picked, np.float64)
        greedy = np.asarray(greedy)
        for r, i in enumerate(chunk):
            m = mask[r]
            out[i] = (float(picked[r][m].sum()), bool(greedy[r][m].all()))
    return out  # type: ignore[return-value]
