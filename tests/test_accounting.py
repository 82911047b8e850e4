"""Parameter, KV-cache and FLOP accounting (tpa_jax.accounting) against the paper and the built model.

Every expected number comes from one of three independent sources: the paper's printed values
(App. A.4 worked examples, Table 10 via ``paper_tables()``), formulas written out in this file
(Table 1, the A.4 cost formulas, App. C and G variants), or the parameter tree the model really
builds (``tpa_jax.model.abstract_params``) and XLA's cost analysis of the compiled forward.
"""
import dataclasses
import math
from decimal import Decimal

import jax
import jax.numpy as jnp
import pytest

import tpa_jax
from _util import paper_tables
from tpa_jax import accounting as acc
from tpa_jax import configs
from tpa_jax.config import ModelConfig


# ------------------------------------------------------------------------------- Table 1, written out
def table1_params(cfg) -> int:
    """Table 1's "# PARAMETERS" column for the row ``cfg`` belongs to (reads fields only)."""
    m, h, d = cfg.d_model, cfg.n_head, cfg.head_dim
    r_all = cfg.q_rank + cfg.k_rank + cfg.v_rank
    if cfg.attention == "mha":
        return 4 * m * h * d
    if cfg.attention == "mqa":
        return 2 * m * d * (h + 1)
    if cfg.attention == "gqa":
        return 2 * m * d * (h + cfg.n_kv_head)
    if cfg.attention == "mla":
        dq, dc, dr = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.rope_head_dim
        return dq * (m + h * d + h * dr) + dc * (m + 2 * h * d) + m * (h * d + dr)
    if cfg.attention == "tpa_kvonly":
        return m * (cfg.k_rank + cfg.v_rank) * (h + d) + 2 * m * h * d
    if not cfg.contextual_a:
        return r_all * (m * d + h) + m * h * d
    if not cfg.contextual_b:
        return r_all * (m * h + d) + m * h * d
    return m * r_all * (h + d) + m * h * d


def a4_projection(cfg) -> int:
    """App. A.4: cost of projecting the current token (W_O excluded)."""
    m, h, d = cfg.d_model, cfg.n_head, cfg.head_dim
    if cfg.attention in ("mha", "mqa", "gqa"):
        g = {"mha": h, "mqa": 1, "gqa": cfg.n_kv_head}[cfg.attention]
        return m * d * (h + 2 * g)
    if cfg.attention == "mla":
        dq, dc, dr = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.rope_head_dim
        return m * dq + dq * h * (d + dr) + m * (dc + dr) + h * dc * d
    return m * (cfg.q_rank + cfg.k_rank + cfg.v_rank) * (h + d)


def a4_attention(cfg) -> int:
    """App. A.4: cost per cached token (MLA absorbed; TPA by Algorithm 2 with D = E = d_h)."""
    h, d = cfg.n_head, cfg.head_dim
    if cfg.attention in ("mha", "mqa", "gqa"):
        return 2 * h * d
    if cfg.attention == "mla":
        return h * (2 * cfg.kv_lora_rank + cfg.rope_head_dim)
    return cfg.q_rank * cfg.k_rank * d + h * cfg.q_rank * cfg.k_rank + h * cfg.v_rank * d


def close_to_printed(value: float, printed: str) -> bool:
    """``value`` rounds to ``printed`` (a number of millions with the paper's precision)."""
    exponent = Decimal(printed).as_tuple().exponent
    return abs(value / 1e6 - float(printed)) <= 0.5 * 10.0 ** exponent + 1e-9


# ------------------------------------------------------------------------------- App. A.4 examples
A4_SETTINGS = {  # d_model, H, d_h, GQA groups G, MLA d_c, d^R_h, d'_c
    "I": dict(d_model=2048, n_head=32, head_dim=64, G=4, d_c=256, d_r=32, d_q=768),
    "II": dict(d_model=4096, n_head=32, head_dim=128, G=4, d_c=512, d_r=64, d_q=1536),
    "III": dict(d_model=7168, n_head=64, head_dim=128, G=8, d_c=512, d_r=64, d_q=1536),
}
# As printed: parameters (10^6), projection (10^6), attention per cached token (the M coefficient)
A4_PRINTED = {
    "I": {"mha": ("16.8", "12.6", 4096), "gqa": ("9.4", "5.2", 4096), "mla": ("9.8", "5.0", 17408),
          "tpa16-1-1": ("7.7", "3.5", 3584), "tpa16-2-2": ("8.1", "3.9", 7168),
          "tpa8-1-1": ("6.2", "2.0", 2816), "tpa8-2-2": ("6.6", "2.4", 5632)},
    "II": {"mha": ("67.1", "50.3", 8192), "gqa": ("37.7", "21.0", 8192), "mla": ("39.1", "20.2", 34816),
           "tpa16-1-1": ("28.6", "11.8", 6656), "tpa16-2-2": ("29.9", "13.1", 13312),
           "tpa8-1-1": ("23.3", "6.6", 5376), "tpa8-2-2": ("24.6", "7.9", 10752)},
    "III": {"mha": ("235", "176.2", 16384), "gqa": ("132", "73.4", 16384), "mla": ("101", "38.2", 69632),
            "tpa16-1-1": ("83.5", "24.8", 11264), "tpa16-2-2": ("86.2", "27.5", 22528),
            "tpa8-1-1": ("72.5", "13.8", 9728), "tpa8-2-2": ("75.2", "16.5", 19456)},
}


def a4_config(example: str, member: str) -> ModelConfig:
    s = A4_SETTINGS[example]
    base = dict(vocab_size=256, n_layer=1, d_model=s["d_model"], n_head=s["n_head"], head_dim=s["head_dim"])
    if member == "mha":
        return ModelConfig(**base, attention="mha")
    if member == "gqa":
        return ModelConfig(**base, attention="gqa", n_kv_head=s["G"])
    if member == "mla":
        return ModelConfig(**base, attention="mla", q_lora_rank=s["d_q"], kv_lora_rank=s["d_c"],
                           rope_head_dim=s["d_r"])
    rq, rk, rv = map(int, member[3:].split("-"))
    return ModelConfig(**base, attention="tpa", q_rank=rq, k_rank=rk, v_rank=rv)


A4_CASES = [(ex, member) for ex, members in A4_PRINTED.items() for member in members]


@pytest.mark.parametrize("example,member", A4_CASES, ids=[f"{e}-{m}" for e, m in A4_CASES])
def test_a4_worked_examples(example, member):
    cfg = a4_config(example, member)
    params, projection, per_token = A4_PRINTED[example][member]
    # the written-out formulas reproduce the paper's printed numbers ...
    assert close_to_printed(table1_params(cfg), params)
    assert close_to_printed(a4_projection(cfg), projection)
    assert a4_attention(cfg) == per_token
    # ... and the accounting gives exactly those formulas
    assert acc.attention_params_table1(cfg) == table1_params(cfg)
    gains = cfg.q_lora_rank + cfg.kv_lora_rank if member == "mla" else 0  # MLA's q_norm / kv_norm
    assert acc.attention_params(cfg) == table1_params(cfg) + gains
    cost = acc.decode_flops_per_token(cfg, 1000)
    assert (cost.projection, cost.attention_per_cached_token) == (a4_projection(cfg), per_token)
    assert cost.attention == 1000 * per_token
    assert cost.total == cost.projection + cost.attention and cost.hardware_flops == 2 * cost.total


def test_a4_example_one_as_written():
    """Example I's exact products, typed in as the paper prints them."""
    assert table1_params(a4_config("I", "gqa")) == 2048 * 64 * (2 * 32 + 2 * 4)
    assert table1_params(a4_config("I", "mla")) == 768 * (2048 + 2048 + 1024) + 2048 * (32 + 2048) + 256 * (
        2048 + 4096)
    assert table1_params(a4_config("I", "tpa16-1-1")) == 2048 * 18 * 96 + 2048 ** 2
    assert a4_projection(a4_config("I", "mla")) == 2048 * 768 + 768 * 32 * (64 + 32) + 2048 * (256 + 32) + (
        32 * 256 * 64)
    assert a4_attention(a4_config("I", "tpa16-1-1")) == 1 * 1536 + 1 * 2048


def test_decode_costs_beyond_the_worked_examples():
    """MQA (A.4's formula), TPA-KVonly and the App. C / G variants, written out."""
    s = A4_SETTINGS["I"]
    mqa = ModelConfig(vocab_size=256, n_layer=1, d_model=2048, n_head=32, head_dim=64, attention="mqa")
    c = acc.decode_flops_per_token(mqa, 7)
    assert (c.projection, c.attention_per_cached_token) == (s["d_model"] * 64 * (32 + 2), 2 * 32 * 64)
    kv = dataclasses.replace(mqa, attention="tpa_kvonly", k_rank=2, v_rank=2)
    c = acc.decode_flops_per_token(kv, 7)  # the full query against the factor cache: H R_K D + H R_K + H R_V E
    assert c.attention_per_cached_token == 32 * 2 * 64 + 32 * 2 + 32 * 2 * 64
    assert c.projection == 2048 * 4 * (32 + 64) + 2048 * 32 * 64  # factors + W_Q
    base = ModelConfig(vocab_size=256, n_layer=1, d_model=64, n_head=8, head_dim=16, q_rank=4, k_rank=2, v_rank=2)
    c = acc.decode_flops_per_token(dataclasses.replace(base, tpa_order=3, tpa_c_dim=2), 10)
    assert c.attention_per_cached_token == 4 * 2 * (8 + 2 + 1) + 8 * 4 * 2 + 8 * 2 * 16  # D -> d_b + d_c + 1
    assert c.projection == 64 * 8 * (8 + 8 + 2)  # A (h), B (d_b), C (d_c) per rank
    c = acc.decode_flops_per_token(dataclasses.replace(base, contextual_a=False), 10)
    assert c.projection == 64 * 8 * 16 and c.attention_per_cached_token == 4 * 2 * 16 + 8 * 4 * 2 + 8 * 2 * 16
    c = acc.decode_flops_per_token(dataclasses.replace(base, shared_kv_b=True), 0)
    assert c.projection == 64 * (8 * 8 + 6 * 16) and c.attention == 0
    with pytest.raises(ValueError, match="context_len"):
        acc.decode_flops_per_token(base, -1)


# ------------------------------------------------------------------------------- the built parameter tree
def _size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _check_against_tree(cfg):
    params = tpa_jax.model.abstract_params(cfg)  # shapes only: nothing is allocated, even for XL
    assert acc.model_params(cfg) == _size(params)
    assert acc.attention_params(cfg) * cfg.n_layer == _size(params["blocks"]["attn"])
    assert acc.mlp_params(cfg) * cfg.n_layer == _size(params["blocks"]["mlp"])
    assert acc.embedding_params(cfg) == _size(params["embed"])
    norms = sum(_size(v) for k, v in params["blocks"].items() if k.endswith("_norm"))
    norms += sum(_size(v) for k, v in params.items() if "norm" in k)
    assert acc.norm_params(cfg) == norms
    # weights a token multiplies: every leaf but gains ("scale") and TPA constant factors ("a_*", "b_*")
    matmul = sum(math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
                 if not any(getattr(p, "key", "") == "scale" or str(getattr(p, "key", "")).startswith(("a_", "b_"))
                            for p in path))
    assert acc.matmul_params_per_token(cfg) == matmul


@pytest.mark.parametrize("name", configs.names())
def test_accounting_matches_every_named_config(name):
    _check_against_tree(configs.get(name))


TINY = configs.get("t6-tiny", compute_dtype="float32")
TREE_VARIANTS = {
    "nonctx_a": dict(contextual_a=False),
    "nonctx_b": dict(contextual_b=False),
    "nonctx_ab": dict(contextual_a=False, contextual_b=False),
    "shared_b": dict(shared_kv_b=True),
    "shared_b_nonctx_b": dict(shared_kv_b=True, contextual_b=False),
    "order3": dict(tpa_order=3, tpa_c_dim=2),
    "order3_c4": dict(tpa_order=3, tpa_c_dim=4),
    "out_norm": dict(attn_out_norm=True),
    "norm_weight": dict(norm_weight=True),
    "all_norms": dict(attn_out_norm=True, norm_weight=True),
    "kvonly_nonctx_a": dict(attention="tpa_kvonly", contextual_a=False),
    "kvonly_shared_b": dict(attention="tpa_kvonly", shared_kv_b=True),
    "kvonly_out_norm": dict(attention="tpa_kvonly", attn_out_norm=True),
    "gqa_out_norm": dict(attention="gqa", n_kv_head=2, attn_out_norm=True, norm_weight=True),
    "mla_vdim": dict(attention="mla", q_lora_rank=24, kv_lora_rank=12, rope_head_dim=4, v_head_dim=8,
                     attn_out_norm=True, norm_weight=True),
}


@pytest.mark.parametrize("variant", sorted(TREE_VARIANTS))
def test_accounting_matches_variant_trees(variant):
    _check_against_tree(dataclasses.replace(TINY, **TREE_VARIANTS[variant]))


def test_table1_rows_and_variant_formulas():
    """Table 1 at a tiny size, and the variants written out (M=64, h=4, d_h=16, R=(6,2,2), d_c=2 -> d_b=8)."""
    m, h, d, w_o = 64, 4, 16, 64 * 4 * 16
    assert (TINY.d_model, TINY.n_head, TINY.head_dim, TINY.q_rank + TINY.k_rank + TINY.v_rank) == (m, h, d, 10)
    p = lambda **f: acc.attention_params(dataclasses.replace(TINY, **f))  # noqa: E731
    assert p() == m * 10 * (h + d) + w_o
    assert p(contextual_a=False) == 10 * (m * d + h) + w_o
    assert p(contextual_b=False) == 10 * (m * h + d) + w_o
    assert p(shared_kv_b=True) == m * (10 * h + (6 + 2) * d) + w_o  # V has no B of its own
    assert p(tpa_order=3, tpa_c_dim=2) == m * 10 * (h + 8 + 2) + w_o  # A, B (d_b), C (d_c)
    assert p(attn_out_norm=True) == p() + d  # one [E] gain shared by the heads
    rows = [{}, dict(contextual_a=False), dict(contextual_b=False), dict(attention="tpa_kvonly"),
            dict(attention="mha"), dict(attention="mqa"), dict(attention="gqa", n_kv_head=2),
            dict(attention="mla", q_lora_rank=24, kv_lora_rank=12, rope_head_dim=4)]
    for f in rows:
        cfg = dataclasses.replace(TINY, **f)
        assert acc.table1_applies(cfg) and acc.attention_params_table1(cfg) == table1_params(cfg), f
    for f in (dict(shared_kv_b=True), dict(tpa_order=3, tpa_c_dim=2), dict(contextual_a=False, contextual_b=False)):
        cfg = dataclasses.replace(TINY, **f)
        assert not acc.table1_applies(cfg)
        with pytest.raises(ValueError, match="Table 1 has no row"):
            acc.attention_params_table1(cfg)


# ------------------------------------------------------------------------------- KV cache
def test_kv_cache_per_token_every_mechanism():
    h, d, g, rk, rv = 8, 16, 2, 3, 2
    base = ModelConfig(vocab_size=256, n_layer=1, d_model=64, n_head=h, head_dim=d, q_rank=5, k_rank=rk, v_rank=rv)
    cases = {  # Table 1 / Sec. 3.3 / App. C and G, written out
        "mha": (dict(attention="mha"), 2 * h * d),
        "mqa": (dict(attention="mqa"), 2 * d),
        "gqa": (dict(attention="gqa", n_kv_head=g), 2 * g * d),
        "mla": (dict(attention="mla", q_lora_rank=24, kv_lora_rank=12, rope_head_dim=4), 12 + 4),
        "tpa": ({}, (rk + rv) * (h + d)),
        "tpa_kvonly": (dict(attention="tpa_kvonly"), (rk + rv) * (h + d)),
        "nonctx_a": (dict(contextual_a=False), (rk + rv) * d),
        "nonctx_b": (dict(contextual_b=False), (rk + rv) * h),
        "shared_b": (dict(shared_kv_b=True, v_rank=3), (3 + 3) * h + 3 * d),
        "order3": (dict(tpa_order=3, tpa_c_dim=4), (rk + rv) * (h + 4 + 4)),  # d_b = 16 // 4, d_c = 4
        "order3_c2": (dict(tpa_order=3, tpa_c_dim=2), (rk + rv) * (h + 8 + 2)),
        "out_norm": (dict(attn_out_norm=True), (rk + rv) * (h + d)),
    }
    for name, (fields, want) in cases.items():
        assert acc.kv_cache_per_token(dataclasses.replace(base, **fields)) == want, name
    # A.4 Example I: MHA caches 2 H d_h = 4096 numbers, TPA (R_K + R_V)(H + d_h)
    assert acc.kv_cache_per_token(a4_config("I", "mha")) == 2 * 32 * 64
    assert acc.kv_cache_per_token(a4_config("I", "tpa16-2-2")) == 4 * (32 + 64)
    assert acc.kv_cache_per_token(a4_config("I", "mla")) == 256 + 32


# ------------------------------------------------------------------------------- parameter matching
def _match_fields(cfg):
    fields = dict(q_rank=cfg.q_rank, k_rank=cfg.k_rank, v_rank=cfg.v_rank)
    if cfg.attention == "gqa":
        fields["n_kv_head"] = cfg.n_kv_head
    if cfg.attention == "mla":
        fields.update(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                      rope_head_dim=cfg.rope_head_dim, v_head_dim=cfg.v_head_dim)
    return fields


def nearest_heads(cfg) -> int:
    """Brute force: the valid head count whose Table 1 parameters are closest to 4 d_model^2
    (ties to fewer heads)."""
    target = 4 * cfg.d_model ** 2
    best = None
    for h in range(1, 4 * cfg.d_model + 2):
        if cfg.attention == "gqa" and h % cfg.n_kv_head:
            continue
        dist = abs(table1_params(dataclasses.replace(cfg, n_head=h)) - target)
        if best is None or dist < best[0]:
            best = (dist, h)
        elif dist > best[0]:
            break  # Table 1's formulas grow with h
    return best[1]


@pytest.mark.parametrize("size", sorted(paper_tables()["table10"]["heads"]["mha"]))
def test_table10_heads_against_parameter_matching(size):
    heads = paper_tables()["table10"]["heads"]
    fam = configs.family(size)
    target = 4 * fam["mha"].d_model ** 2
    for cfg in fam.values():
        table10 = heads[cfg.attention][size]
        assert cfg.n_head == table10
        matched = nearest_heads(cfg)
        assert acc.matched_n_head(cfg.attention, cfg.d_model, cfg.head_dim, **_match_fields(cfg)) == matched
        rel = table1_params(cfg) / target - 1
        if cfg.attention in ("mha", "mqa", "gqa"):  # exactly matched at d_h = 64
            assert rel == 0 and matched == table10, cfg.attention
        elif cfg.is_tpa:  # within 3%; at "small" Table 10 has one head more than the nearest count
            assert abs(rel) < 0.03 and matched == table10 + (-1 if size == "small" else 0), (cfg.attention, rel)
        else:  # MLA: only "small" (h d_h = d_model) is near MHA; the larger rows exceed it by over half
            assert (-0.1 < rel < 0) if size == "small" else (rel > 0.5), rel
            assert matched != table10


def test_matched_n_head_skips_invalid_head_counts():
    # GQA with 3 KV heads: 2 * 768 * 64 * (h + 3) = 4 * 768^2 at h = 21, a multiple of 3
    assert acc.matched_n_head("gqa", 768, 64, n_kv_head=3) == 21
    with pytest.raises(ValueError, match="no valid head count"):
        acc.matched_n_head("mla", 64, 16)  # MLA without its latent dims


@pytest.mark.parametrize("size", sorted(configs.TINY_SIZES))
def test_tiny_families_are_parameter_matched(size):
    fam = configs.family(size)
    mha = fam["mha"]
    assert mha.n_head * mha.head_dim == mha.d_model and table1_params(mha) == 4 * mha.d_model ** 2
    for name, cfg in fam.items():
        assert cfg.n_head == nearest_heads(cfg), name
        assert cfg.n_head == acc.matched_n_head(cfg.attention, cfg.d_model, cfg.head_dim, **_match_fields(cfg))


# ------------------------------------------------------------------------------- FLOPs
def test_flops_match_nanogpt_formula_for_mha():
    """nanoGPT's estimate_mfu: 6 N + 12 L H d_h T per token for training (N = all params, tied head)."""
    for name in ("mha-small", "mha-xl"):
        cfg = configs.get(name)
        n, L, h, d, t = _size(tpa_jax.model.abstract_params(cfg)), cfg.n_layer, cfg.n_head, cfg.head_dim, 1024
        assert acc.flops_per_token(cfg, t, training=True) == 6 * n + 12 * L * h * d * t
        assert acc.flops_per_token(cfg, t) == 2 * n + 4 * L * h * d * t


def test_flops_written_out():
    m, h, d, L, t, v, f = 64, 4, 16, 2, 32, 256, int(8 * 64 / 3)
    head_and_mlp = v * m + L * 3 * m * f
    w_o = m * h * d
    attn = L * 4 * t * h * d  # scores and values, full T
    # T6: factor projections, W_O, contraction 2 R h d per Q/K/V
    assert acc.flops_per_token(TINY, t) == 2 * (head_and_mlp + L * (m * 10 * (h + d) + w_o)) + L * 2 * 10 * h * d + attn
    # non-contextual A: the constant A factors are no matmul weights, the contraction remains
    cfg = dataclasses.replace(TINY, contextual_a=False)
    assert acc.flops_per_token(cfg, t) == 2 * (head_and_mlp + L * (m * 10 * d + w_o)) + L * 2 * 10 * h * d + attn
    # third order (d_c 2, d_b 8): + R d_h for each vec(b (x) c)
    cfg = dataclasses.replace(TINY, tpa_order=3, tpa_c_dim=2)
    assert acc.flops_per_token(cfg, t) == (2 * (head_and_mlp + L * (m * 10 * (h + 10) + w_o))
                                           + L * (2 * 10 * h * d + 10 * d) + attn)
    # MLA-tiny (h 3, d_h 16, d^R_h 8, d'_c 48, d_c 32): scores over d_h + d^R_h
    cfg = configs.get("mla-tiny")
    h, dr, dq, dc = 3, 8, 48, 32
    mla = m * dq + m * dc + m * dr + dq * h * d + dq * h * dr + dc * h * d + dc * h * d + h * d * m
    want = 2 * (head_and_mlp + L * mla) + L * 2 * t * h * ((d + dr) + d)
    assert acc.flops_per_token(cfg, t) == want
    assert acc.flops_per_token(cfg, t, training=True) == 3 * want
    with pytest.raises(ValueError, match="seq_len"):
        acc.flops_per_token(TINY, -1)


COST_VARIANTS = {
    "mha": dict(attention="mha"), "gqa": dict(attention="gqa", n_kv_head=2), "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla", q_lora_rank=96, kv_lora_rank=64, rope_head_dim=16),
    "tpa": {}, "tpa_kvonly": dict(attention="tpa_kvonly"), "nonctx_a": dict(contextual_a=False),
    "nonctx_b": dict(contextual_b=False), "shared_b": dict(shared_kv_b=True),
    "order3": dict(tpa_order=3, tpa_c_dim=4),
}


@pytest.mark.parametrize("variant", sorted(COST_VARIANTS))
def test_flops_agree_with_xla_cost_analysis(variant):
    """XLA's own count of the compiled forward (dots 2 MNK, plus element-wise work we leave out).

    One layer only: XLA counts a scanned loop body once.  The full-T attention term is what the
    dense implementation really computes (the causal mask does not skip work)."""
    t = 128
    cfg = ModelConfig(vocab_size=512, n_layer=1, d_model=256, n_head=8, head_dim=32, compute_dtype="float32",
                      max_seq_len=t, **COST_VARIANTS[variant])
    params = tpa_jax.model.abstract_params(cfg)
    tok = jax.ShapeDtypeStruct((1, t), jnp.int32)
    cost = jax.jit(tpa_jax.logits_fn(cfg)).lower(params, tok).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla = cost["flops"] / t
    ours = acc.flops_per_token(cfg, t)
    assert ours <= xla <= 1.03 * ours, (xla, ours)
