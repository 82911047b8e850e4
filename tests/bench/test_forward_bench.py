"""bench/forward.py --quick runs and prints one JSON object with a ratio for every mechanism."""
import json
import math
import os
import subprocess
import sys

import jax
import pytest

import tpa_jax
from tpa_jax import configs
from _util import ROOT


def built_counts(cfg):
    """(attention parameters of one layer, all parameters), counted on the built parameter tree."""
    params = tpa_jax.model.abstract_params(cfg)
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
    return count(params["blocks"]["attn"]) // cfg.n_layer, count(params)


@pytest.mark.slow
def test_forward_bench_quick():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmark is meant to run
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "forward.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert set(out["ratio_to_mha"]) == set(configs.MECHANISMS) == set(out["results"])
    cfg = out["config"]
    assert cfg["quick"] and cfg["backend"] == "cpu" and cfg["tokens_per_step"] == cfg["batch"] * cfg["seq_len"]
    base = out["results"]["mha"]
    for name, r in out["results"].items():
        assert r["ratio_to_mha"] == out["ratio_to_mha"][name] > 0
        assert r["tokens_per_s"] > 0 and r["median_s"] > 0
        # tokens/s is tokens per step over the median step time (rounding of the printed values aside)
        assert abs(r["tokens_per_s"] * r["median_s"] - cfg["tokens_per_step"]) <= 1e-3 * cfg["tokens_per_step"]
        assert r["ratio_to_mha"] == pytest.approx(r["tokens_per_s"] / base["tokens_per_s"], abs=1e-4)
        # parameter counts are those of the built tiny model of that name
        c = configs.get(f"{name}-{cfg['size']}")
        assert r["n_head"] == c.n_head
        assert (r["attention_params_per_layer"], r["model_params"]) == built_counts(c)
        assert math.isfinite(r["final_loss"])
