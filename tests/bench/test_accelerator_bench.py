"""bench/accelerator.py: its plan for a GPU and a TPU is what the accelerator check needs (train
t6-small and mha-small, bf16, batch 16 x 1024, per attention_impl; decode 2^10..2^19 for MHA, GQA,
MLA and TPA with flash and pallas; prefill Alg. 1 vs materialise at 4k and 16k), and its --smoke
form runs every part on the CPU and reports each decode point beside its measured limit."""
import json
import os
import subprocess
import sys

import pytest

from _util import ROOT

BENCH = os.path.join(ROOT, "bench", "accelerator.py")


def _plan(backend):
    p = subprocess.run([sys.executable, BENCH, "--dry-run", "--backend", backend], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)["parts"]


def _value(argv, flag):
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize("backend,impls", [("gpu", {"xla", "blocked", "cudnn"}), ("tpu", {"xla", "blocked", "splash"})])
def test_full_plan(backend, impls):
    parts = _plan(backend)
    assert set(parts) == {"train", "decode", "prefill"} and set(parts["train"]) == impls
    for impl, argv in parts["train"].items():
        assert argv[0] == os.path.join("bench", "train.py") and _value(argv, "--attention-impl") == impl
        assert (_value(argv, "--size"), _value(argv, "--batch"), _value(argv, "--seq-len"), _value(argv, "--dtype")) \
            == ("small", "16", "1024", "bfloat16")
        assert _value(argv, "--mechanisms") == "t6"  # bench/train.py always runs mha beside it
    flash, pallas = parts["decode"]["flash"], parts["decode"]["pallas"]
    for argv in (flash, pallas):
        assert (_value(argv, "--min-log2"), _value(argv, "--max-log2")) == ("10", "19")
    assert flash[flash.index("--mechanism") + 1:][:4] == ["mha", "gqa", "mla", "tpa"]
    assert _value(pallas, "--decode-impl") == "pallas" and _value(pallas, "--mechanism") == "tpa"
    (prefill,) = parts["prefill"].values()
    assert "--prefill-only" in prefill and prefill[prefill.index("--prefill-lengths") + 1:][:2] == ["4096", "16384"]


@pytest.mark.slow
def test_smoke_runs_every_part(tmp_path):
    p = subprocess.run([sys.executable, BENCH, "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert json.load(open(tmp_path / "accelerator.json")) == out
    for part, runs in out["parts"].items():
        for label, rec in runs.items():
            assert rec["status"] == "ok", (part, label, rec)
    s = out["summary"]
    assert set(s["train"]) == {"xla", "blocked"}
    for impl, by_mech in s["train"].items():
        assert set(by_mech) == {"t6", "mha"} and all(r["tokens_per_s"] > 0 and "mfu" in r for r in by_mech.values())
    got = {(d["mechanism"], d["decode_impl"]) for d in s["decode"]}
    assert got == {("mha", "flash"), ("gqa", "flash"), ("mla", "flash"), ("tpa", "flash"), ("tpa", "pallas")}
    for d in s["decode"]:
        assert d["per_token_ms"] > 0 and d["limit_ms"] > 0
        assert d["x_limit"] == pytest.approx(d["per_token_ms"] / d["limit_ms"], rel=1e-6)
    assert [r["prompt"] for r in s["prefill"]] == [64, 128]
    assert all(r["alg1_over_materialize"] > 0 for r in s["prefill"])
