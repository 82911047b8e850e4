"""Recall accuracy of a model on the held-out split of the synthetic associative-recall task
(``tpa_jax.data.recall``), computed with the training loop's own recall eval step."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import numpy as np

from ..config import ModelConfig
from ..data.recall import RecallSource, RecallTask, recall_batches, recall_ratios
from ..train.step import make_recall_eval_step

__all__ = ["evaluate_recall"]


@functools.lru_cache(maxsize=None)
def _recall_step(cfg: ModelConfig):
    return jax.jit(make_recall_eval_step(cfg))


def evaluate_recall(model: Any, params: Any, data_cfg: Any, *, batches: int = 8, batch_size: int = 16,
                    seed: Optional[int] = None, split: str = "val") -> dict:
    """Recall accuracy of ``model`` (a ``Transformer`` or a ``ModelConfig``) with ``params`` on the
    first ``batches * batch_size`` examples of the held-out ``split`` of the task in ``data_cfg``
    (a ``DataConfig`` or a ``RecallTask``). ``seed`` overrides the generator seed (default: the
    config's ``recall_seed``); the held-out stream differs from the training one for any seed.

    Returns ``{"loss", "acc", "exact", "correct", "total", "all_correct", "examples"}`` (single process)."""
    task = data_cfg if isinstance(data_cfg, RecallTask) else RecallTask.from_config(data_cfg)
    if seed is not None:
        task = dataclasses.replace(task, seed=int(seed))
    model_cfg = model.cfg if hasattr(model, "cfg") else model
    step = _recall_step(model_cfg)
    source = RecallSource(task, split, batches * batch_size)
    losses, totals = [], None
    for batch in recall_batches(source, batch_size, batches):
        out = jax.device_get(step(params, batch))
        losses.append(float(out.pop("loss")))
        totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
    return {"loss": float(np.mean(losses)), **recall_ratios(totals)}
