"""The comparison's report (tpa_jax.compare.report): compare.json, compare.md, loss_curves.png,
resolved configs; the recall column and panel of the recall task."""
import json
import os

import jax

from tpa_jax import compare
from _compare_util import TINY_OVERRIDES


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
    assert report["table"] in md
    for h in ("member", "heads q/kv", "ranks / latent dims", "attn params/layer", "total params",
              "KV cache/token/layer", "val loss", "val ppl", "tokens/s"):
        assert h in md
    assert "recall acc" not in md and "| t6-tiny " in md and "| mha-tiny " in md
    for r in data["rows"]:  # the table shows each member's accounting
        assert f"{r['attention_params']:,}" in md and f"{r['model_params']:,}" in md
    png = open(out / "loss_curves.png", "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 300_000


def test_recall_task_reports_accuracy(tmp_path):
    out = tmp_path / "recall"
    report = compare.run_comparison(size="tiny", steps=4, batch=4, seq_len=32, eval_every=2, task="recall",
                                    recall_pairs=4, mechanisms=["mha"], out=str(out), devices=jax.devices()[:1],
                                    overrides=list(TINY_OVERRIDES), log=None)
    (row,) = report["rows"]
    assert row["member"] == "mha-tiny" and 0.0 <= row["val_recall_acc"] <= 1.0
    assert row["data_digests"]["first_batch"] is not None
    md = open(out / "compare.md").read()
    assert "recall acc" in md and "task recall" in md
    opts = json.load(open(out / "options.json"))["options"]
    assert opts["task"] == "recall" and opts["train"]["data"]["source"] == "recall"
    assert opts["train"]["data"]["recall_pairs"] == 4
    assert open(out / "loss_curves.png", "rb").read()[:4] == b"\x89PNG"
