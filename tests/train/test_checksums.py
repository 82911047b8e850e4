"""Silent corruption: each checkpoint stores a checksum per array leaf (the uint32 sum of its bit
patterns); bytes flipped inside a saved step's data file are caught at restore, so a resume falls
back to the previous step and quarantines the bad one, and ``tpa_jax.load`` falls back read-only."""
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tpa_jax
from tpa_jax import parallel
from tpa_jax.train import train
from tpa_jax.train import checkpoint as ckpt

from _train_util import STEPS, make_cfg


def numpy_checksum(x):
    """Independent reference: the bytes of ``x`` read as little-endian unsigned words, summed mod 2**32."""
    a = np.ascontiguousarray(np.asarray(x))
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    word = {1: "<u1", 2: "<u2"}.get(a.dtype.itemsize, "<u4")
    return int(np.frombuffer(a.tobytes(), dtype=word).astype(np.uint64).sum() % 2**32)


def test_checksums_match_a_numpy_bit_pattern_sum():
    rng = np.random.default_rng(0)
    tree = {"f32": rng.standard_normal((7, 5)).astype(np.float32) * 1e6,
            "bf16": jnp.asarray(rng.standard_normal(33), jnp.bfloat16),
            "i32": np.array([-1, 2**31 - 1, 5], np.int32), "step": np.int32(17),
            "u8": np.arange(250, dtype=np.uint8), "flag": np.array([True, False, True]),
            "nested": [np.full((3,), np.nan, np.float32), np.array(-0.0, np.float32)]}
    sums, finite = ckpt.checksums(tree)
    assert sums == {"f32": numpy_checksum(tree["f32"]), "bf16": numpy_checksum(np.asarray(tree["bf16"])),
                    "i32": numpy_checksum(tree["i32"]), "step": numpy_checksum(tree["step"]),
                    "u8": numpy_checksum(tree["u8"]), "flag": 2,
                    "nested/0": numpy_checksum(tree["nested"][0]), "nested/1": 2**31}
    assert finite == {"f32": True, "bf16": True, "i32": True, "step": True, "u8": True, "flag": True,
                      "nested/0": False, "nested/1": True}
    # sharded over 4 devices: the same sums
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=1, devices=jax.devices()[:4])
    x = jax.device_put(jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
                       jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
    assert ckpt.checksums({"x": x})[0] == {"x": numpy_checksum(x)}


def test_restore_rejects_a_mismatch_and_non_finite_and_accepts_old_saves(tmp_path, caplog):
    mngr = ckpt.manager(tmp_path / "ck", async_save=False)
    good = {"w": jnp.arange(6.0), "step": jnp.int32(1)}
    assert ckpt.save(mngr, 1, good, {"step": 1})
    assert ckpt.restore_meta(mngr, 1)["checksums"] == {"w": numpy_checksum(np.arange(6.0, dtype=np.float32)),
                                                       "step": 1}
    # step 2: saved without checksums (an older run) -- restores, checked for finiteness only
    mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.arange(6.0) * 2, "step": jnp.int32(2)}),
                                         meta=ocp.args.JsonSave({"step": 2})))
    mngr.wait_until_finished()
    target = ckpt.abstract_like(good)
    assert ckpt.restore_latest(mngr, target)[0] == 2
    # step 3: a checksum that does not match; step 4: non-finite params without checksums
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.arange(6.0) * 3, "step": jnp.int32(3)}),
                                         meta=ocp.args.JsonSave({"step": 3, "checksums": {"w": 12345, "step": 3}})))
    mngr.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.arange(6.0) / 0.0, "step": jnp.int32(4)}),
                                         meta=ocp.args.JsonSave({"step": 4})))
    mngr.wait_until_finished()
    with caplog.at_level(logging.WARNING, logger="tpa_jax.train.checkpoint"):
        step, state, _ = ckpt.restore_latest(mngr, target)
    assert step == 2 and int(state["step"]) == 2
    assert "checkpoint step 4: leaf w holds non-finite values" in caplog.text
    assert "checkpoint step 3: leaf w differs from its saved checksum" in caplog.text
    mngr.close()


def data_files(step_dir):
    """The saved step's array data files (OCDBT ``d/`` chunks) of 16 KiB or more, largest first: the
    params and the optimizer state each lie in one of them."""
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(step_dir / "state") for f in fs
             if os.path.basename(dp) == "d" and os.path.getsize(os.path.join(dp, f)) >= 16384]
    assert files, f"no array data files under {step_dir}"
    return sorted(files, key=os.path.getsize, reverse=True)


def flip(path, fraction, n=16):
    """Invert ``n`` bytes at ``fraction`` of the file's length."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, 2)
        at = int(size * fraction)
        fh.seek(at)
        data = bytes(b ^ 0xFF for b in fh.read(n))
        fh.seek(at)
        fh.write(data)


@pytest.mark.parametrize("fraction", [0.35, 0.5, 0.65])
def test_load_falls_back_past_flipped_bytes(tmp_path, straight, fraction, caplog):
    shutil.copytree(straight[0] / "checkpoints", tmp_path / "checkpoints")
    run = tpa_jax.load(tmp_path)
    assert run.step == STEPS
    for f in data_files(tmp_path / "checkpoints" / str(STEPS)):  # whichever holds the params
        flip(f, fraction)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with caplog.at_level(logging.WARNING, logger="tpa_jax.train.checkpoint"):
        run = tpa_jax.load(tmp_path)
    assert run.step == 8  # the flipped step is never returned
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
                and f"step {STEPS}: " in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before  # read-only: nothing moved


def test_resume_falls_back_past_flipped_bytes_and_quarantines(tmp_path, corpus, straight, caplog):
    shutil.copytree(straight[0] / "checkpoints", tmp_path / "checkpoints")
    flip(data_files(tmp_path / "checkpoints" / str(STEPS))[0], 0.5)  # the largest alone
    with caplog.at_level(logging.WARNING, logger="tpa_jax.train.checkpoint"):
        resumed = train(make_cfg(tmp_path, corpus, steps=STEPS, save_every=100), progress=False, stop_at_step=9)
    assert resumed["start_step"] == 8
    assert f"step {STEPS}: " in caplog.text and "could not be restored" in caplog.text
    (moved,) = os.listdir(tmp_path / "checkpoints" / "quarantine")
    assert moved.startswith(f"{STEPS}-")
    assert ckpt.manager(tmp_path / "checkpoints", read_only=True).all_steps() == [8, 9]
