"""Writing shards (tpa_jax.data.writer): manifest fields, shard sizes, separators, wide vocabularies,
no re-tokenising, atomic commit after an interruption, one tokenisation under concurrency."""
import json
import os
import threading
import time

import numpy as np
import pytest

from tpa_jax.data import ByteTokenizer, Tokenizer, load_manifest, load_tokenizer, prepare_files, read_split
from tpa_jax.data import shards, sources
from _data_util import one_line, random_docs, toy_tiktoken


def test_manifest_fields_and_shards(small):
    m = load_manifest(small["manifest"])
    assert m["format_version"] == shards.FORMAT_VERSION
    assert m["tokenizer"] == ByteTokenizer().to_manifest()
    assert (m["vocab_size"], m["dtype"]) == (256, "uint16")
    assert m["separator"] == {"kind": "text", "text": "\n\n", "ids": [10, 10]}
    assert set(m["splits"]) == {"train", "val"}
    for split, sp in m["splits"].items():
        assert sp["tokens"] == sum(f["tokens"] for f in sp["files"])
        assert [f["path"] for f in sp["files"]] == [f"{split}-{i:05d}.bin" for i in range(len(sp["files"]))]
        assert all(f["tokens"] == 4000 for f in sp["files"][:-1]) and 0 < sp["files"][-1]["tokens"] <= 4000
        for f in sp["files"]:
            assert os.path.getsize(os.path.join(m["root"], f["path"])) == 2 * f["tokens"]
    assert len(m["splits"]["train"]["files"]) >= 3
    assert sorted(os.listdir(m["root"])) == sorted(
        [".lock", "manifest.json"] + [f["path"] for sp in m["splits"].values() for f in sp["files"]])


def test_eot_separated_shards(monkeypatch, tmp_path):
    import tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: toy_tiktoken())
    tok = load_tokenizer("gpt2")
    docs = ["first doc", "second <|endoftext|> doc", "third"]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    m = load_manifest(prepare_files([tmp_path / f"{i}.txt" for i in range(3)], tmp_path / "o", tok, val_fraction=0))
    assert m["separator"] == {"kind": "eot", "ids": [256]}
    assert m["tokenizer"]["name"] == "gpt2" and m["dtype"] == "uint16"
    assert read_split(m, "train").tolist() == [t for d in docs for t in list(d.encode()) + [256]]


def test_wide_vocabulary_gets_uint32_shards(tmp_path):
    class Wide(Tokenizer):  # ids above 65535
        name, vocab_size, eot_id = "wide", 70_000, 69_999

        def encode(self, text):
            return [65_000 + b for b in text.encode()]

        def decode(self, ids):
            return bytes(i - 65_000 for i in ids).decode()

        def to_manifest(self):
            return {"kind": "wide", "name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}

    (tmp_path / "a.txt").write_text("abc")
    path = prepare_files([tmp_path / "a.txt"], tmp_path / "out", Wide(), val_fraction=0.0)
    m = load_manifest(path)
    assert m["dtype"] == "uint32" and set(m["splits"]) == {"train"}
    assert read_split(m, "train").tolist() == [65_097, 65_098, 65_099, 69_999]
    assert os.path.getsize(os.path.join(m["root"], "train-00000.bin")) == 4 * 4


def test_prepare_is_idempotent(small, tmp_path, monkeypatch):
    files = [str(small["src"] / n) for n in small["names"][:10]]
    out = tmp_path / "out"
    p1 = prepare_files(files, out, "byte", val_fraction=0.2)
    paths = sorted(out.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in paths}
    assert "manifest.json" in before and any(n.endswith(".bin") for n in before)

    def no_retokenising(*a, **k):
        raise AssertionError("prepare ran again")

    monkeypatch.setattr(sources, "write_and_commit", no_retokenising)
    assert prepare_files(files, out, "byte", val_fraction=0.2) == p1
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())} == before
    # a different source into the same directory is refused, not silently mixed
    with pytest.raises(ValueError) as e:
        prepare_files(files[:5], out, "byte", val_fraction=0.2)
    assert "overwrite" in one_line(e)


class _Boom(Exception):
    pass


class _FailingByteTokenizer(ByteTokenizer):
    """Tokenises the first chunk of documents, then fails (an interrupted prepare)."""

    def __init__(self):
        self.calls = 0

    def encode_batch(self, texts):
        self.calls += 1
        if self.calls > 1:
            raise _Boom("interrupted")
        return super().encode_batch(texts)


def test_interrupted_prepare_leaves_no_manifest(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in random_docs(600, seed=1, lo=20, hi=60)))
    out = tmp_path / "out"
    tok = _FailingByteTokenizer()
    with pytest.raises(_Boom):
        prepare_files([src], out, tok, val_fraction=0.05, shard_tokens=1000)
    assert tok.calls == 2  # shards were being written when it failed
    assert [p.name for p in out.iterdir()] == [".lock"]  # no manifest, no shards, no temp dir
    with pytest.raises(FileNotFoundError):
        load_manifest(out)
    # a complete prepare afterwards works; a failing rebuild keeps the previous valid manifest
    path = prepare_files([src], out, "byte", val_fraction=0.05, shard_tokens=1000)
    before = read_split(path, "train")
    with pytest.raises(_Boom):
        prepare_files([src], out, _FailingByteTokenizer(), val_fraction=0.5, shard_tokens=1000, overwrite=True)
    assert np.array_equal(read_split(load_manifest(out), "train"), before)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]


def test_concurrent_prepares_tokenise_once(small, tmp_path):
    class Slow(ByteTokenizer):
        calls = 0

        def encode_batch(self, texts):
            Slow.calls += 1
            time.sleep(0.3)
            return super().encode_batch(texts)

    files = [str(small["src"] / n) for n in small["names"][:8]]
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_files(files, tmp_path / "o", Slow(), 0.2)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert Slow.calls == 1
    load_manifest(results[0])


def test_bad_shard_settings_and_ids(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    for kw, message in ((dict(shard_tokens=0), "shard_tokens"), (dict(max_tokens=0), "max_tokens")):
        with pytest.raises(ValueError) as e:
            prepare_files([tmp_path / "a.txt"], tmp_path / "o", "byte", 0.0, **kw)
        assert message in one_line(e)

    class OutOfRange(ByteTokenizer):
        def encode_array(self, text):
            return np.array([300], np.int64)

    with pytest.raises(ValueError) as e:
        prepare_files([tmp_path / "a.txt"], tmp_path / "o", OutOfRange(), 0.0)
    assert "token id 300" in one_line(e)
