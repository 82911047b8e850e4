"""eval.py's command line: value parsing, one-line errors with exit code 2, the decode-bench
options shared with bench/decode.py and its output files (the sub-commands' results are checked
in test_kv_report.py, test_decode_bench.py and test_run.py)."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from tpa_jax.eval import cli
from tpa_jax.eval.cli import add_decode_bench_arguments, main, write_decode_bench
from _util import ROOT


@pytest.mark.parametrize("text, value", [("1", 1), ("2**20", 1048576), (" 3 ** 2 ", 9), ("65536", 65536)])
def test_positive_int(text, value):
    assert cli._positive_int(text) == value


@pytest.mark.parametrize("text", ["0", "-4", "2**-1", "1.5", "x", "2**"])
def test_positive_int_rejects(text):
    with pytest.raises((argparse.ArgumentTypeError, ValueError)):
        cli._positive_int(text)


@pytest.mark.parametrize("text, ok", [("0.5", True), ("4.8e12", True), ("0", False), ("-1", False), ("inf", False),
                                      ("nan", False), ("many", False)])
def test_positive_float(text, ok):
    if ok:
        assert cli._positive_float(text) == float(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            cli._positive_float(text)


@pytest.mark.parametrize("argv", [
    [],
    ["no-such-command"],
    ["perplexity"],                                           # --checkpoint is required
    ["generate", "--checkpoint", "somewhere"],                # --prompt is required
    ["perplexity", "--checkpoint", "no/such/run/dir"],        # FileNotFoundError from the loader
    ["decode-bench", "--max-log2", "3", "--min-log2", "4"],
    ["kv-report", "--max-context", "2**0.5"],
])
def test_bad_input_is_one_line_exit_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, wherever the defaults point
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert os.listdir(tmp_path) == []


def test_decode_bench_options_are_shared():
    p = argparse.ArgumentParser()
    add_decode_bench_arguments(p, out_default=None)
    args = p.parse_args([])
    assert args.mechanism is None and args.out is None and args.decode_impl == "flash"
    assert (args.d_model, args.batch, args.min_log2, args.max_log2) == ([1024, 2048], [1, 4], 10, 15)
    sub = cli.build_parser().parse_args(["decode-bench", "--d-model", "2**6", "--mechanism", "tpa", "mla"])
    assert sub.d_model == [64] and sub.mechanism == ["tpa", "mla"]
    assert sub.out == os.path.join("runs", "decode_bench")


def test_write_decode_bench_without_entries(tmp_path):
    result = {"benchmark": "decode_per_token", "config": {}, "entries": [], "skipped": [{"context": 16}],
              "ratios": []}
    json_path, png_path = write_decode_bench(result, str(tmp_path / "out"))
    assert png_path is None and os.listdir(tmp_path / "out") == ["decode_bench.json"]
    assert json.loads(open(json_path).read()) == result


def test_eval_script_exit_codes(tmp_path):
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "kv-report", "--config", "bogus"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "bogus" in bad.stderr
    ok = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "kv-report", "--config", "t6-tiny",
                         "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "kv_report.json").exists() and (tmp_path / "kv_report.png").exists()
