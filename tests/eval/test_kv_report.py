"""eval.py kv-report: KV-cache numbers against Table 1, bytes, GiB budget, ratios, the CLI's files."""
import json
import math

import pytest

from tpa_jax import configs
from tpa_jax.eval.cli import main
from tpa_jax.eval.kv_report import GIB, format_table, kv_report, max_context, plot

SMALL = ["t6-small", "t6-kvonly-small", "mha-small", "mqa-small", "gqa-small", "mla-small"]


def table1_kv(cfg):
    """Table 1's KV CACHE column, written out independently of tpa_jax.accounting."""
    h, d, a = cfg.n_head, cfg.head_dim, cfg.attention
    if a == "mha":
        return 2 * h * d
    if a == "mqa":
        return 2 * d
    if a == "gqa":
        return 2 * cfg.n_kv_head * d
    if a == "mla":
        return cfg.kv_lora_rank + cfg.rope_head_dim
    assert a in ("tpa", "tpa_kvonly")
    return (cfg.k_rank + cfg.v_rank) * (h + d)


@pytest.mark.parametrize("size", ["small", "medium", "tiny"])
def test_numbers_per_token_match_table1(size):
    names = [f"{m}-{size}" for m in configs.MECHANISMS]
    rows = kv_report(names)
    assert [r["name"] for r in rows] == names
    for r in rows:
        assert r["kv_per_token_per_layer"] == table1_kv(configs.get(r["name"])), r["name"]


def test_small_family_literal_values():
    # h: t6 34, kvonly 22, mha 12, mqa 23, gqa 22 (G=2), mla 12 (d_c 256, d^R 32); d_h 64; R_K = R_V = 2
    rows = {r["name"]: r for r in kv_report(SMALL)}
    expected = {"t6-small": 4 * (34 + 64), "t6-kvonly-small": 4 * (22 + 64), "mha-small": 2 * 12 * 64,
                "mqa-small": 2 * 64, "gqa-small": 2 * 2 * 64, "mla-small": 256 + 32}
    assert {n: r["kv_per_token_per_layer"] for n, r in rows.items()} == expected
    assert rows["t6-small"]["ranks"] == {"q": 6, "k": 2, "v": 2}
    assert rows["t6-kvonly-small"]["ranks"] == {"k": 2, "v": 2}
    assert rows["mha-small"]["ranks"] is None
    assert rows["t6-small"]["n_head"] == 34


@pytest.mark.parametrize("dtype_bytes", [1, 2, 4])
def test_bytes_per_token_is_numbers_times_layers_times_dtype(dtype_bytes):
    for r in kv_report(SMALL + ["t6-medium", "mla-xl"], dtype_bytes=dtype_bytes):
        cfg = configs.get(r["name"])
        assert r["bytes_per_token"] == table1_kv(cfg) * cfg.n_layer * dtype_bytes
    assert kv_report(["mha-small"])[0]["bytes_per_token"] == 1536 * 12 * 2  # bf16 default


def test_max_context_uses_gib():
    """GB means GiB: 80 "GB" = 80 * 2**30 bytes, not 80e9."""
    assert GIB == 2 ** 30
    r = kv_report(["mha-small"], memory_gb=80)[0]
    assert r["max_context"] == (80 * 2 ** 30) // 36864 == 2330168
    assert r["max_context"] != int(80e9 // 36864)
    for r in kv_report(SMALL, memory_gb=7.5, batch=3):
        assert r["max_context"] == math.floor(7.5 * 2 ** 30 / r["bytes_per_token"])
        assert r["max_context_batch"] == math.floor(7.5 * 2 ** 30 / (3 * r["bytes_per_token"]))
    # exact at the boundary: a budget of exactly N tokens fits N, one byte less fits N - 1
    assert max_context(1, 2 ** 10) == 2 ** 20
    assert max_context((2 ** 30 - 1) / 2 ** 30, 2 ** 10) == 2 ** 20 - 1
    assert "max_context_batch" not in kv_report(["mha-small"])[0]


def test_ratio_to_mha_of_the_same_size():
    rows = kv_report(SMALL + ["t6-medium", "mha-medium"])
    by = {r["name"]: r for r in rows}
    for n in SMALL:
        assert by[n]["ratio_baseline"] == "mha-small"
        assert by[n]["ratio_to_mha"] == pytest.approx(table1_kv(configs.get(n)) / (2 * 12 * 64))
    assert by["mha-small"]["ratio_to_mha"] == 1.0
    assert by["t6-small"]["ratio_to_mha"] == pytest.approx(392 / 1536)
    assert by["t6-medium"]["ratio_baseline"] == "mha-medium"
    assert by["t6-medium"]["ratio_to_mha"] == pytest.approx(4 * (47 + 64) / (2 * 16 * 64))


def test_ratio_without_mha_uses_first_configs_2hd():
    rows = kv_report(["t6-small", "gqa-small"])
    for r in rows:
        assert r["ratio_baseline"].startswith("2*h*d_h of t6-small")
        assert r["ratio_to_mha"] == pytest.approx(table1_kv(configs.get(r["name"])) / (2 * 34 * 64))
    table = format_table(rows)
    assert "2*h*d_h of t6-small" in table and "[1]" in table


def test_table_is_aligned():
    lines = format_table(kv_report(SMALL, batch=4)).splitlines()
    header, rule, *body = lines[:8]
    assert len({len(l) for l in [header, rule, *body]}) == 1
    assert "mha-small" in lines[4] and "2,330,168" in lines[4] and "582,542" in lines[4]


def test_bad_values_raise():
    with pytest.raises(ValueError):
        kv_report(SMALL, memory_gb=-1)
    with pytest.raises(ValueError):
        kv_report(["nope-small"])
    with pytest.raises(ValueError):
        kv_report(SMALL, dtype_bytes=0)


def _check_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000


def test_cli_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["kv-report", "--out", str(out), "--memory-gb", "40", "--batch", "2", "--max-context", "2**16"]) == 0
    stdout = capsys.readouterr().out
    for n in SMALL:
        assert n in stdout
    report = json.loads((out / "kv_report.json").read_text())
    assert report["gb_definition"].startswith("GiB")
    assert [r["name"] for r in report["rows"]] == SMALL  # default: the small family
    mha = report["rows"][2]
    assert mha["max_context"] == 40 * 2 ** 30 // 36864 and mha["max_context_batch"] == 40 * 2 ** 30 // (2 * 36864)
    _check_png(out / "kv_report.png")


def test_cli_config_and_family_selection(tmp_path, capsys):
    assert main(["kv-report", "--config", "mla-xl", "--family", "tiny", "--config", "mla-xl",
                 "--out", str(tmp_path)]) == 0
    names = [r["name"] for r in json.loads((tmp_path / "kv_report.json").read_text())["rows"]]
    assert names == ["mla-xl"] + [f"{m}-tiny" for m in configs.MECHANISMS]


def test_plot_direct(tmp_path):
    path = plot(kv_report(["t6-tiny", "mha-tiny"]), str(tmp_path / "p.png"), max_context=2 ** 10, memory_gb=1)
    _check_png(path)


@pytest.mark.parametrize("argv", [
    ["kv-report", "--config", "t6-huge"],
    ["kv-report", "--memory-gb", "-5"],
    ["kv-report", "--memory-gb", "0"],
    ["kv-report", "--dtype-bytes", "0"],
    ["kv-report", "--family", "giant"],
    ["kv-report", "--batch", "x"],
])
def test_bad_input_is_one_line_exit_2(argv, tmp_path, capsys):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), captured.err
    assert not (tmp_path / "kv_report.json").exists()
