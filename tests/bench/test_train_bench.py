"""bench/train.py --quick (the real AdamW train step on a mesh, every mechanism) prints one JSON
object with tokens/s, a ratio to MHA and parameter counts for every mechanism."""
import json
import math
import os
import subprocess
import sys

import pytest

from tpa_jax import accounting, configs
from test_forward_bench import built_counts
from _util import ROOT


@pytest.mark.slow
def test_train_bench_quick():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmark is meant to run on CPU
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    mechanisms = set(configs.MECHANISMS)
    assert set(out["results"]) == set(out["ratio_to_mha"]) == mechanisms
    assert out["baseline"] == "mha"
    cfg = out["config"]
    assert cfg["quick"] and cfg["backend"] == "cpu" and cfg["tokens_per_step"] == cfg["batch"] * cfg["seq_len"]
    assert cfg["jax"] and cfg["device_kind"] and cfg["mesh_devices"] == 1
    for name, r in out["results"].items():
        c = configs.get(f"{name}-{cfg['size']}")
        assert r["tokens_per_s"] > 0 and r["median_s"] > 0
        assert abs(r["tokens_per_s"] * r["median_s"] - cfg["tokens_per_step"]) <= 1e-3 * cfg["tokens_per_step"]
        assert r["ratio_to_mha"] == out["ratio_to_mha"][name] > 0
        assert (r["attention_params_per_layer"], r["model_params"]) == built_counts(c)
        assert r["train_flops_per_token"] == accounting.flops_per_token(c, cfg["seq_len"], training=True) > 0
        assert r["mfu"] is None  # peak FLOP/s unknown on CPU
        assert r["finite"] and math.isfinite(r["final_loss"])
        assert r["final_loss"] < r["first_loss"]  # AdamW updates on the fixed batch lower the loss


@pytest.mark.slow
def test_train_bench_compares_attention_impls():
    """Several --attention-impl values: every mechanism under each, timed in one run, with the time
    ratio to the first implementation; the same parameters and batch give the same first loss."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--quick", "--mechanisms", "t6",
                           "--attention-impl", "xla,blocked", "--seq-len", "300"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    r = out["results"]
    assert set(r) == {"t6@xla", "mha@xla", "t6@blocked", "mha@blocked"} and out["baseline"] == "mha@xla"
    assert out["config"]["seq_len"] == 300  # beyond the tiny family's max_seq_len (256): raised to it
    ratios = out["time_ratio_to_xla"]
    assert set(ratios) == {"t6@blocked", "mha@blocked"}
    for name, ratio in ratios.items():
        m = name.split("@")[0]
        assert ratio == pytest.approx(r[name]["median_s"] / r[f"{m}@xla"]["median_s"], rel=1e-3)
        assert r[name]["first_loss"] == pytest.approx(r[f"{m}@xla"]["first_loss"], abs=1e-3)
