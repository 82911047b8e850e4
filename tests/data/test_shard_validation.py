"""Token ids against the model's vocabulary: every shard's largest id is checked when a manifest is
opened for training (one line naming the shard, the id and the vocabulary), cached per shard in
``token_stats.json`` (skipped when the directory is read-only); the train loop refuses before
compiling."""
import json
import os

import numpy as np
import pytest

from tpa_jax.config import DataConfig, ModelConfig, TrainConfig
from tpa_jax.data.shards import TOKEN_STATS_NAME, check_compatible, shard_max_id
from tpa_jax.train import loop, train

from _data_util import one_line


def write_manifest(root, shards, vocab_size=256):
    """A format-1 manifest of uint16 shards: {split: [list of ids per shard]}."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, parts in shards.items():
        files = []
        for i, ids in enumerate(parts):
            name = f"{split}-{i:05d}.bin"
            np.asarray(ids, dtype="<u2").tofile(root / name)
            files.append({"path": name, "tokens": len(ids)})
        splits[split] = {"files": files, "tokens": sum(len(p) for p in parts), "documents": 1}
    m = {"format_version": 1, "tokenizer": {"name": "byte"}, "vocab_size": vocab_size, "dtype": "uint16",
         "separator": {"kind": "text", "ids": [10, 10]}, "source": {"id": "test", "kind": "files"},
         "splits": splits}
    (root / "manifest.json").write_text(json.dumps(m))
    return str(root / "manifest.json")


def test_id_at_vocab_is_refused(tmp_path):
    good = list(range(100))
    path = write_manifest(tmp_path / "d", {"train": [good, [1, 2, 256, 3] * 10], "val": [good]})
    check_compatible(path, 257, 8, 64)  # 256 < 257
    with pytest.raises(ValueError) as e:
        check_compatible(path, 256, 8, 64)
    msg = one_line(e)
    assert str(tmp_path / "d" / "train-00001.bin") in msg and "256" in msg and "vocab_size 256" in msg


def test_max_is_cached_per_shard(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 200, size=n).tolist() for n in (50, 70)]
    path = write_manifest(tmp_path / "d", {"train": parts, "val": [list(range(40))]})
    check_compatible(path, 256, 8, 64)
    stats = json.loads((tmp_path / "d" / TOKEN_STATS_NAME).read_text())
    assert sorted(stats.values()) == sorted([max(parts[0]), max(parts[1]), 39])
    assert all(k.split(":")[0] in ("train-00000.bin", "train-00001.bin", "val-00000.bin") for k in stats)
    # a rewritten shard (new size) is measured again, its stale entry dropped
    np.asarray(parts[0] + [250], dtype="<u2").tofile(tmp_path / "d" / "train-00000.bin")
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    m["splits"]["train"]["files"][0]["tokens"] += 1
    m["splits"]["train"]["tokens"] += 1
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    assert shard_max_id(path, "train-00000.bin") == 250
    stats = json.loads((tmp_path / "d" / TOKEN_STATS_NAME).read_text())
    assert [v for k, v in stats.items() if k.startswith("train-00000.bin:")] == [250]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_is_not_cached(tmp_path):
    path = write_manifest(tmp_path / "d", {"train": [[5] * 30], "val": [[7] * 30]})
    (tmp_path / "d").chmod(0o555)
    try:
        check_compatible(path, 256, 8, 64)
        with pytest.raises(ValueError):
            check_compatible(path, 7, 8, 64)
    finally:
        (tmp_path / "d").chmod(0o755)
    assert not (tmp_path / "d" / TOKEN_STATS_NAME).exists()


def test_train_refuses_before_compiling(tmp_path, monkeypatch):
    path = write_manifest(tmp_path / "d", {"train": [[1, 2, 3, 300] * 20], "val": [list(range(40))]}, vocab_size=256)

    def boom(*a, **k):
        raise AssertionError("reached the training body")
    monkeypatch.setattr(loop, "_train", boom)
    model = ModelConfig(vocab_size=256, n_layer=1, d_model=16, n_head=2, head_dim=8, compute_dtype="float32",
                        max_seq_len=32)
    cfg = TrainConfig(model=model, data=DataConfig(source="manifest", path=path, seq_len=8),
                      run_dir=str(tmp_path / "run"), steps=2, batch_size=2)
    with pytest.raises(ValueError) as e:
        train(cfg, progress=False)
    assert "train-00000.bin" in one_line(e) and "300" in str(e.value)
    assert not (tmp_path / "run").exists()
