"""Running a comparison (tpa_jax.compare.runner): resume after an interruption, refusal of a rerun
with other settings.  Training runs are tiny (t6-tiny / mha-tiny, 4 steps of 4 x 32 tokens)."""
import json
import os
import shutil

import pytest

from tpa_jax import compare
from _compare_util import rows_by_member, tiny_kwargs


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


def test_mismatched_rerun_is_refused(reference, corpus, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    before = sorted(os.listdir(out))
    with pytest.raises(compare.CompareError, match=r"other settings \(.*steps: 4 -> 5"):
        compare.run_comparison(**tiny_kwargs(corpus, out=str(out), steps=5))
    assert sorted(os.listdir(out)) == before
    with pytest.raises(compare.CompareError, match="stop_at names members not in this run"):
        compare.run_comparison(**tiny_kwargs(corpus, out=str(out), stop_at={"gqa-tiny": 1}))
