"""Validation loss and perplexity of a restored run on held-out token shards.

    run = tpa_jax.load("runs/t6-tiny")
    perplexity(run)                                   # the run's own validation split
    perplexity(run, manifest="data/fineweb/manifest.json", seq_len=1024, max_batches=50)

The split is read in order (``tpa_jax.data.pipeline.eval_batches``): windows of ``seq_len + 1``
tokens, the loss (the model entry point's ``loss_fn``) averaged over every predicted token of every
full batch.  ``run`` is anything with ``.config``, ``.params``, ``.train_config`` and ``.step``,
e.g. what ``tpa_jax.load`` returns.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Optional, Union

import jax
import jax.numpy as jnp

from ..data.pipeline import eval_batches, resolve_manifest
from ..data.shards import check_compatible, load_manifest
from ..data.tokenizers import tokenizer_mismatch
from ..model import loss_fn

__all__ = ["perplexity"]


@functools.lru_cache(maxsize=None)
def _summed_loss(cfg):
    """jitted ``(params, inputs, targets) -> (loss summed over scored targets, their count)``."""
    mean_loss = loss_fn(cfg)

    @jax.jit
    def loss(params, inputs, targets):
        count = (targets != -1).sum()
        return mean_loss(params, inputs, targets) * count, count

    return loss


def perplexity(run, manifest: Union[str, dict, None] = None, *, split: str = "val", seq_len: Optional[int] = None,
               batch_size: int = 8, max_batches: Optional[int] = None, allow_tokenizer_mismatch: bool = False) -> dict:
    """{"loss", "ppl", "tokens", "batches", ...} of ``run`` on ``split`` of ``manifest`` (default: the
    data the run was trained on).  The token-weighted mean loss is float64-accumulated.  Data
    tokenized by another tokenizer than the run's (kind, vocabulary, or the ``tokenizer.json``'s
    hash) is refused with a one-line ValueError unless ``allow_tokenizer_mismatch``."""
    tcfg = run.train_config
    seq_len = int(seq_len or tcfg.data.seq_len)
    man = resolve_manifest(tcfg.data) if manifest is None else load_manifest(manifest)
    why = tokenizer_mismatch(man["tokenizer"], run.tokenizer.to_manifest())
    if why and not allow_tokenizer_mismatch:
        raise ValueError(f"perplexity: {why}; pass allow_tokenizer_mismatch=True (--allow-tokenizer-mismatch) "
                         f"to score it anyway")
    check_compatible(man, run.config.vocab_size, seq_len, run.config.max_seq_len)
    summed = _summed_loss(run.config)
    total, count, batches = 0.0, 0, 0
    t0 = time.time()
    for batch in eval_batches(man, seq_len, batch_size, max_batches, split=split):
        s, n = summed(run.params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]))
        total += float(s)
        count += int(n)
        batches += 1
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": float(math.exp(min(loss, 50.0))), "tokens": count, "batches": batches,
            "seq_len": seq_len, "batch_size": batch_size, "split": split, "step": run.step,
            "seconds": time.time() - t0}
