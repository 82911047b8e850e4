"""Metrics: metrics.jsonl is appended and read back in order (TensorBoard alongside), peak FLOP/s
per chip, and the records a run writes (throughput and learning rate against their formulas)."""
import math
import types

import pytest

from tpa_jax.train.metrics import MetricsWriter, peak_flops, read_metrics

from _train_util import BATCH, LR, MIN_LR, SEQ, STEPS, WARMUP


def test_records_are_appended_and_read_back_in_order(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write({"step": 1, "loss": 2.5, "mfu": None})
    w.write({"step": 2, "loss": 2.0, "skipped_update": True})
    w.close()
    w = MetricsWriter(str(tmp_path))  # a resumed run appends
    w.write({"step": 3, "val_loss": 1.5})
    w.close()
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.5, "mfu": None},
                                           {"step": 2, "loss": 2.0, "skipped_update": True},
                                           {"step": 3, "val_loss": 1.5}]
    assert any(f.startswith("events.out.tfevents") for f in (p.name for p in (tmp_path / "tensorboard").iterdir()))


def test_a_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(str(tmp_path / "run"), enabled=False)  # processes other than the first
    w.write({"step": 1, "loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("platform,kind,flops", [
    ("gpu", "NVIDIA H100 80GB HBM3", 989e12), ("gpu", "NVIDIA H200", 989e12), ("gpu", "NVIDIA A100-SXM4-40GB", 312e12),
    ("tpu", "TPU v4", 275e12), ("tpu", "TPU v5 lite", 197e12), ("tpu", "TPU v5", 459e12),
    ("tpu", "TPU v6 lite", 918e12), ("gpu", "NVIDIA GeForce RTX 3090", None), ("cpu", "cpu", None)])
def test_peak_flops_per_chip(platform, kind, flops):
    """Dense bf16 peaks from the vendors' data sheets (v5e reports "TPU v5 lite", v5p "TPU v5");
    unknown chips and CPUs have none (no MFU)."""
    assert peak_flops(types.SimpleNamespace(platform=platform, device_kind=kind)) == flops


def test_a_run_records_every_step_and_its_evaluations(straight):
    run, out = straight
    recs = read_metrics(str(run))
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, STEPS + 1))
    assert [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r] == [
        (0, out["initial_val_loss"]), (STEPS, out["val_loss"])]
    for r in train_recs:
        assert r["tokens_per_s"] == pytest.approx(BATCH * SEQ / r["step_time"])
        assert r["mfu"] is None  # CPU: no peak to compare with
        # the lr of update s (0-based s-1): linear warmup, then cosine to MIN_LR at STEPS
        s = r["step"] - 1
        want = (LR * (s + 1) / (WARMUP + 1) if s < WARMUP else
                MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * (s - WARMUP) / (STEPS - WARMUP))))
        assert r["lr"] == pytest.approx(want, rel=1e-6)
        assert r["grad_norm"] > 0 and "skipped_update" not in r


def read_tensorboard(directory):
    """{tag: [(step, value)]} from the TFRecord event files (length, crc, payload, crc per record)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for f in sorted(directory.iterdir()):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_tags_are_grouped_and_match_the_jsonl(tmp_path):
    w = MetricsWriter(str(tmp_path))
    w.write({"step": 0, "compile_s": 2.0})
    w.write({"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "step_time": 0.25, "tokens_per_s": 100.0,
             "mfu": None})
    w.write({"step": 1, "val_loss": 1.5, "val_ppl": math.exp(1.5)})
    w.close()
    tb = read_tensorboard(tmp_path / "tensorboard")
    assert sorted(tb) == ["perf/compile_s", "perf/step_time", "perf/tokens_per_s", "train/grad_norm", "train/loss",
                          "train/lr", "val/loss", "val/ppl"]
    jsonl = read_metrics(str(tmp_path))
    assert tb["train/loss"] == [(1, 2.5)] and tb["perf/compile_s"] == [(0, 2.0)]
    assert tb["val/ppl"][0][1] == pytest.approx(jsonl[2]["val_ppl"], rel=1e-6)
