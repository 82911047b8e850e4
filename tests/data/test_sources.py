"""Preparing corpora (tpa_jax.data.sources): local files (text, JSONL), Hugging Face streams, the
embedded stdlib corpus; which document lands in which split, and what the shards hold."""
import json
import os
import sys
import types

import numpy as np
import pytest

from tpa_jax.data import corpus, load_manifest, prepare_embedded, prepare_files, prepare_hf, read_split
from _data_util import SEP, in_val, one_line


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The real embedded corpus, prepared once."""
    return prepare_embedded(tmp_path_factory.mktemp("embedded"), "byte")


def test_files_split_and_contents(small):
    """Files in order, val by sha256(name) < 0.2 * 2**64, each followed by "\\n\\n"."""
    m = load_manifest(small["manifest"])
    names = small["names"]
    val = [n for n in names if in_val(n, 0.2)]
    assert 0 < len(val) < len(names)
    assert m["source"]["kind"] == "files" and m["source"]["val_fraction"] == 0.2
    assert m["source"]["files"] == [os.path.join(str(small["src"]), n) for n in names]
    for split, members in (("val", val), ("train", [n for n in names if n not in val])):
        expect = b"".join(small["docs"][n].encode() + SEP for n in members)
        sp = m["splits"][split]
        assert sp["tokens"] == len(expect)
        assert sp["documents"] == len(members)
        assert read_split(m, split).astype(np.uint8).tobytes() == expect


def test_jsonl_text_field(tmp_path):
    rows = [{"body": f"doc number {i}", "id": i} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError) as e:
        prepare_files([tmp_path / "d.jsonl"], tmp_path / "a", "byte")
    assert "'text'" in one_line(e)
    m = load_manifest(prepare_files([tmp_path / "d.jsonl"], tmp_path / "b", "byte", 0.1, text_field="body"))
    both = read_split(m, "train").astype(np.uint8).tobytes() + read_split(m, "val").astype(np.uint8).tobytes()
    assert sorted(both.split(SEP)[:-1] if both.endswith(SEP) else both.split(SEP)) == \
        sorted(r["body"].encode() for r in rows)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 30
    val_ids = [f"d.jsonl#{i + 1}" for i in range(30) if in_val(f"d.jsonl#{i + 1}", 0.1)]
    assert m["splits"]["val"]["documents"] == max(len(val_ids), 1)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        prepare_files([tmp_path / "missing.txt"], tmp_path / "o")
    assert "missing.txt" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        prepare_files([tmp_path / "empty"], tmp_path / "o")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError) as e:
        prepare_files([tmp_path / "x.txt"], tmp_path / "o", val_fraction=1.0)
    assert "val_fraction" in one_line(e)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("y")
    with pytest.raises(ValueError) as e:
        prepare_files([tmp_path / "x.txt", tmp_path / "sub" / "x.txt"], tmp_path / "o", val_fraction=0.0)
    assert "'x.txt'" in one_line(e)


def test_hf_without_datasets(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError) as e:
        prepare_hf("fineweb-edu", tmp_path / "fwe", max_tokens=1000)
    assert "datasets" in one_line(e)
    assert not (tmp_path / "fwe").exists()


def test_hf_stream_split_and_cap(monkeypatch, tmp_path):
    """A stand-in ``datasets`` module: documents are assigned by sha256 of their stream ids, val is
    never empty, and ``max_tokens`` cuts the stream."""
    texts = [f"record {i} " + "x" * (i % 7) for i in range(50)]
    opened = []

    def load_dataset(path, name=None, split="train", streaming=False):
        opened.append((path, name, split, streaming))
        return [{"text": t} for t in texts]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    m = load_manifest(prepare_hf("fineweb-edu", tmp_path / "a", tokenizer="byte", val_fraction=0.1))
    assert opened == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    assert m["source"]["kind"] == "hf" and m["source"]["dataset"] == "HuggingFaceFW/fineweb-edu"
    ids = [f"HuggingFaceFW/fineweb-edu/sample-10BT/train#{i}" for i in range(50)]
    val = [t for t, i in zip(texts, ids) if in_val(i, 0.1)]
    assert val  # with these ids the hash rule alone gives val documents
    got_val = read_split(m, "val").astype(np.uint8).tobytes()
    assert got_val == b"".join(t.encode() + SEP for t in val)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 50
    # a stream without any val document by the hash rule: its first document becomes val
    tiny = load_manifest(prepare_hf("fineweb-edu", tmp_path / "b", tokenizer="byte", val_fraction=1e-12))
    assert read_split(tiny, "val").astype(np.uint8).tobytes() == texts[0].encode() + SEP
    capped = load_manifest(prepare_hf("openwebtext", tmp_path / "c", tokenizer="byte", val_fraction=0.0,
                                      max_tokens=100))
    assert opened[-1] == ("Skylion007/openwebtext", None, "train", True)
    assert capped["splits"]["train"]["tokens"] == 100 and set(capped["splits"]) == {"train"}
    assert read_split(capped, "train").astype(np.uint8).tobytes() == \
        b"".join(t.encode() + SEP for t in texts)[:100]


def test_embedded_corpus(embedded):
    m = load_manifest(embedded)
    src = m["source"]
    train, val = src["files"]["train"], src["files"]["val"]
    assert src["kind"] == "embedded" and src["fingerprint"] == corpus.fingerprint()
    assert m["splits"]["train"]["tokens"] > 1_000_000
    assert m["splits"]["val"]["tokens"] > 0 and len(val) >= 1
    assert {"train": train, "val": val} == corpus.split_files(corpus.list_files())
    # val holds exactly those files' bytes, each followed by a blank line
    root = corpus.stdlib_dir()
    expect = b"".join(open(os.path.join(root, f), "rb").read().decode("utf-8", "replace").encode() + SEP
                      for f in val)
    assert read_split(m, "val").astype(np.uint8).tobytes() == expect
    # preparing again reuses the cache
    mtime = os.stat(embedded).st_mtime_ns
    assert prepare_embedded(os.path.dirname(embedded), "byte") == embedded
    assert os.stat(embedded).st_mtime_ns == mtime
