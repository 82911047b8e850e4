"""Token shards and their manifest, read back (tpa_jax.data.shards): dtype rule, validation of the
manifest and its shards, split reading, compatibility with a model, the cache directory."""
import json
import os
import sys

import numpy as np
import pytest

from tpa_jax.data import check_compatible, load_manifest, read_split, token_dtype
from tpa_jax.data import shards
from _data_util import one_line


def test_token_dtype_choice():
    assert token_dtype(256) == np.uint16
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16   # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(200_000) == np.uint32
    for bad in (0, 2 ** 32 + 1):
        with pytest.raises(ValueError):
            token_dtype(bad)


def test_read_split(small):
    m = load_manifest(small["manifest"])
    assert load_manifest(os.path.dirname(small["manifest"])) == m  # a directory names its manifest.json
    assert load_manifest(m) is m
    for split in ("train", "val"):
        got = read_split(m, split)
        parts = [np.fromfile(os.path.join(m["root"], f["path"]), dtype="<u2") for f in m["splits"][split]["files"]]
        assert got.dtype == np.uint16 and np.array_equal(got, np.concatenate(parts))
        assert shards.split_tokens(m, split) == len(got) == m["splits"][split]["tokens"]
    with pytest.raises(ValueError) as e:
        shards.split_tokens(m, "test")
    assert "'test'" in one_line(e)


def test_missing_manifest_and_shard(small, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_manifest(tmp_path / "nowhere")
    assert "manifest.json" in one_line(e)
    m = json.load(open(small["manifest"]))
    d = tmp_path / "copy"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(m))  # shards not copied
    with pytest.raises(FileNotFoundError) as e:
        load_manifest(d)
    assert "train-00000.bin" in one_line(e)


def test_corrupt_and_empty_manifests(small, tmp_path):
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "splits": ')
    with pytest.raises(ValueError) as e:
        load_manifest(tmp_path)
    assert "JSON" in one_line(e)
    m = json.load(open(small["manifest"]))
    root = os.path.dirname(small["manifest"])
    m["splits"]["val"] = {"files": [], "tokens": 0, "documents": 0}
    bad = os.path.join(root, "empty_val.json")
    with open(bad, "w") as fh:
        json.dump(m, fh)
    try:
        with pytest.raises(ValueError) as e:
            load_manifest(bad)
        assert "'val'" in one_line(e) and "empty" in str(e.value)
    finally:
        os.remove(bad)


def test_check_compatible(small):
    m = load_manifest(small["manifest"])
    check_compatible(m, vocab_size=256, seq_len=64, max_seq_len=64)  # fine
    with pytest.raises(ValueError) as e:
        check_compatible(m, vocab_size=100, seq_len=64, max_seq_len=64)
    assert "vocab_size 256" in one_line(e) and "100" in str(e.value)
    with pytest.raises(ValueError) as e:
        check_compatible(m, vocab_size=256, seq_len=128, max_seq_len=64)
    assert "max_seq_len 64" in one_line(e) and "128" in str(e.value)
    n_val = m["splits"]["val"]["tokens"]
    with pytest.raises(ValueError) as e:
        check_compatible(m, vocab_size=256, seq_len=n_val, max_seq_len=10 ** 6)
    assert "'val'" in one_line(e) and str(n_val) in str(e.value)
    check_compatible(m, vocab_size=256, seq_len=n_val - 1, max_seq_len=10 ** 6)  # exactly seq_len + 1 tokens


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TPA_JAX_CACHE", str(tmp_path))
    v = sys.version_info
    assert shards.default_cache_dir("byte") == os.path.join(str(tmp_path), f"embedded-byte-py{v.major}{v.minor}")
