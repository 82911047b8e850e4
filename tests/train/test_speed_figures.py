"""The speed a run logs is the speed it ran at: step_time / tokens_per_s cover completed device work
(never dispatch alone), evaluation, saving and compilation are left out (compile_s is logged once),
and MFU is tokens/s x FLOPs per token / (peak x devices)."""
import time

import numpy as np

from tpa_jax import accounting
from tpa_jax.train import checkpoint as ckpt
from tpa_jax.train import loop, train
from tpa_jax.train.metrics import MetricsWriter, read_metrics

from _train_util import BATCH, SEQ, make_cfg


def test_logged_speed_matches_the_wall_clock(tmp_path, corpus, monkeypatch):
    stamps, excluded = {}, []

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                excluded.append((t0, time.perf_counter()))
        return wrapper

    real_write = MetricsWriter.write

    def write(self, rec):
        real_write(self, rec)
        stamps.setdefault("compile" if "compile_s" in rec else "last", time.perf_counter())
        if "loss" in rec:
            stamps["last"] = time.perf_counter()

    monkeypatch.setattr(MetricsWriter, "write", write)
    monkeypatch.setattr(loop, "evaluate", timed(loop.evaluate))
    monkeypatch.setattr(ckpt, "save", timed(ckpt.save))
    cfg = make_cfg(tmp_path, corpus, steps=14, log_every=3, eval_every=5, save_every=4, peak_flops=1e12)
    train(cfg, progress=False)

    recs = read_metrics(tmp_path)
    (compile_rec,) = [r for r in recs if "compile_s" in r]
    assert compile_rec["step"] == 0 and compile_rec["compile_s"] > 0
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 15))
    tokens = BATCH * SEQ * len(steps)
    logged = tokens / sum(r["step_time"] for r in steps)
    # the evaluations (5, 10) and saves (4, 8, 12) between compiling and the last step's record
    inside = [b - a for a, b in excluded if stamps["compile"] < a < stamps["last"]]
    assert len(inside) == 5
    loop_time = stamps["last"] - stamps["compile"] - sum(inside)
    truth = tokens / loop_time
    assert abs(logged / truth - 1) < 0.15, (logged, truth)
    for r in steps:
        assert np.isclose(r["tokens_per_s"], BATCH * SEQ / r["step_time"])
        flops = accounting.flops_per_token(cfg.model, SEQ, training=True)
        assert np.isclose(r["mfu"], r["tokens_per_s"] * flops / (1e12 * 8), rtol=1e-9)
