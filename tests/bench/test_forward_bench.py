"""bench/forward.py --quick runs and prints one JSON object with a ratio for every mechanism."""
import json
import os
import subprocess
import sys
from pathlib import Path

from tpa_jax import configs
from _util import ROOT



def test_forward_bench_quick():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the benchmark is meant to run
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "forward.py"), "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    mechanisms = set(configs.MECHANISMS)
    assert set(out["ratio_to_mha"]) == mechanisms == set(out["results"])
    assert out["ratio_to_mha"]["mha"] == 1.0
    cfg = out["config"]
    assert cfg["quick"] and cfg["tokens_per_step"] == cfg["batch"] * cfg["seq_len"]
    for name, r in out["results"].items():
        assert r["ratio_to_mha"] == out["ratio_to_mha"][name] > 0
        assert r["tokens_per_s"] > 0 and r["median_s"] > 0
        # tokens/s is tokens per step over the median step time (rounding of the printed values aside)
        assert abs(r["tokens_per_s"] * r["median_s"] - cfg["tokens_per_step"]) <= 1e-3 * cfg["tokens_per_step"]
        # parameter counts are those of the named tiny config
        c = configs.get(f"{name}-{cfg['size']}")
        assert r["n_head"] == c.n_head
        assert r["model_params"] > r["attention_params_per_layer"] * c.n_layer > 0
        assert r["final_loss"] == r["final_loss"]  # not NaN
