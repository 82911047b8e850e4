"""The comparison's members (tpa_jax.compare.members): parameter matching, accounting, shared configs, data.

Head counts and sizes come from the paper (Tables 9/10 and App. H.1, ``paper_tables()``) and,
for the CPU families, from their size specs; every count is recomputed here from Table 1's
formulas written out below, independently of ``tpa_jax.accounting``.
"""
import dataclasses
import json
import os

import pytest

from tpa_jax import accounting as acc
from tpa_jax import compare, configs
from tpa_jax.config import TrainConfig
from _util import paper_tables
from _compare_util import MEMBERS, rows_by_member, tiny_kwargs

PAPER = paper_tables()
ATTENTION = {"t6": "tpa", "t6-kvonly": "tpa_kvonly", "mha": "mha", "mqa": "mqa", "gqa": "gqa", "mla": "mla"}


# ------------------------------------------------------------------------------------ Table 1, written out
def dims(size):
    """The layer sizes of one family: the paper's (Table 9, Table 10, App. H.1) or the CPU spec."""
    if size in PAPER["table9"]:
        t10 = PAPER["table10"]
        return dict(M=PAPER["table9"][size]["d_model"], L=PAPER["table9"][size]["n_layer"], d_h=PAPER["head_dim"],
                    G=PAPER["gqa_kv_heads"], d_r=PAPER["mla_rope_head_dim"], d_c=t10["mla_kv_lora_rank"][size],
                    d_q=t10["mla_q_lora_rank"][size], R=PAPER["tpa_ranks"],
                    heads={m: t10["heads"][a][size] for m, a in ATTENTION.items()})
    spec = configs.TINY_SIZES[size]
    return dict(M=spec["d_model"], L=spec["n_layer"], d_h=spec["head_dim"], G=2, d_r=spec["rope_head_dim"],
                d_c=spec["kv_lora_rank"], d_q=spec["q_lora_rank"], R=PAPER["tpa_ranks"], heads=None)


def table1_params(mech, h, x):
    """Table 1's "# PARAMETERS" column (W_O included, no norm gains)."""
    M, d_h, G, R = x["M"], x["d_h"], x["G"], x["R"]
    return {
        "mha": 4 * M * h * d_h,
        "mqa": 2 * M * d_h * (h + 1),
        "gqa": 2 * M * d_h * (h + G),
        "mla": x["d_q"] * (M + h * d_h + h * x["d_r"]) + x["d_c"] * (M + 2 * h * d_h) + M * (h * d_h + x["d_r"]),
        "t6": M * (R["q"] + R["k"] + R["v"]) * (h + d_h) + M * h * d_h,
        "t6-kvonly": M * (R["k"] + R["v"]) * (h + d_h) + 2 * M * h * d_h,
    }[mech]


def table1_kv_cache(mech, h, x):
    """Table 1's "KV CACHE" column: numbers cached per token per layer."""
    d_h, R = x["d_h"], x["R"]
    return {"mha": 2 * h * d_h, "mqa": 2 * d_h, "gqa": 2 * x["G"] * d_h, "mla": x["d_c"] + x["d_r"],
            "t6": (R["k"] + R["v"]) * (h + d_h), "t6-kvonly": (R["k"] + R["v"]) * (h + d_h)}[mech]


def nearest_heads(mech, x):
    """The head count whose Table 1 count is closest to MHA's 4 d_model^2 (GQA: a multiple of G)."""
    target = 4 * x["M"] ** 2
    ok = [h for h in range(1, 4 * x["M"]) if mech != "gqa" or h % x["G"] == 0]
    return min(ok, key=lambda h: abs(table1_params(mech, h, x) - target))


def heads_of(size, mech):
    x = dims(size)
    return x["heads"][mech] if x["heads"] is not None else nearest_heads(mech, x)


# Members more than 2% away from MHA's 4 d_model^2, and why:
#  * Table 10's MLA rows (every paper size) are off under Table 1's formula; the paper's head
#    counts are kept as printed.
#  * Table 10's small T6 (34 heads) and T6-KVonly (22) are just over 2% (33 / 21 heads would be
#    nearer: the paper's choice is kept).
#  * tiny / mini (d_model 64 / 128): one head moves TPA's and MLA's count by 3-11%, so the nearest
#    integer head count is the best there is.
EXCEPTIONS = {("small", "mla"), ("medium", "mla"), ("large", "mla"), ("xl", "mla"), ("small", "t6"),
              ("small", "t6-kvonly"), ("tiny", "t6"), ("tiny", "t6-kvonly"), ("tiny", "mla"), ("mini", "t6"),
              ("mini", "t6-kvonly"), ("mini", "mla")}


@pytest.mark.parametrize("size", list(compare.SIZES))
def test_family_is_parameter_matched(size):
    fam = configs.family(size)
    x = dims(size)
    target = 4 * x["M"] ** 2
    assert sorted(fam) == sorted(ATTENTION) == sorted(compare.MECHANISM_ORDER)
    for mech, cfg in fam.items():
        assert (cfg.attention, cfg.d_model, cfg.n_layer, cfg.head_dim) == (ATTENTION[mech], x["M"], x["L"], x["d_h"])
        heads = heads_of(size, mech)
        p = table1_params(mech, heads, x)
        assert cfg.n_head == heads, (size, mech)
        assert acc.attention_params_table1(cfg) == p, (size, mech)
        rel = p / target - 1
        if (size, mech) in EXCEPTIONS:
            assert abs(rel) > 0.02, (size, mech, rel)
        else:
            assert abs(rel) <= 0.02, (size, mech, rel)
        if mech in ("mha", "mqa", "gqa"):
            assert p == target
        if size in configs.TINY_SIZES:  # the CPU families: the nearest integer head count
            assert heads == nearest_heads(mech, x)
        # what the runner prints: the built layer's count (MLA adds its two norm gains) and ratios
        row = compare.describe_model(cfg, fam["mha"])
        assert row["attention_params"] == acc.attention_params(cfg)
        assert row["attention_params"] - p == (cfg.q_lora_rank + cfg.kv_lora_rank if mech == "mla" else 0)
        assert row["kv_cache_per_token"] == acc.kv_cache_per_token(cfg)
        assert row["model_params"] == acc.model_params(cfg)


@pytest.mark.parametrize("size", list(compare.SIZES))
def test_accounting_columns(size):
    """The columns of the pre-training table, from Table 1's formulas: heads, attention parameters
    as built, KV cache per token per layer, total parameters (tied embedding, SwiGLU MLP of width
    floor(8 M / 3), weight-free block norms) and the ratios against MHA."""
    fam = configs.family(size)
    x = dims(size)
    M, L = x["M"], x["L"]
    mha_h = heads_of(size, "mha")
    for mech, cfg in fam.items():
        h = heads_of(size, mech)
        kv_heads = {"mqa": 1, "gqa": x["G"]}.get(mech, h)
        attn = table1_params(mech, h, x) + (x["d_q"] + x["d_c"] if mech == "mla" else 0)
        kv = table1_kv_cache(mech, h, x)
        assert not cfg.norm_weight and cfg.mlp_hidden is None
        total = cfg.vocab_size * M + L * (attn + 3 * M * (8 * M // 3))
        r = compare.describe_model(cfg, fam["mha"])
        assert (r["heads"], r["attention_params"], r["kv_cache_per_token"], r["model_params"]) == \
            (f"{h}/{kv_heads}", attn, kv, total), (size, mech)
        assert r["attention_params_vs_mha"] == pytest.approx(attn / table1_params("mha", mha_h, x))
        assert r["kv_cache_vs_mha"] == pytest.approx(kv / table1_kv_cache("mha", mha_h, x))
    tiny = {m: compare.describe_model(c) for m, c in configs.family("tiny").items()}
    assert tiny["t6"]["ranks"] == "R_Q/R_K/R_V=6/2/2" and tiny["t6-kvonly"]["ranks"] == "R_K/R_V=2/2"
    assert tiny["mla"]["ranks"] == "d_c=32 d'_c=48 d^R_h=8" and tiny["mha"]["ranks"] == "-"
    assert "attention_params_vs_mha" not in tiny["t6"]  # ratios only against a given MHA


# ------------------------------------------------------------------------------------ configs and data
def test_members_share_everything_but_the_model(corpus, tmp_path):
    options, members = compare.build_members(**{k: v for k, v in tiny_kwargs(corpus).items()
                                                if k not in ("devices", "log")}, out=str(tmp_path))
    assert list(members) == ["t6-tiny", "mha-tiny"]
    dicts = [m.to_dict() for m in members.values()]
    for d, name in zip(dicts, members):
        assert d.pop("run_dir") == os.path.join(str(tmp_path), name)
        d.pop("model")
    assert dicts[0] == dicts[1] == options["train"]
    assert members["t6-tiny"].model == configs.get("t6-tiny", compute_dtype="float32")
    assert options["train"]["data"]["source"] == "manifest" and options["train"]["steps"] == 4
    with pytest.raises(compare.CompareError, match="--data-path applies to --task corpus only"):
        compare.build_members("tiny", 4, task="recall", data_path="x")


def test_identical_data_order(reference, corpus):
    out, report = reference
    rows = rows_by_member(report)
    digests = [rows[f"{m}-tiny"]["data_digests"] for m in MEMBERS]
    assert digests[0]["first_batch"] and digests[0]["val"]
    assert digests[0] == digests[1]
    # the digest is of the data, not of the member: another seed gives another first batch
    tcfg = TrainConfig.from_dict(json.load(open(out / "resolved_configs" / "mha-tiny.json")))
    assert compare.data_digests(tcfg) == digests[0]
    other = compare.data_digests(dataclasses.replace(tcfg, seed=tcfg.seed + 1))
    assert other["first_batch"] != digests[0]["first_batch"] and other["val"] == digests[0]["val"]
