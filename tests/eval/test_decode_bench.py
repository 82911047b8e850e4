"""Decode benchmark (paper Fig. 5): result structure, ratios, cache bytes, memory cap, pallas
scope, table and plot, the eval.py decode-bench command and bench/decode.py.

Every run is tiny (d_model 64, d_h 16, contexts 2^4..2^5, float32, 2 reps) and, except one, uses
the fast pseudo-random weight fill; runs share shapes so the persistent compilation cache serves them.
"""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from tpa_jax.eval.cli import main
from tpa_jax.eval.decode_bench import MECHANISMS, format_table, model_config, plot, run_decode_bench
from _util import ROOT

TINY = dict(d_models=(64,), head_dim=16, batch_sizes=(2,), min_log2=4, max_log2=5, reps=2, warmup=1,
            dtype="float32", param_init="fast", gqa_groups=2, prefill_lengths=())
TINY_PREFILL = dict(prefill_lengths=(32,), prefill_chunk=16, prefill_reps=2)
BANDWIDTH = 1e10


@pytest.fixture(scope="module")
def result():
    return run_decode_bench(**TINY, bandwidth=BANDWIDTH)


def numbers_per_token(mechanism, h, d, groups, mla_kv, mla_rope, ranks):
    """Cached numbers per token per layer, written out from Table 1 (independent of accounting)."""
    return {"mha": 2 * h * d, "mqa": 2 * d, "gqa": 2 * groups * d, "mla": mla_kv + mla_rope,
            "tpa": (ranks[1] + ranks[2]) * (h + d)}[mechanism]


def param_count(mechanism, m=64, h=4, d=16, groups=2, vocab=256, mlp=8, ranks=(16, 1, 1)):
    """Parameters of the one-layer benchmark model (no norm weights), written out per mechanism:
    tied embedding V M, SwiGLU 3 M I, attention with W_O = h d M; MLA (d'_c, d_c, d^R) = (24, 8, 8)
    with its two latent norm gains."""
    attn = {"mha": 3 * m * h * d, "mqa": m * h * d + 2 * m * d, "gqa": m * h * d + 2 * m * groups * d,
            "tpa": sum(r * m * (h + d) for r in ranks)}
    if mechanism == "mla":
        qc, kvc, rope = 24, 8, 8
        attn["mla"] = (m * qc + qc + qc * h * (d + rope)       # W_DQ, its norm, W_UQ (nope + rope parts)
                       + m * (kvc + rope) + kvc               # W_DKV with the shared rope key, its norm
                       + kvc * h * (d + d))                   # W_UK, W_UV
    return vocab * m + 3 * m * mlp + attn[mechanism] + h * d * m


def test_structure(result):
    result = json.loads(json.dumps(result))  # JSON-ready
    assert result["benchmark"] == "decode_per_token"
    cfg = result["config"]
    assert cfg["contexts"] == [16, 32] and cfg["mechanisms"] == list(MECHANISMS)
    assert cfg["backend"] == "cpu" and cfg["device_kind"] and cfg["dtype_bytes"] == 4
    assert cfg["tpa_ranks"] == [16, 1, 1] and cfg["decode_impl"] == "flash"
    assert result["skipped"] == [] and result["prefill"]["entries"] == []
    assert len(result["entries"]) == len(MECHANISMS) * 2
    for e in result["entries"]:
        assert e["n_head"] == 4 and e["batch"] == 2 and len(e["times_s"]) == 2
        assert e["median_s"] == e["per_token_s"] == statistics.median(e["times_s"]) > 0
        assert e["min_s"] == min(e["times_s"])
        assert e["per_token_amortized_s"] == pytest.approx(e["per_token_s"] / 2, rel=1e-12)
        assert e["cache_gb_per_s"] == pytest.approx(e["cache_bytes"] / e["per_token_s"] / 1e9, rel=1e-12)
        assert e["memory_bound_s"] == pytest.approx(e["cache_bytes"] / BANDWIDTH, rel=1e-12)
        assert e["param_bytes"] == 4 * param_count(e["mechanism"]) and e["compile_s"] > 0
    assert [(r["context"], sorted(r["time"])) for r in result["ratios"]] == \
        [(s, ["tpa/gqa", "tpa/mha", "tpa/mla", "tpa/mqa"]) for s in (16, 32)]


def test_ratios_are_quotients_of_recorded_times(result):
    by = {(e["d_model"], e["batch"], e["context"], e["mechanism"]): e for e in result["entries"]}
    for r in result["ratios"]:
        tpa = by[(r["d_model"], r["batch"], r["context"], "tpa")]
        for key, value in r["time"].items():
            other = by[(r["d_model"], r["batch"], r["context"], key.split("/")[1])]
            assert value == pytest.approx(tpa["per_token_s"] / other["per_token_s"], rel=1e-12)
            assert r["cache_bytes"][key] == pytest.approx(tpa["cache_bytes"] / other["cache_bytes"], rel=1e-12)


def test_cache_bytes_match_the_formula(result):
    cfg = result["config"]
    q_lora, kv_lora, rope = 3 * 64 // 8, 64 // 8, 16 // 2
    assert cfg["mla_dims_first_d_model"] == dict(q_lora_rank=q_lora, kv_lora_rank=kv_lora, rope_head_dim=rope)
    for e in result["entries"]:
        n = numbers_per_token(e["mechanism"], 4, 16, 2, kv_lora, rope, (16, 1, 1))
        assert e["kv_numbers_per_token_per_layer"] == n
        assert e["cache_bytes_per_token"] == n * 1 * 4
        assert e["cache_bytes"] == n * 4 * e["context"] * e["batch"]
        mc = model_config(e["mechanism"], 64, head_dim=16, dtype="float32", gqa_groups=2, max_seq_len=32)
        assert (mc.n_head, mc.head_dim, mc.d_model) == (4, 16, 64)
    # the TPA cache is (R_K + R_V)(h + d_h) = 40 numbers vs MHA's 2 h d_h = 128
    r = result["ratios"][0]["cache_bytes"]
    assert r["tpa/mha"] == 40 / 128 and r["tpa/mqa"] == 40 / 32 and r["tpa/mla"] == 40 / 16


def test_memory_cap_skips_points():
    # MHA: 512 B/token (float32) -> 16 KiB at batch 2 x 16, 32 KiB at 2 x 32; TPA: 160 B/token
    cap_bytes = 20_000
    res = run_decode_bench(**{**TINY, "mechanisms": ("mha", "tpa")}, memory_cap_gb=cap_bytes / 2 ** 30)
    measured = {(e["mechanism"], e["context"]) for e in res["entries"]}
    assert measured == {("mha", 16), ("tpa", 16), ("tpa", 32)}
    (skip,) = res["skipped"]
    assert (skip["mechanism"], skip["context"], skip["cache_bytes"]) == ("mha", 32, 512 * 2 * 32)
    assert skip["cache_bytes"] > cap_bytes and "memory cap" in skip["reason"]
    r16, r32 = res["ratios"]
    assert set(r16["time"]) == {"tpa/mha"} and r32["time"] == {}  # a time ratio needs both mechanisms
    assert r16["cache_bytes"] == r32["cache_bytes"] == {"tpa/mha": 160 / 512}
    assert "skip" in format_table(res)
    # everything skipped: nothing runs, the plot has nothing to draw
    none = run_decode_bench(**TINY, memory_cap_gb=1e-9)
    assert none["entries"] == [] and len(none["skipped"]) == len(MECHANISMS) * 2
    with pytest.raises(ValueError):
        plot(none, "unused.png")


def test_int8_cache_dtype():
    """cache_dtype="int8": bytes per token are the int8 numbers plus a float32 scale per K/V head
    (MHA: 128 + 2 * 4 * 4) or per TPA factor row (ranks 1: 40 + 4 * 4), and the step is timed."""
    res = run_decode_bench(**{**TINY, "mechanisms": ("mha", "tpa"), "max_log2": 4}, cache_dtype="int8")
    assert res["config"]["cache_dtype"] == "int8"
    got = {e["mechanism"]: e for e in res["entries"]}
    assert got["mha"]["cache_bytes_per_token"] == 128 + 2 * 4 * 4 and got["tpa"]["cache_bytes_per_token"] == 40 + 16
    assert all(e["cache_dtype"] == "int8" and e["per_token_s"] > 0 for e in got.values())
    assert got["tpa"]["cache_bytes"] == 56 * 16 * 2 and res["ratios"][0]["cache_bytes"] == {"tpa/mha": 56 / 160}


def test_model_init_weights():
    """param_init="model" (the default) runs the model's own init: same shapes as the fast fill."""
    res = run_decode_bench(**{**TINY, "mechanisms": ("mqa",), "max_log2": 4, "param_init": "model"})
    (e,) = res["entries"]
    assert res["config"]["param_init"] == "model" and e["per_token_s"] > 0
    fast = run_decode_bench(**{**TINY, "mechanisms": ("mqa",), "max_log2": 4, "reps": 1})
    assert fast["entries"][0]["param_bytes"] == e["param_bytes"]


def _check_png(path, min_size=10_000):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_size


def test_plot_and_table(result, tmp_path):
    _check_png(plot(result, str(tmp_path / "fig5.png")))
    lines = format_table(result).splitlines()
    header = next(i for i, l in enumerate(lines) if l.lstrip().startswith("context"))
    assert "tpa/mha" in lines[header] and "tpa/mla" in lines[header]
    assert lines[header + 2].split()[0] == "16" and lines[header + 3].split()[0] == "32"
    assert len({len(lines[i]) for i in range(header, header + 4)}) == 1  # aligned


def test_limit_columns(result):
    """The limit streams the step's bytes, cache plus parameters (written out independently), and
    every point reports its time as a multiple of it, in the JSON and the table."""
    for e in result["entries"]:
        assert e["limit_bytes"] == e["cache_bytes"] + 4 * param_count(e["mechanism"])
        assert len(e["limit_times_s"]) == 2 and e["limit_s"] == statistics.median(e["limit_times_s"]) > 0
        assert e["x_limit"] == pytest.approx(e["per_token_s"] / e["limit_s"], rel=1e-12)
        assert e["limit_gb_per_s"] == pytest.approx(e["limit_bytes"] / e["limit_s"] / 1e9, rel=1e-12)
    lines = format_table(result).splitlines()
    header = next(i for i, l in enumerate(lines) if l.lstrip().startswith("context"))
    cols = lines[header].split()
    assert "x" in cols and cols.count("lim") == len(MECHANISMS)
    row = lines[header + 2].split()  # context 16: times, then the multiples, then the ratios
    timed = {e["mechanism"]: e for e in result["entries"] if e["context"] == 16}
    assert row[1 + len(MECHANISMS):1 + 2 * len(MECHANISMS)] == [f"{timed[m]['x_limit']:.2f}" for m in MECHANISMS]


def test_plot_is_in_ms_on_a_log_axis(result, tmp_path, monkeypatch):
    """The y axis is milliseconds on a log scale, with each line's limit drawn beside it."""
    from matplotlib.axes import Axes

    axes = []
    real = Axes.set_yscale
    monkeypatch.setattr(Axes, "set_yscale", lambda ax, v, **kw: (axes.append((ax, v)), real(ax, v, **kw))[1])
    plot(result, str(tmp_path / "fig.png"))
    ((ax, scale),) = axes
    assert scale == "log" and "ms" in ax.get_ylabel()
    e = next(e for e in result["entries"] if e["mechanism"] == "tpa" and e["context"] == 16)
    ys = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert ys["TPA (batch 2)"][0] == pytest.approx(1e3 * e["per_token_s"])
    assert ys["TPA limit (batch 2)"][0] == pytest.approx(1e3 * e["limit_s"])


def test_prefill_alg1_against_materialize(tmp_path, capsys):
    """prefill_only: no decode point; both impls of TPA's cached prefill timed over 2 chunks of 16
    tokens; per-token time = median / prompt; the ratio is the quotient; a tiny cap skips both."""
    res = run_decode_bench(**{**TINY, **TINY_PREFILL}, prefill_only=True)
    pre = res["prefill"]
    assert res["entries"] == [] and res["config"]["prefill_only"] and pre["lengths"] == [32] and pre["chunk"] == 16
    by = {e["prefill_impl"]: e for e in pre["entries"]}
    assert sorted(by) == ["flash", "materialize"] and pre["skipped"] == []
    for e in by.values():
        assert (e["mechanism"], e["prompt"], e["n_chunks"], len(e["times_s"])) == ("tpa", 32, 2, 2)
        assert e["per_token_s"] == pytest.approx(statistics.median(e["times_s"]) / 32, rel=1e-12)
        assert e["temp_bytes"] > 0
    (row,) = pre["ratios"]
    assert row["time"]["flash/materialize"] == pytest.approx(by["flash"]["per_token_s"] / by["materialize"]["per_token_s"])
    assert "flash/materialize" in format_table(res)
    none = run_decode_bench(**{**TINY, **TINY_PREFILL}, prefill_only=True, memory_cap_gb=1e-9)
    assert none["prefill"]["entries"] == [] and len(none["prefill"]["skipped"]) == 2
    assert main(["decode-bench", *CLI_TINY, "32", "--prefill-chunk", "16", "--prefill-reps", "1", "--prefill-only",
                 "--out", str(tmp_path)]) == 0
    assert "flash/materialize" in capsys.readouterr().out
    report = json.loads((tmp_path / "decode_bench.json").read_text())
    assert report["entries"] == [] and len(report["prefill"]["entries"]) == 2


@pytest.mark.parametrize("kw", [
    dict(min_log2=6, max_log2=4), dict(mechanisms=("mha", "xyz")), dict(d_models=(100,)),
    dict(batch_sizes=(0,)), dict(reps=0), dict(dtype="int8"), dict(decode_impl="fast"),
    dict(bandwidth=-1.0), dict(gqa_groups=3), dict(param_init="zeros"), dict(memory_cap_gb=0),
    dict(prefill_lengths=(32,), prefill_chunk=0), dict(prefill_lengths=(30,), prefill_chunk=16),
    dict(prefill_lengths=(0,)), dict(prefill_only=True), dict(prefill_only=True, mechanisms=("mha",), **TINY_PREFILL),
    dict(cache_dtype="int4"),
])
def test_bad_values_raise(kw):
    with pytest.raises(ValueError):
        run_decode_bench(**{**TINY, **kw})


CLI_TINY = ["--d-model", "64", "--head-dim", "16", "--batch", "2", "--min-log2", "4", "--max-log2", "4",
            "--reps", "2", "--warmup", "1", "--dtype", "float32", "--param-init", "fast", "--quiet", "--prefill-lengths"]


def test_cli_writes_json_png_and_table(tmp_path, capsys):
    out = tmp_path / "db"
    assert main(["decode-bench", *CLI_TINY, "--mechanism", "mha", "tpa", "--bandwidth", "1e10",
                 "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "tpa/mha" in stdout and "d_model 64" in stdout
    report = json.loads((out / "decode_bench.json").read_text())
    assert report["config"]["mechanisms"] == ["mha", "tpa"] and report["config"]["bandwidth_bytes_per_s"] == 1e10
    assert {e["mechanism"] for e in report["entries"]} == {"mha", "tpa"}
    (ratio,) = report["ratios"]
    t = {e["mechanism"]: e["per_token_s"] for e in report["entries"]}
    assert ratio["time"]["tpa/mha"] == pytest.approx(t["tpa"] / t["mha"], rel=1e-12)
    _check_png(out / "decode_bench.png")


@pytest.mark.parametrize("argv", [
    ["--min-log2", "6", "--max-log2", "4"],
    ["--mechanism", "xyz"],
    ["--d-model", "100", "--head-dim", "16"],
    ["--batch", "0"],
    ["--warmup", "-1"],
    ["--bandwidth", "-3"],
    ["--decode-impl", "fastest"],
    ["--cache-dtype", "int4"],
])
def test_cli_bad_input_is_one_line_exit_2(argv, tmp_path, capsys):
    assert main(["decode-bench", "--out", str(tmp_path / "db"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert not (tmp_path / "db").exists()


def test_pallas_times_tpa_alone(tmp_path, capsys):
    """The Pallas decode kernel covers TPA only: other mechanisms with it are refused up front, and
    with no mechanisms named it times TPA alone."""
    with pytest.raises(ValueError, match="pallas.*covers only.*'mha'"):
        run_decode_bench(**{**TINY, "mechanisms": ("mha", "tpa")}, decode_impl="pallas")
    assert main(["decode-bench", *CLI_TINY, "--decode-impl", "pallas", "--mechanism", "tpa", "gqa",
                 "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pallas" in err[0] and "gqa" in err[0]
    assert not (tmp_path / "refused").exists()
    res = run_decode_bench(**{**TINY, "max_log2": 4}, decode_impl="pallas")
    assert res["config"]["mechanisms"] == ["tpa"] and res["config"]["decode_impl"] == "pallas"
    assert [e["mechanism"] for e in res["entries"]] == ["tpa"]
    assert res["ratios"][0] == dict(d_model=64, batch=2, context=16, time={}, cache_bytes={})


@pytest.mark.slow
def test_bench_script_prints_one_json_object(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # conftest's flags and compilation cache: shapes seen before
    cmd = [sys.executable, os.path.join(ROOT, "bench", "decode.py"), *CLI_TINY, "--mechanism", "mha", "tpa",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert out["config"]["mechanisms"] == ["mha", "tpa"] and len(out["entries"]) == 2
    assert math.isfinite(out["ratios"][0]["time"]["tpa/mha"])
    assert json.loads((tmp_path / "decode_bench.json").read_text()) == out
    _check_png(tmp_path / "decode_bench.png")
