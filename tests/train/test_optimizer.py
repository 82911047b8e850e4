"""The optimizer: the warmup + cosine schedule against its formula, weight decay only on weights
that are >= 2-D per layer, and one AdamW update with clipping written out by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax.config import OptimConfig
from tpa_jax.model import abstract_params
from tpa_jax.train.optimizer import decay_mask, lr_schedule, make_optimizer

from _util import cfg_of


def expected_lr(step, lr, min_lr, warmup, total):
    """Linear warmup lr*(s+1)/(w+1) for s < w, then cosine from lr to min_lr over the remaining steps
    (the warmup is cut to total-1 so that the cosine part has at least one step)."""
    w = min(warmup, total - 1)
    if step < w:
        return lr * (step + 1) / (w + 1)
    progress = min(max((step - w) / max(total - w, 1), 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup,total", [(5, 25), (0, 10), (10, 3)])
def test_schedule_is_linear_warmup_then_cosine(warmup, total):
    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warmup)
    sched = lr_schedule(o, total)
    got = [float(sched(s)) for s in range(total + 5)]
    want = [expected_lr(s, 1e-3, 1e-4, warmup, total) for s in range(total + 5)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[0] > 0  # the first update is not a no-op
    assert got[-1] == pytest.approx(1e-4)  # min_lr from total_steps on
    if 0 < warmup < total:
        assert got[warmup] == pytest.approx(1e-3)  # the peak right after the warmup


def test_weight_decay_mask_is_matrices_per_layer():
    tree = {"embed": {"embedding": jnp.zeros((7, 4))},
            "blocks": {"w": jnp.zeros((2, 4, 3)), "norm": {"scale": jnp.zeros((2, 4))}},  # stacked over 2 layers
            "final_norm": {"scale": jnp.zeros((4,))}}
    assert decay_mask(tree) == {"embed": {"embedding": True}, "blocks": {"w": True, "norm": {"scale": False}},
                                "final_norm": {"scale": False}}
    # the model's tree: every norm scale is exempt, every projection and the embedding decay
    params = abstract_params(cfg_of("tpa_kvonly_outnorm_weighted"))
    flat = jax.tree_util.tree_leaves_with_path(decay_mask(params))
    names = {jax.tree_util.keystr(p): m for p, m in flat}
    scales = [n for n in names if n.endswith("['scale']")]
    assert len(scales) == 4  # the attention and MLP norms, the per-head output norm, the final norm
    assert all(not names[n] for n in scales)
    assert all(m for n, m in names.items() if n not in scales)


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_one_update_is_clipped_adamw_with_masked_decay(clip):
    lr, wd, eps, warmup = 0.1, 0.2, 0.5, 3
    o = OptimConfig(lr=lr, min_lr=0.01, warmup_steps=warmup, eps=eps, weight_decay=wd, grad_clip=clip)
    tx = make_optimizer(o, 10)
    rng = np.random.default_rng(0)
    params = {"blocks": {"w": rng.normal(size=(2, 3, 4)), "norm": {"scale": rng.normal(size=(2, 4))}},
              "embed": {"embedding": rng.normal(size=(5, 4))}}
    grads = jax.tree.map(lambda p: 3.0 * rng.normal(size=p.shape), params)
    params, grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (params, grads))
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)

    norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree.leaves(grads)))
    assert norm > 1.0  # the clip binds
    scale = min(1.0, clip / norm) if clip > 0 else 1.0
    lr0 = lr * 1 / (warmup + 1)
    decayed = {"blocks": {"w": True, "norm": {"scale": False}}, "embed": {"embedding": True}}

    def expected(g, p, d):  # Adam's first step: m_hat = g, v_hat = g^2
        g = scale * np.asarray(g, np.float64)
        return -lr0 * (g / (np.abs(g) + eps) + (wd * np.asarray(p, np.float64) if d else 0.0))

    want = jax.tree.map(expected, grads, params, decayed)
    for got, ref in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-8)
