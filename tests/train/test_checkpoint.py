"""Checkpoints: save and restore onto sharded targets, metadata alone, and the fallback past a
newest checkpoint that cannot be read: reported and kept in place when read directly, moved aside
to quarantine (never deleted) when a run resumes."""
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax import parallel
from tpa_jax.train import CheckpointError, train
from tpa_jax.train import checkpoint as ckpt

from _train_util import STEPS, make_cfg


def corrupt(step_dir):
    """Overwrite every array file of a saved step (its metadata stays readable)."""
    for dp, _, fs in os.walk(step_dir / "state"):
        for f in fs:
            if not f.endswith(".json") and "metadata" not in f.lower():
                with open(os.path.join(dp, f), "wb") as fh:
                    fh.write(b"garbage")


def state_at(step, sharding):
    return {"step": jnp.int32(step), "w": jax.device_put(jnp.arange(16.0).reshape(4, 4) * step, sharding)}


def test_restore_falls_back_past_a_broken_step_and_keeps_it(tmp_path, caplog):
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=1, devices=jax.devices()[:4])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    mngr = ckpt.manager(tmp_path / "ck", async_save=False)
    for s in (1, 2, 3):
        assert ckpt.save(mngr, s, state_at(s, sharding), {"step": s, "note": f"saved at {s}"})
    meta2 = ckpt.restore_meta(mngr, 2)
    assert mngr.all_steps() == [1, 2, 3] and meta2.pop("checksums").keys() == {"step", "w"}
    assert meta2 == {"step": 2, "note": "saved at 2"}
    target = ckpt.abstract_like(state_at(0, sharding))

    step, state, meta = ckpt.restore_latest(mngr, target)
    assert (step, meta["step"]) == (3, 3)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(16.0).reshape(4, 4) * 3)
    assert state["w"].sharding == sharding  # restored onto the target's sharding

    corrupt(tmp_path / "ck" / "3")
    with caplog.at_level(logging.WARNING, logger="tpa_jax.train.checkpoint"):
        step, state, meta = ckpt.restore_latest(mngr, target)
    assert (step, meta["step"], int(state["step"])) == (2, 2, 2)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(16.0).reshape(4, 4) * 2)
    assert "could not be restored" in caplog.text and "using step 2" in caplog.text
    assert os.path.isdir(tmp_path / "ck" / "3")  # kept for inspection, not deleted

    with pytest.raises(CheckpointError, match="no readable checkpoint") as e:
        ckpt.restore_latest(mngr, target, step=3)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match=r"step 7 not found .*\[1, 2, 3\]"):
        ckpt.restore_latest(mngr, target, step=7)
    mngr.close()


def test_no_checkpoint_is_one_line_error(tmp_path):
    mngr = ckpt.manager(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.restore_latest(mngr, {}, step=3)
    with pytest.raises(CheckpointError, match="none saved"):
        ckpt.restore_newest(mngr, lambda s: s)
    mngr.close()


def test_resume_falls_back_past_a_corrupt_latest_checkpoint(tmp_path, corpus, straight, caplog):
    shutil.copytree(straight[0] / "checkpoints", tmp_path / "checkpoints")
    corrupt(tmp_path / "checkpoints" / "16")
    resumed = train(make_cfg(tmp_path, corpus, steps=STEPS, save_every=100), progress=False, stop_at_step=9)
    assert resumed["start_step"] == 8
    assert "could not be restored" in caplog.text
    assert not os.path.exists(tmp_path / "checkpoints" / "16")
    (moved,) = os.listdir(tmp_path / "checkpoints" / "quarantine")  # moved aside, not deleted
    assert moved.startswith("16-") and os.path.isdir(tmp_path / "checkpoints" / "quarantine" / moved / "state")
    assert ckpt.manager(tmp_path / "checkpoints", read_only=True).all_steps() == [8, 9]
