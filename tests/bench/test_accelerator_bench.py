"""bench/accelerator.py: ``--smoke`` runs every part on CPU and writes one JSON with (a) train
tokens/s and MFU per attention_impl, (b) per-token decode time per mechanism beside its memory-bound
limit, (c) prefill per token of Alg. 1 and of materialising K/V; ``--dry-run`` prints the full plan,
and every planned command parses with its benchmark's own parser."""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tpa_jax import accounting
from tpa_jax.eval.cli import add_decode_bench_arguments
from tpa_jax.eval.decode_bench import model_config
from _util import ROOT

BANDWIDTH = 1e11  # bytes/s given on the command line: CPU has no HBM table entry


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as the smoke run is meant to run
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(*args, timeout=600):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accelerator.py"), *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _arg(argv, flag):
    i = argv.index(flag)
    out = []
    for a in argv[i + 1:]:
        if a.startswith("--"):
            break
        out.append(a)
    return out


@pytest.mark.slow
def test_smoke_writes_every_part(tmp_path):
    proc = _run("--smoke", "--bandwidth", f"{BANDWIDTH:g}", "--out", str(tmp_path))
    out = json.loads((tmp_path / "accelerator.json").read_text())
    assert json.loads(proc.stdout) == out
    assert out["smoke"] and out["environment"]["backend"] == "cpu"
    for part in ("train", "decode", "prefill"):
        assert out["parts"][part] and all(r["status"] == "ok" for r in out["parts"][part].values()), out["parts"]
    s = out["summary"]

    # (a) both mechanisms under every CPU attention_impl; MFU unknown on CPU (no peak FLOP/s)
    assert set(s["train"]) == {"xla", "blocked"}
    for impl, by_mech in s["train"].items():
        assert set(by_mech) == {"t6", "mha"}, impl
        assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in by_mech.values())

    # (b) every mechanism at contexts 2^6 and 2^7 (TPA also with the Pallas kernel), each beside its limit
    points = {(p["mechanism"], p["decode_impl"], p["context"]): p for p in s["decode"]}
    want = {(m, "flash", c) for m in ("mha", "gqa", "mla", "tpa") for c in (64, 128)}
    want |= {("tpa", "pallas", c) for c in (64, 128)}
    assert set(points) == want
    entries = {(e["mechanism"], impl, e["context"]): e for impl, rec in out["parts"]["decode"].items()
               for e in rec["result"]["entries"]}
    d_model = int(_arg(out["parts"]["decode"]["flash"]["command"], "--d-model")[0])
    for key, p in points.items():
        mechanism, impl, context = key
        cfg = model_config(mechanism, d_model, max_seq_len=context, dtype="float32", decode_impl=impl)
        cache_bytes = accounting.kv_cache_per_token(cfg) * cfg.n_layer * 4 * context  # float32, batch 1
        e = entries[key]
        assert e["cache_bytes"] == cache_bytes
        # the memory-bound limit: what one step reads (cache, plus the weights) over the bandwidth
        assert p["hbm_limit_ms"] == pytest.approx(1e3 * (cache_bytes + e["param_bytes"]) / BANDWIDTH)
        assert p["per_token_ms"] == pytest.approx(1e3 * e["per_token_s"]) and p["per_token_ms"] > 0
        assert p["limit_ms"] > 0  # the limit measured in the same run: one read of the step's bytes
        assert p["x_limit"] == pytest.approx(p["per_token_ms"] / p["limit_ms"], rel=1e-6)

    # (c) TPA's cached prefill per token, Alg. 1 and materialised K/V, at both prompt lengths
    assert [r["prompt"] for r in s["prefill"]] == [64, 128]
    for r in s["prefill"]:
        assert r["alg1_ms_per_token"] > 0 and r["materialize_ms_per_token"] > 0
        assert r["alg1_over_materialize"] == pytest.approx(r["alg1_ms_per_token"] / r["materialize_ms_per_token"])


def _bench_module(name):
    spec = importlib.util.spec_from_file_location(f"_test_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("backend,impls", [("gpu", ("xla", "blocked", "cudnn")), ("tpu", ("xla", "blocked", "splash"))])
def test_dry_run_prints_the_full_plan(backend, impls, capsys):
    # in this process (a plan runs nothing; the script's own start and errors: test_bad_options_are_one_line_errors)
    returned = _bench_module("accelerator").main(["--dry-run", "--backend", backend])
    plan = json.loads(capsys.readouterr().out)  # what it prints: one JSON object, the plan it returns
    assert plan == returned
    assert plan["backend"] == backend and not plan["smoke"]
    train, decode, prefill = (plan["parts"][p] for p in ("train", "decode", "prefill"))

    # (a) t6-small and mha-small (the benchmark's baseline), bf16, batch 16 x 1024, one run per impl
    assert set(train) == set(impls)
    train_parser = _bench_module("train")
    for impl, argv in train.items():
        assert argv[0] == "bench/train.py"
        assert (_arg(argv, "--size"), _arg(argv, "--batch"), _arg(argv, "--seq-len"), _arg(argv, "--dtype")) == (
            ["small"], ["16"], ["1024"], ["bfloat16"])
        assert _arg(argv, "--attention-impl") == [impl] and _arg(argv, "--mechanisms") == ["t6"]
        args = train_parser.parse_args(argv[1:])  # parses with the benchmark's own options
        assert args.impls == [impl] and args.size == "small"
    assert train_parser.BASELINE == "mha"

    # (b) decode 2^10 .. 2^19 for MHA, GQA, MLA, TPA (flash) and TPA with the Pallas kernel
    decode_parser = argparse.ArgumentParser()
    add_decode_bench_arguments(decode_parser, out_default=None)
    assert set(decode) == {"flash", "pallas"}
    for impl, argv in decode.items():
        assert argv[0] == "bench/decode.py"
        args = decode_parser.parse_args(argv[1:])
        assert (args.min_log2, args.max_log2, args.decode_impl, args.prefill_lengths) == (10, 19, impl, [])
    assert decode_parser.parse_args(decode["flash"][1:]).mechanism == ["mha", "gqa", "mla", "tpa"]
    assert decode_parser.parse_args(decode["pallas"][1:]).mechanism == ["tpa"]

    # (c) TPA's cached prefill, Alg. 1 against materialising K and V
    (argv,) = prefill.values()
    args = decode_parser.parse_args(argv[1:])
    assert args.prefill_only and args.prefill_lengths == [4096, 16384]


def test_bad_options_are_one_line_errors():
    for args, word in ((["--parts", "train,nope"], "nope"), (["--bandwidth", "-1"], "--bandwidth")):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "accelerator.py"), "--dry-run", *args],
                              cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and word in proc.stderr.strip().splitlines()[-1]
