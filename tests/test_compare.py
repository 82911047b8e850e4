"""The parameter-matched comparison runner (tpa_jax.compare): matching, data order, resume, outputs.

Training runs are tiny (t6-tiny / mha-tiny, 4 steps of 4 x 32 tokens, one device); the shared
reference run is made once per module.
"""
import json
import os
import shutil

import jax
import pytest

from tpa_jax import accounting as acc
from tpa_jax import compare, configs
from tpa_jax.config import DataConfig, TrainConfig
from tpa_jax.data import prepare_files
from _util import ROOT

MEMBERS = ["t6", "mha"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Byte-token shards of this project's own sources (small, fast to prepare)."""
    d = tmp_path_factory.mktemp("compare_corpus")
    src = d / "src"
    src.mkdir()
    for sub in ("tpa_jax", os.path.join("tpa_jax", "train")):
        for f in sorted(os.listdir(os.path.join(ROOT, sub))):
            if f.endswith(".py"):
                (src / (sub.replace(os.sep, "_") + "_" + f + ".txt")).write_text(open(os.path.join(ROOT, sub, f)).read())
    return prepare_files(sorted(str(p) for p in src.iterdir()), d / "shards", "byte", val_fraction=0.3)


def tiny_kwargs(corpus, **kw):
    args = dict(size="tiny", steps=4, batch=4, seq_len=32, eval_every=2, data_path=str(corpus), mechanisms=MEMBERS,
                overrides=["eval_batches=1", "save_every=100", "model.compute_dtype=float32"],
                devices=jax.devices()[:1], log=None)
    args.update(kw)
    return args


def tiny_argv(corpus, out, *extra):
    return ["--size", "tiny", "--steps", "4", "--batch", "4", "--seq-len", "32", "--eval-every", "2",
            "--data-path", str(corpus), "--out", str(out), "--devices", "1", *extra,
            "eval_batches=1", "save_every=100", "model.compute_dtype=float32"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """An uninterrupted comparison of t6-tiny and mha-tiny."""
    out = tmp_path_factory.mktemp("compare_ref")
    report = compare.run_comparison(**tiny_kwargs(corpus, out=str(out)))
    return out, report


def rows_by_member(report):
    return {r["member"]: r for r in report["rows"]}


# ------------------------------------------------------------------------------------ parameter matching
TARGET = {s: 4 * configs.family(s)["mha"].d_model ** 2 for s in compare.SIZES}
# Every member's head count and Table 1 attention parameters (no norm gains), per size.
EXPECTED = {
    "tiny": {"t6": (4, 16_896), "t6-kvonly": (5, 15_616), "mha": (4, 16_384), "mqa": (7, 16_384),
             "gqa": (6, 16_384), "mla": (3, 15_232)},
    "mini": {"t6": (5, 67_840), "t6-kvonly": (6, 68_608), "mha": (4, 65_536), "mqa": (7, 65_536),
             "gqa": (6, 65_536), "mla": (3, 60_928)},
    "small": {"t6": (34, 2_423_808), "t6-kvonly": (22, 2_426_880), "mha": (12, 2_359_296), "mqa": (23, 2_359_296),
              "gqa": (22, 2_359_296), "mla": (12, 2_187_264)},
    "medium": {"t6": (47, 4_216_832), "t6-kvonly": (29, 4_182_016), "mha": (16, 4_194_304),
               "mqa": (31, 4_194_304), "gqa": (30, 4_194_304), "mla": (23, 6_881_280)},
    "large": {"t6": (61, 6_597_120), "t6-kvonly": (37, 6_579_200), "mha": (20, 6_553_600),
              "mqa": (39, 6_553_600), "gqa": (38, 6_553_600), "mla": (34, 10_362_880)},
    "xl": {"t6": (78, 10_259_200), "t6-kvonly": (47, 10_336_000), "mha": (25, 10_240_000),
           "mqa": (49, 10_240_000), "gqa": (48, 10_240_000), "mla": (49, 15_554_560)},
}
# Members more than 2% away from MHA's 4 d_model^2, and why:
#  * Table 10's MLA rows for medium / large / xl are +64.06% / +58.13% / +51.90% under Table 1's
#    formula (the paper's head counts, kept as printed); small's MLA (12 heads) is -7.29%.
#  * Table 10's small T6 (34 heads) and T6-KVonly (22) are +2.73% / +2.86% (33 / 21 heads would
#    be nearer: the paper's choice is kept).
#  * tiny / mini (d_model 64 / 128): one head moves TPA's and MLA's count by 3-11%, so the nearest
#    integer head count is the best there is: T6 +3.13% / +3.52%, T6-KVonly -4.69% / +4.69%,
#    MLA -7.03% / -7.03%.
EXCEPTIONS = {
    ("medium", "mla"): 0.640625, ("large", "mla"): 0.58125, ("xl", "mla"): 0.519,
    ("small", "mla"): -0.072917, ("small", "t6"): 0.027344, ("small", "t6-kvonly"): 0.028646,
    ("tiny", "t6"): 0.03125, ("tiny", "t6-kvonly"): -0.046875, ("tiny", "mla"): -0.070312,
    ("mini", "t6"): 0.035156, ("mini", "t6-kvonly"): 0.046875, ("mini", "mla"): -0.070312,
}


def _nearest_possible(cfg, target):
    """Whether no other head count (valid for this config) gets closer to ``target``."""
    import dataclasses

    p = acc.attention_params_table1(cfg)
    for h in (cfg.n_head - 1, cfg.n_head + 1):
        try:
            other = dataclasses.replace(cfg, n_head=h)
        except ValueError:
            continue
        if abs(acc.attention_params_table1(other) - target) < abs(p - target):
            return False
    return True


@pytest.mark.parametrize("size", list(compare.SIZES))
def test_family_is_parameter_matched(size):
    fam = configs.family(size)
    target = TARGET[size]
    assert sorted(fam) == sorted(EXPECTED[size]) == sorted(compare.MECHANISM_ORDER)
    for mech, cfg in fam.items():
        heads, params = EXPECTED[size][mech]
        p = acc.attention_params_table1(cfg)
        assert (cfg.n_head, p) == (heads, params), (size, mech)
        rel = p / target - 1
        if (size, mech) in EXCEPTIONS:
            assert rel == pytest.approx(EXCEPTIONS[size, mech], abs=1e-6), (size, mech, rel)
        else:
            assert abs(rel) <= 0.02, (size, mech, rel)
        if mech in ("mha", "mqa", "gqa"):
            assert p == target
        if size in configs.TINY_SIZES:  # the CPU families: nearest integer head count
            assert _nearest_possible(cfg, target), (size, mech)
        # what the runner prints: the built layer's count (MLA adds its two norm gains) and ratios
        row = compare.describe_model(cfg, fam["mha"])
        assert row["attention_params"] == acc.attention_params(cfg)
        assert row["attention_params"] - p == (cfg.q_lora_rank + cfg.kv_lora_rank if mech == "mla" else 0)
        assert row["kv_cache_per_token"] == acc.kv_cache_per_token(cfg)
        assert row["model_params"] == acc.model_params(cfg)


def test_tiny_and_small_accounting_numbers():
    """The columns of the pre-training table for tiny and small, written out."""
    got = {s: {m: compare.describe_model(c, configs.family(s)["mha"]) for m, c in configs.family(s).items()}
           for s in ("tiny", "small")}
    # heads q/kv, attention params (built), KV cache numbers per token per layer, model params
    want = {
        "tiny": {"t6": ("4/4", 16_896, 80, 115_456), "t6-kvonly": ("5/5", 15_616, 84, 112_896),
                 "mha": ("4/4", 16_384, 128, 114_432), "mqa": ("7/1", 16_384, 32, 114_432),
                 "gqa": ("6/2", 16_384, 64, 114_432), "mla": ("3/3", 15_312, 40, 112_288)},
        "small": {"t6": ("34/34", 2_423_808, 392, 124_342_272), "t6-kvonly": ("22/22", 2_426_880, 344, 124_379_136),
                  "mha": ("12/12", 2_359_296, 1536, 123_568_128), "mqa": ("23/1", 2_359_296, 128, 123_568_128),
                  "gqa": ("22/2", 2_359_296, 256, 123_568_128), "mla": ("12/12", 2_188_032, 288, 121_512_960)},
    }
    for size, members in want.items():
        for mech, (heads, attn, kv, total) in members.items():
            r = got[size][mech]
            assert (r["heads"], r["attention_params"], r["kv_cache_per_token"], r["model_params"]) == \
                (heads, attn, kv, total), (size, mech)
    assert got["tiny"]["t6"]["ranks"] == "R_Q/R_K/R_V=6/2/2"
    assert got["tiny"]["mla"]["ranks"] == "d_c=32 d'_c=48 d^R_h=8"
    assert got["small"]["t6"]["kv_cache_vs_mha"] == pytest.approx(392 / 1536)


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


def test_identical_data_order(reference, corpus):
    out, report = reference
    rows = rows_by_member(report)
    digests = [rows[f"{m}-tiny"]["data_digests"] for m in MEMBERS]
    assert digests[0]["first_batch"] and digests[0]["val"]
    assert digests[0] == digests[1]
    # the digest is of the data, not of the member: another seed gives another first batch
    tcfg = TrainConfig.from_dict(json.load(open(out / "resolved_configs" / "mha-tiny.json")))
    assert compare.data_digests(tcfg) == digests[0]
    import dataclasses

    other = compare.data_digests(dataclasses.replace(tcfg, seed=tcfg.seed + 1))
    assert other["first_batch"] != digests[0]["first_batch"] and other["val"] == digests[0]["val"]


# ------------------------------------------------------------------------------------ outputs
def test_outputs(reference):
    out, report = reference
    assert report["interrupted"] is None and report["trained"] == ["t6-tiny", "mha-tiny"]
    data = json.load(open(out / "compare.json"))
    assert [r["member"] for r in data["rows"]] == ["t6-tiny", "mha-tiny"]
    for r in data["rows"]:
        assert r["status"] == "done" and r["step"] == 4
        assert r["val_loss"] < r["initial_val_loss"] and r["tokens_per_s"] > 0
        assert r["val_recall_acc"] is None
        assert json.load(open(out / r["member"] / "config.json")) == data["configs"][r["member"]]
        assert os.path.exists(out / "resolved_configs" / f"{r['member']}.json")
    assert data["options"]["train"]["batch_size"] == 4 and data["tokens_per_step"] == 4 * 32
    md = open(out / "compare.md").read()
    for h in ("member", "heads q/kv", "ranks / latent dims", "attn params/layer", "total params",
              "KV cache/token/layer", "val loss", "val ppl", "tokens/s"):
        assert h in md
    assert "recall acc" not in md and "| t6-tiny " in md and "| mha-tiny " in md and "16,896" in md
    png = open(out / "loss_curves.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 300_000


def test_bad_input_gives_one_line_errors(capsys, tmp_path, corpus):
    cases = [
        (["--size", "huge", "--steps", "3"], "unknown size 'huge'"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--steps", "3", "--mechanisms", "t6", "gpt"], "unknown mechanism 'gpt'"),
        (["--steps", "3", "--task", "copy"], "unknown task 'copy'"),
        (["--steps", "x"], "invalid int value"),
        (["--steps", "3", "--seq-len", "1000"], "max_seq_len"),
        (["--steps", "3", "--data-path", str(tmp_path / "nope")], "does not exist"),
        (["--steps", "3", "run_dir=x"], "set per member"),
        (["--steps", "3", "optim.lr=-1"], "OptimConfig.lr"),
        (["--steps", "3", "--devices", "99"], "--devices must be in"),
    ]
    for argv, message in cases:
        rc = run_main(argv + ["--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert message in err and err.count("\n") == 1 and err.startswith("error: "), (argv, err)
    assert not os.path.exists(tmp_path / "out" / "t6-tiny")  # nothing trained


def run_main(argv):
    """compare.main's exit status, also when argparse exits."""
    try:
        return compare.main(argv)
    except SystemExit as e:
        return e.code


# ------------------------------------------------------------------------------------ resume
def test_resume_matches_uninterrupted_run(reference, corpus, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "cmp"
    first = compare.run_comparison(**tiny_kwargs(corpus, out=str(out), stop_at={"mha-tiny": 2}))
    assert first["interrupted"] == "mha-tiny" and first["trained"] == ["t6-tiny"]
    assert os.path.exists(out / "t6-tiny" / "result.json") and not os.path.exists(out / "mha-tiny" / "result.json")
    assert os.path.isdir(out / "mha-tiny" / "checkpoints")
    assert {r["member"]: r["status"] for r in first["rows"]} == {"t6-tiny": "done", "mha-tiny": "interrupted"}
    assert os.path.exists(out / "compare.md")  # a partial table is written too
    a_result = out / "t6-tiny" / "result.json"
    a_stat, a_text = os.stat(a_result).st_mtime_ns, a_result.read_text()
    a_metrics = (out / "t6-tiny" / "metrics.jsonl").read_text()

    second = compare.run_comparison(**tiny_kwargs(corpus, out=str(out)))
    assert second["interrupted"] is None
    assert second["skipped"] == ["t6-tiny"] and second["trained"] == ["mha-tiny"] == second["resumed"]
    # A was not retrained: its result and metrics are untouched
    assert os.stat(a_result).st_mtime_ns == a_stat and a_result.read_text() == a_text
    assert (out / "t6-tiny" / "metrics.jsonl").read_text() == a_metrics
    b = json.load(open(out / "mha-tiny" / "result.json"))
    assert b["resumed"] and [(s["start_step"], s["end_step"], s["interrupted"]) for s in b["segments"]] == \
        [(0, 2, True), (2, 4, False)]
    # the final table equals the uninterrupted run's (timings aside)
    got, want = rows_by_member(second), rows_by_member(ref)
    assert list(got) == list(want)
    for name in want:
        for key in ("heads", "ranks", "attention_params", "model_params", "kv_cache_per_token", "step",
                    "data_digests", "status"):
            assert got[name][key] == want[name][key], (name, key)
        for key in ("val_loss", "val_ppl", "initial_val_loss"):
            assert got[name][key] == pytest.approx(want[name][key], rel=1e-5, abs=1e-6), (name, key)
    assert got["t6-tiny"]["val_loss"] == want["t6-tiny"]["val_loss"]  # same process, same data: bitwise


def test_mismatched_rerun_is_refused_and_force_starts_over(reference, corpus, tmp_path, capsys):
    ref_out, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    before = sorted(os.listdir(out))
    with pytest.raises(compare.CompareError, match=r"other settings \(.*steps: 4 -> 5"):
        compare.run_comparison(**tiny_kwargs(corpus, out=str(out), steps=5))
    rc = compare.main(tiny_argv(corpus, out, "--seed", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "seed: 0 -> 1" in err and "--force" in err
    assert sorted(os.listdir(out)) == before
    # another mechanism with the same settings is no mismatch: it joins the table (not run here);
    # --force clears OUT and runs the new settings
    rc = compare.main(tiny_argv(corpus, out, "--seed", "1", "--force", "--mechanisms", "t6"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| t6-tiny " in captured.out and "attn params/layer" in captured.out
    assert not os.path.exists(out / "mha-tiny")  # the old member went with --force
    data = json.load(open(out / "compare.json"))
    assert [r["member"] for r in data["rows"]] == ["t6-tiny"] and data["options"]["train"]["seed"] == 1
    assert data["command"].startswith("python -m tpa_jax.compare --size tiny") and "--force" in data["command"]


# ------------------------------------------------------------------------------------ recall task
def _recall_available():
    try:
        DataConfig(source="recall", seq_len=32, recall_pairs=4)
        return True
    except (TypeError, ValueError):
        return False


@pytest.mark.skipif(not _recall_available(), reason="DataConfig(source='recall') is not available in this checkout")
def test_recall_task_reports_accuracy(tmp_path):
    out = tmp_path / "recall"
    report = compare.run_comparison(size="tiny", steps=4, batch=4, seq_len=32, eval_every=2, task="recall",
                                    recall_pairs=4, mechanisms=["mha"], out=str(out), devices=jax.devices()[:1],
                                    overrides=["eval_batches=1", "save_every=100", "model.compute_dtype=float32"],
                                    log=None)
    (row,) = report["rows"]
    assert row["member"] == "mha-tiny" and 0.0 <= row["val_recall_acc"] <= 1.0
    assert row["data_digests"]["first_batch"] is not None
    md = open(out / "compare.md").read()
    assert "recall acc" in md and "task recall" in md
    opts = json.load(open(out / "options.json"))["options"]
    assert opts["task"] == "recall" and opts["train"]["data"]["source"] == "recall"
    assert opts["train"]["data"]["recall_pairs"] == 4
    assert open(out / "loss_curves.png", "rb").read()[:4] == b"\x89PNG"
    with pytest.raises(compare.CompareError, match="--data-path applies to --task corpus only"):
        compare.build_members("tiny", 4, task="recall", data_path="x")
