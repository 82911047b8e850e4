"""The train step, seen through runs of the loop: its loss is the cross-entropy of the model's
logits (recomputed in NumPy from a checkpoint and the batch that followed it), gradient
accumulation equals one big batch, and the skip policy drops non-finite updates and nothing else."""
import jax
import numpy as np

from tpa_jax.config import OptimConfig
from tpa_jax.data import make_iterator, resolve_manifest
from tpa_jax.model import logits_fn
from tpa_jax.train import checkpoint as ckpt
from tpa_jax.train import train
from tpa_jax.train.metrics import read_metrics

from _train_util import STEPS, losses, make_cfg


def numpy_cross_entropy(logits, targets, ignore=-1):
    """Mean -log softmax(logits)[target] over the targets that are not ``ignore``, in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    valid = targets != ignore
    picked = np.take_along_axis(logp, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    return float(-picked[valid].mean())


def restore(run_dir, like, step):
    """(state, meta) of ``step`` in ``run_dir``, restored onto the shardings of the state ``like``."""
    mngr = ckpt.manager(run_dir / "checkpoints", read_only=True)
    try:
        _, state, meta = ckpt.restore_latest(mngr, ckpt.abstract_like(like), step=step)
    finally:
        mngr.close()
    return state, meta


def test_loss_is_the_cross_entropy_of_the_logits(corpus, straight):
    """Step 9's recorded loss == CE of the step-8 params' logits on the 9th batch."""
    run, out = straight
    tcfg = make_cfg(run, corpus, steps=STEPS)
    state, meta = restore(run, out["state"], 8)
    iterator = make_iterator(resolve_manifest(tcfg.data), "train", tcfg.data.seq_len, tcfg.batch_size, tcfg.seed)
    iterator.set_state(meta["data_iter"])
    batch = next(iterator)
    params = jax.device_get(state["params"])  # one device, outside the sharded train step
    logits = jax.jit(logits_fn(tcfg.model))(params, np.asarray(batch["inputs"], np.int32))
    np.testing.assert_allclose(losses(run)[9], numpy_cross_entropy(logits, np.asarray(batch["targets"])), rtol=1e-5)


def test_gradient_accumulation_equals_big_batch(tmp_path, corpus, straight):
    # 4 micro-steps of 2 sequences == one step of 8, through three updates of the same schedule
    acc = make_cfg(tmp_path, corpus, steps=STEPS,
                   optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, accum_steps=4))
    train(acc, progress=False, stop_at_step=3)
    la, lb = losses(straight[0]), losses(tmp_path)
    np.testing.assert_allclose([la[s] for s in (1, 2, 3)], [lb[s] for s in (1, 2, 3)], rtol=2e-5)
    assert la[3] != la[1]  # the updates changed the model


def test_skip_policy_drops_nonfinite_updates(tmp_path, corpus):
    """An absurd learning rate makes the loss non-finite; under nan_policy="skip" training goes on,
    every skipped step is recorded, and the state after it (params and optimizer) is the one before."""
    cfg = make_cfg(tmp_path, corpus, steps=6, nan_policy="skip", save_every=1, keep=10,
                   optim=OptimConfig(lr=1e30, min_lr=0.0, warmup_steps=0, grad_clip=0.0))
    out = train(cfg, progress=False)
    recs = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    skipped = [s for s, r in recs.items() if r.get("skipped_update")]
    assert out["step"] == 6 and skipped and 1 not in skipped
    assert all(not np.isfinite(recs[s]["loss"]) or not np.isfinite(recs[s]["grad_norm"]) for s in skipped)
    for s in skipped:
        before, _ = restore(tmp_path, out["state"], s - 1)
        after, _ = restore(tmp_path, out["state"], s)
        assert int(after["step"]) == s  # the counter advances either way
        for key in ("params", "opt_state"):
            for a, b in zip(jax.tree_util.tree_leaves(after[key]), jax.tree_util.tree_leaves(before[key])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
