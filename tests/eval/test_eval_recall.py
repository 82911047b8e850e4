"""evaluate_recall: loss, per-query accuracy and per-example exactness on the held-out recall
examples, against an explicit forward pass over the same examples."""
import dataclasses

import jax
import numpy as np
import pytest

import tpa_jax
from tpa_jax.data import RecallTask
from tpa_jax.eval.recall import evaluate_recall
from _util import cfg_of, init_params

TASK = RecallTask(seq_len=16, pairs=3, num_keys=6, num_values=4, seed=3)
BATCHES, BATCH = 2, 4


@pytest.fixture(scope="module")
def env():
    cfg = cfg_of("tpa", vocab_size=TASK.vocab_size, max_seq_len=16)
    model, params = init_params(cfg, seed=4)
    return cfg, model, params, jax.jit(tpa_jax.logits_fn(cfg))


def explicit(fwd, params, task, split="val"):
    """The metrics written out: argmax hits at query positions, per-batch mean cross-entropy."""
    ex = [task.example(i, split) for i in range(BATCHES * BATCH)]
    x = np.stack([e["inputs"] for e in ex])
    y = np.stack([e["targets"] for e in ex])
    logits = np.asarray(fwd(params, x), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    valid = y != -1
    nll = -np.take_along_axis(logp, np.where(valid, y, 0)[..., None], -1)[..., 0]
    losses = [nll[b * BATCH:(b + 1) * BATCH][valid[b * BATCH:(b + 1) * BATCH]].mean() for b in range(BATCHES)]
    hit = (logits.argmax(-1) == y) & valid
    return {"loss": float(np.mean(losses)), "correct": int(hit.sum()), "total": int(valid.sum()),
            "all_correct": int((hit.sum(1) == valid.sum(1)).sum()), "examples": len(ex)}


@pytest.mark.parametrize("seed", [None, 5])
def test_matches_an_explicit_forward(env, seed):
    cfg, model, params, fwd = env
    task = TASK if seed is None else dataclasses.replace(TASK, seed=seed)
    want = explicit(fwd, params, task)
    got = evaluate_recall(cfg, params, TASK, batches=BATCHES, batch_size=BATCH, seed=seed)
    assert want["total"] == BATCHES * BATCH * TASK.queries
    for k in ("correct", "total", "all_correct", "examples"):
        assert got[k] == want[k], k
    assert got["acc"] == want["correct"] / want["total"] and got["exact"] == want["all_correct"] / want["examples"]
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    # a Transformer works as well as its config
    assert evaluate_recall(model, params, TASK, batches=BATCHES, batch_size=BATCH, seed=seed) == got


def test_the_split_and_the_seed_select_the_examples(env):
    cfg, _, params, fwd = env
    val = evaluate_recall(cfg, params, TASK, batches=BATCHES, batch_size=BATCH)
    test = evaluate_recall(cfg, params, TASK, batches=BATCHES, batch_size=BATCH, split="test")
    want = explicit(fwd, params, TASK, split="test")
    assert test["correct"] == want["correct"] and test["all_correct"] == want["all_correct"]
    np.testing.assert_allclose(test["loss"], want["loss"], rtol=1e-5)
    assert test["loss"] != val["loss"]
