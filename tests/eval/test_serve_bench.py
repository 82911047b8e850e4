"""Serving benchmark: the workload, the concurrency figures against an independent count (cache
bytes per token written out from each config's shapes), the headline ratios, the figure, and the
smoke run end to end through ``bench/serve.py`` (engine against padded generate: tokens/s, latencies,
exact lengths, the same greedy tokens, admission as predicted, no compile while timed; one JSON object
on stdout); ``eval.py serve-bench`` runs the same code (its --no-run path and bad input are tested)."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from tpa_jax.eval.cli import main
from tpa_jax.eval.serve_bench import GIB, concurrency, make_workload, request_lengths, run_serve_bench
from tpa_jax.eval.serve_report import SMOKE, plot
from _util import ROOT

# cached bytes per token per layer of the paper's small configs, from Tables 9-10 and App. H.1:
# TPA h = 34, d_h = 64, R_K = R_V = 2 (A_K, B_K, A_V, B_V; int8: a float32 scale per factor row);
# MHA 12 heads of 64 (K and V; int8: a scale per head); GQA 2 KV heads; MLA d_c = 256 + d^R_h = 32
# (int8: one scale each).  All have 12 layers.
SMALL_BYTES = {("tpa", "bfloat16"): 2 * 2 * (34 + 64) * 2, ("tpa", "int8"): 2 * 2 * (34 + 64) + 8 * 4,
               ("mha", "bfloat16"): 2 * 12 * 64 * 2, ("mha", "int8"): 2 * 12 * 64 + 2 * 12 * 4,
               ("gqa", "bfloat16"): 2 * 2 * 64 * 2, ("gqa", "int8"): 2 * 2 * 64 + 2 * 2 * 4,
               ("mla", "bfloat16"): (256 + 32) * 2, ("mla", "int8"): 256 + 32 + 2 * 4}
SMOKE_ARGS = ["serve-bench", "--smoke", "--quiet"]


def fcfs(budget, bytes_per_token, n_layer, page_size, tokens, max_batch=None):
    """How many requests (cache rows each) are admitted, in order, before the first that does not fit."""
    pages = budget // (bytes_per_token * n_layer * page_size)
    held = n = 0
    for t in tokens:
        p = -(-t // page_size)
        if held + p > pages or (max_batch is not None and n >= max_batch):
            break
        held, n = held + p, n + 1
    return n


def test_workload_is_seeded_and_ragged():
    w = make_workload(200, (8, 96), (4, 64), 256, seed=3)
    assert w == make_workload(200, (8, 96), (4, 64), 256, seed=3) != make_workload(200, (8, 96), (4, 64), 256, seed=4)
    prompts, outs = [len(r["prompt"]) for r in w], [r["max_new_tokens"] for r in w]
    assert min(prompts) >= 8 and max(prompts) <= 96 and len(set(prompts)) > 30
    assert min(outs) >= 4 and max(outs) <= 64 and len(set(outs)) > 30
    assert all(0 <= t < 256 for r in w for t in r["prompt"])
    p, o = request_lengths(200, (8, 96), (4, 64), 3)
    assert p.tolist() == prompts and o.tolist() == outs
    with pytest.raises(ValueError):
        request_lengths(5, (9, 4), (1, 2), 0)


def test_concurrency_matches_an_independent_count():
    prompts, outputs = request_lengths(20_000, (8, 96), (4, 64), 0)
    tokens = (prompts + outputs - 1).tolist()  # cache rows: the last new token is never written back
    budgets = [GIB // 4, GIB, 3 * GIB]
    res = concurrency("small", budgets, 16, tokens)
    assert len(res["entries"]) == 4 * 2 * 3 and res["configs"]["tpa"] == "t6-small"
    for e in res["entries"]:
        bpt = SMALL_BYTES[(e["mechanism"], e["cache_dtype"])]
        assert e["bytes_per_token"] == bpt * 12 and e["num_pages"] == e["budget_bytes"] // (bpt * 12 * 16)
        assert e["max_concurrent"] == fcfs(e["budget_bytes"], bpt, 12, 16, tokens) and not e["saturated"]
    by = {(e["mechanism"], e["cache_dtype"], e["budget_bytes"]): e["max_concurrent"] for e in res["entries"]}
    for row in res["ratios"]:
        b = row["budget_bytes"]
        assert row["tpa_bf16/mha_bf16"] == by[("tpa", "bfloat16", b)] / by[("mha", "bfloat16", b)]
        assert row["tpa_int8/mha_bf16"] == by[("tpa", "int8", b)] / by[("mha", "bfloat16", b)]
        assert row["tpa_int8/mha_int8"] == by[("tpa", "int8", b)] / by[("mha", "int8", b)]
        # the cache bytes set the ratios, up to page rounding of the ragged requests
        assert row["tpa_bf16/mha_bf16"] == pytest.approx(3072 / 784, rel=0.05)
        assert row["tpa_int8/mha_bf16"] == pytest.approx(3072 / 424, rel=0.05)


def test_concurrency_only_run_and_figure(tmp_path, capsys):
    """--no-run: the concurrency figures, ratios at the largest budget, goals, JSON and PNG; no model."""
    assert main([*SMOKE_ARGS, "--no-run", "--budget-gib", "0.25", "1", "--out", str(tmp_path)]) == 0
    assert "tpa_bf16/mha_bf16" in capsys.readouterr().out
    r = json.loads((tmp_path / "serve_bench.json").read_text())
    assert r["runs"] == [] and r["ratio_budget_gib"] == 1 and r["config"]["budgets_gib"] == [0.25, 1]
    top = r["concurrency"]["ratios"][-1]
    assert r["ratios"]["tpa_int8/mha_bf16"] == top["tpa_int8/mha_bf16"] and r["ratios"]["engine/padded"] == {}
    goal = r["goals"]["tpa_int8/mha_bf16"]
    assert goal["goal"] == 7 and goal["met"] == (goal["value"] >= 7)
    prompts, outputs = request_lengths(SMOKE["concurrency_requests"], SMOKE["prompt_range"], SMOKE["output_range"], 0)
    tokens = (prompts + outputs - 1).tolist()
    for e in r["concurrency"]["entries"]:
        bpt = SMALL_BYTES[(e["mechanism"], e["cache_dtype"])]
        assert e["max_concurrent"] == fcfs(e["budget_bytes"], bpt, 12, SMOKE["page_size"], tokens)
    _check_png(tmp_path / "serve_bench.png")


def _check_png(path, min_size=10_000):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_size


@pytest.mark.parametrize("argv", [
    ["--mechanism", "mqa"],
    ["--cache-dtype", "int4"],
    ["--prompt-range", "9", "4"],
    ["--budget-gib", "0"],
    ["--requests", "0"],
    ["--concurrency-size", "huge"],
    ["--run-budget-mb", "0.001"],  # too small for the longest request: refused before anything runs
])
def test_cli_bad_input_is_one_line_exit_2(argv, tmp_path, capsys):
    assert main([*SMOKE_ARGS, "--out", str(tmp_path / "sb"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert not (tmp_path / "sb").exists()


# ---------------------------------------------------------------------------------------------- smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of the goals' pair (TPA, MHA) through the script ``bench/serve.py`` (the same
    ``run_serve_bench_args`` as ``eval.py serve-bench``, whose own path the --no-run test runs):
    (out dir, the JSON written there, the script's stdout)."""
    out = tmp_path_factory.mktemp("serve")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "serve.py"), *SMOKE_ARGS[1:], "--reps", "1",
           "--mechanism", "tpa", "mha", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "serve_bench.json").read_text()), proc.stdout


def test_smoke_runs_every_mechanism_and_dtype(smoke):
    out, r, _ = smoke
    assert r["benchmark"] == "serving" and r["config"]["backend"] == "cpu"
    assert [(x["mechanism"], x["cache_dtype"]) for x in r["runs"]] == \
        [(m, d) for m in ("tpa", "mha") for d in ("bfloat16", "int8")]
    w = r["workload"]
    assert w["requests"] == SMOKE["requests"]
    for x in r["runs"]:
        e, p = x["engine"], x["padded"]
        for t in (e, p):
            assert t["generated_tokens"] == w["generated_tokens"] and t["compiles_during_timing"] == 0
            assert t["tokens_per_s"] == pytest.approx(t["generated_tokens"] / t["wall_s"], rel=1e-12)
            assert len(t["times_s"]) == 1 and t["wall_s"] == pytest.approx(statistics.median(t["times_s"]))
        assert x["speedup"] == pytest.approx(e["tokens_per_s"] / p["tokens_per_s"], rel=1e-12)
        assert r["ratios"]["engine/padded"][f"{x['mechanism']}_{x['cache_dtype']}"] == x["speedup"]
        assert e["exact_lengths"] and x["greedy_matching_requests"] == w["requests"]
        assert e["token_gap"]["n"] == w["generated_tokens"] - w["requests"]
        # tokens of one decode burst come out together (gap 0), the burst after them later
        assert 0 <= e["token_gap"]["p50_s"] <= e["token_gap"]["p99_s"] and e["token_gap"]["p99_s"] > 0
        assert e["first_token"]["n"] == w["requests"]
        assert p["padded_tokens"] >= w["generated_tokens"] and p["cache_bytes_per_batch_max"] > 0
        # the pool of the run, and the engine admitted what max_concurrent predicts for it
        assert x["num_pages"] == r["config"]["run_budget_bytes"] // x["page_bytes"]
        assert e["stats"]["num_pages"] == x["num_pages"] and x["admission_matches"]
        assert e["max_running_before_first_finish"] == x["max_concurrent"] <= e["stats"]["max_running"]
        assert 1 <= x["max_concurrent"] <= SMOKE["max_batch"]
    _check_png(out / "serve_bench.png")


def test_smoke_goals_are_the_ratios(smoke):
    _, r, _ = smoke
    assert set(r["goals"]) == {"tpa_bf16/mha_bf16", "tpa_int8/mha_bf16", "engine/padded"}
    assert r["goals"]["engine/padded"]["value"] == min(r["ratios"]["engine/padded"].values())
    for g in r["goals"].values():
        assert math.isfinite(g["value"]) and g["met"] == (g["value"] >= g["goal"])


def test_bench_script_prints_one_json_object(smoke):
    """bench/serve.py prints exactly one JSON object on stdout: the result it writes, for the
    mechanisms asked for (the smoke fixture's run)."""
    out, r, stdout = smoke
    printed = json.loads(stdout)
    assert [(x["mechanism"], x["cache_dtype"]) for x in printed["runs"]] == \
        [(m, d) for m in ("tpa", "mha") for d in ("bfloat16", "int8")]
    assert printed == r
    _check_png(out / "serve_bench.png")


def test_plot_draws_one_line_per_mechanism_and_dtype(tmp_path, monkeypatch):
    """Requests against budget on log axes: one line per config and cache dtype, at max_concurrent."""
    from matplotlib.axes import Axes

    res = dict(concurrency=concurrency("tiny", [2 ** 20, 2 ** 22], 8, [24] * 5000, mechanisms=("tpa", "mha")))
    axes = []
    real = Axes.set_yscale
    monkeypatch.setattr(Axes, "set_yscale", lambda ax, v, **kw: (axes.append((ax, v)), real(ax, v, **kw))[1])
    _check_png(plot(res, str(tmp_path / "c.png")), min_size=5_000)
    ((ax, scale),) = axes
    ys = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert scale == "log" and ax.get_xscale() == "log"
    assert set(ys) == {f"{c}-tiny ({d})" for c in ("t6", "mha") for d in ("bfloat16", "int8")}
    tpa = [e["max_concurrent"] for e in res["concurrency"]["entries"] if e["config"] == "t6-tiny"
           and e["cache_dtype"] == "int8"]
    assert ys["t6-tiny (int8)"] == tpa and tpa[1] > tpa[0]


def test_run_serve_bench_rejects_bad_values():
    for kw in (dict(mechanisms=("xyz",)), dict(cache_dtypes=("float8",)), dict(max_batch=0),
               dict(budgets_gib=()), dict(concurrency_size="huge")):
        with pytest.raises(ValueError):
            run_serve_bench(run=False, **kw)
