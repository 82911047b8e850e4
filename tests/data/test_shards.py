"""Data layer: tokenizers, embedded corpus, shards + manifest, Grain pipeline."""
import hashlib
import json
import os
import sys

import numpy as np
import pytest

from tpa_jax.data import (ByteTokenizer, TiktokenTokenizer, Tokenizer, TokenWindows, check_compatible, corpus,
                          eval_batches, load_manifest, load_tokenizer, make_iterator, prepare_embedded,
                          prepare_files, prepare_hf, read_split, to_global, token_dtype)
from tpa_jax.data import shards as shards_mod

SEP = b"\n\n"


# ----------------------------------------------------------------------------------------------
# fixtures

def _random_docs(n, seed=0, lo=200, hi=900):
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      .,\n", dtype=np.uint8)
    return ["".join(map(chr, rng.choice(alphabet, size=int(rng.integers(lo, hi))))) for _ in range(n)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """40 random-text .txt files, byte tokenizer, 20 % val, shards of 4000 tokens (several per split)."""
    d = tmp_path_factory.mktemp("small")
    src = d / "src"
    src.mkdir()
    docs = _random_docs(40)
    names = [f"doc{i:02d}.txt" for i in range(40)]
    for name, text in zip(names, docs):
        (src / name).write_text(text)
    path = prepare_files([str(src / n) for n in names], d / "out", "byte", val_fraction=0.2, shard_tokens=4000)
    return {"manifest": path, "docs": dict(zip(names, docs)), "names": names, "src": src}


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The real embedded corpus, prepared once."""
    return prepare_embedded(tmp_path_factory.mktemp("embedded"), "byte")


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# tokenizers

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓ 𝔘'\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert tok.decode(ids) == text
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"
    assert (tok.vocab_size, tok.eot_id, tok.name) == (256, None, "byte")
    again = load_tokenizer(tok.to_manifest())
    assert isinstance(again, ByteTokenizer) and again.to_manifest() == tok.to_manifest()
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError) as e:
        load_tokenizer("nope")
    assert "nope" in _one_line(e)


def test_gpt2_tokenizer_clear_error_without_files(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net'): Max retries\nexceeded")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError) as e:
        TiktokenTokenizer("gpt2")
    msg = _one_line(e)
    assert "gpt2" in msg and "TIKTOKEN_CACHE_DIR" in msg


def test_gpt2_tokenizer_when_available():
    try:
        tok = load_tokenizer("gpt2")
    except RuntimeError as e:
        assert "gpt2" in str(e) and "\n" not in str(e)
        pytest.skip("GPT-2 BPE files not cached and no network")
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode("hello world") == [31373, 995]
    assert tok.decode(tok.encode("héllo <|endoftext|>")) == "héllo <|endoftext|>"
    assert 50256 not in tok.encode("<|endoftext|>")  # plain text, never the special token


def _toy_tiktoken():
    """A byte-level tiktoken Encoding built locally (no download), with <|endoftext|> = 256."""
    import tiktoken
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="toy", pat_str=pat, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def test_tiktoken_wrapper_and_eot_separated_shards(monkeypatch, tmp_path):
    import tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: _toy_tiktoken())
    tok = load_tokenizer("gpt2")
    assert isinstance(tok, TiktokenTokenizer)
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    text = "héllo <|endoftext|> world"
    assert tok.encode(text) == list(text.encode())  # the literal special string stays plain text
    assert tok.decode(tok.encode(text)) == text
    assert [a.tolist() for a in tok.encode_batch(["ab", "c"])] == [[97, 98], [99]]
    docs = ["first doc", "second <|endoftext|> doc", "third"]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    m = load_manifest(prepare_files([tmp_path / f"{i}.txt" for i in range(3)], tmp_path / "o", tok, val_fraction=0))
    assert m["separator"] == {"kind": "eot", "ids": [256]}
    assert m["tokenizer"]["name"] == "gpt2" and m["dtype"] == "uint16"
    assert read_split(m, "train").tolist() == [t for d in docs for t in list(d.encode()) + [256]]


def test_optional_packages_missing_give_clear_errors(monkeypatch, tmp_path):
    from tpa_jax.data import HFTokenizer
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError) as e:
        HFTokenizer(tmp_path / "tokenizer.json")
    assert "tokenizers" in _one_line(e)
    with pytest.raises(ImportError) as e:
        prepare_hf("fineweb-edu", tmp_path / "fwe", max_tokens=1000)
    assert "datasets" in _one_line(e)
    assert not (tmp_path / "fwe").exists()


# ----------------------------------------------------------------------------------------------
# shards and manifest

def test_manifest_fields_and_contents(small):
    m = load_manifest(small["manifest"])
    assert m["format_version"] == shards_mod.FORMAT_VERSION
    assert m["tokenizer"] == ByteTokenizer().to_manifest()
    assert (m["vocab_size"], m["dtype"]) == (256, "uint16")
    assert m["separator"]["ids"] == [10, 10]
    assert set(m["splits"]) == {"train", "val"}
    # independent expectation: files in order, val by sha256(name) < 0.2 * 2**64, each + "\n\n"
    names = small["names"]
    val = [n for n in names if int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") < 0.2 * 2 ** 64]
    assert 0 < len(val) < len(names)
    for split, members in (("val", val), ("train", [n for n in names if n not in val])):
        expect = b"".join(small["docs"][n].encode() + SEP for n in members)
        sp = m["splits"][split]
        assert sp["tokens"] == len(expect) == sum(f["tokens"] for f in sp["files"])
        assert sp["documents"] == len(members)
        assert all(f["tokens"] <= 4000 for f in sp["files"])
        got = read_split(m, split)
        assert got.dtype == np.uint16
        assert got.astype(np.uint8).tobytes() == expect
    assert len(m["splits"]["train"]["files"]) >= 3


def test_token_dtype_choice(tmp_path):
    assert token_dtype(256) == np.uint16
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16   # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(200_000) == np.uint32

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

    monkeypatch.setattr(shards_mod, "_write_and_commit", no_retokenising)
    assert prepare_files(files, out, "byte", val_fraction=0.2) == p1
    assert {p.name: p.stat().st_mtime_ns for p in sorted(out.iterdir())} == before
    # a different source into the same directory is refused, not silently mixed
    with pytest.raises(ValueError) as e:
        prepare_files(files[:5], out, "byte", val_fraction=0.2)
    assert "overwrite" in _one_line(e)


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
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in _random_docs(600, seed=1, lo=20, hi=60)))
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
    import threading
    import time

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


def test_jsonl_text_field(tmp_path):
    rows = [{"body": f"doc number {i}", "id": i} for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError) as e:
        prepare_files([tmp_path / "d.jsonl"], tmp_path / "a", "byte")
    assert "'text'" in _one_line(e)
    m = load_manifest(prepare_files([tmp_path / "d.jsonl"], tmp_path / "b", "byte", 0.1, text_field="body"))
    both = read_split(m, "train").astype(np.uint8).tobytes() + read_split(m, "val").astype(np.uint8).tobytes()
    assert sorted(both.split(SEP)[:-1] if both.endswith(SEP) else both.split(SEP)) == \
        sorted(r["body"].encode() for r in rows)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 30


def test_cli_prepare(tmp_path, capsys):
    from tpa_jax.data.prepare import main
    for i, t in enumerate(_random_docs(6, seed=3)):
        (tmp_path / f"f{i}.txt").write_text(t)
    rc = main(["--source", "files", "--files", str(tmp_path), "--out", str(tmp_path / "o"), "--val-fraction", "0.3"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = load_manifest(info["manifest"])
    assert info["tokens"] == {s: sp["tokens"] for s, sp in m["splits"].items()}
    assert sum(info["tokens"].values()) == sum(len(t) + 2 for t in _random_docs(6, seed=3))
    assert main(["--source", "files", "--files", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 1


# ----------------------------------------------------------------------------------------------
# errors

def test_missing_manifest_and_shard(small, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_manifest(tmp_path / "nowhere")
    assert "manifest.json" in _one_line(e)
    m = json.load(open(small["manifest"]))
    d = tmp_path / "copy"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps(m))  # shards not copied
    with pytest.raises(FileNotFoundError) as e:
        load_manifest(d)
    assert "train-00000.bin" in _one_line(e)


def test_corrupt_and_empty_manifests(small, tmp_path):
    (tmp_path / "manifest.json").write_text('{"format_version": 1, "splits": ')
    with pytest.raises(ValueError) as e:
        load_manifest(tmp_path)
    assert "JSON" in _one_line(e)
    m = json.load(open(small["manifest"]))
    root = os.path.dirname(small["manifest"])
    m["splits"]["val"] = {"files": [], "tokens": 0, "documents": 0}
    bad = os.path.join(root, "empty_val.json")
    with open(bad, "w") as fh:
        json.dump(m, fh)
    try:
        with pytest.raises(ValueError) as e:
            load_manifest(bad)
        assert "'val'" in _one_line(e) and "empty" in str(e.value)
    finally:
        os.remove(bad)


def test_check_compatible(small):
    m = load_manifest(small["manifest"])
    check_compatible(m, vocab_size=256, seq_len=64, max_seq_len=64)  # fine
    with pytest.raises(ValueError) as e:
        check_compatible(m, vocab_size=100, seq_len=64, max_seq_len=64)
    assert "vocab_size 256" in _one_line(e) and "100" in str(e.value)
    with pytest.raises(ValueError) as e:
        check_compatible(m, vocab_size=256, seq_len=128, max_seq_len=64)
    assert "max_seq_len 64" in _one_line(e) and "128" in str(e.value)
    n_val = m["splits"]["val"]["tokens"]
    with pytest.raises(ValueError) as e:
        check_compatible(m, vocab_size=256, seq_len=n_val, max_seq_len=10 ** 6)
    assert "'val'" in _one_line(e) and str(n_val) in str(e.value)
    check_compatible(m, vocab_size=256, seq_len=n_val - 1, max_seq_len=10 ** 6)  # exactly seq_len + 1 tokens


# ----------------------------------------------------------------------------------------------
# windows and iterator

def test_token_windows_match_concatenated_tokens(small):
    m = load_manifest(small["manifest"])
    full = read_split(m, "train").astype(np.int32)
    T = 37
    w = TokenWindows(m, "train", T)
    assert len(w) == (len(full) - 1) // T
    bounds = np.cumsum([f["tokens"] for f in m["splits"]["train"]["files"]])[:-1]
    crossing = [i for i in range(len(w)) if any(i * T < b < i * T + T + 1 for b in bounds)]
    assert crossing  # some windows span two shards
    for i in [0, 1, len(w) // 2, len(w) - 1] + crossing:
        x = w[i]
        assert x.dtype == np.int32 and x.shape == (T + 1,)
        assert np.array_equal(x, full[i * T: i * T + T + 1])
    with pytest.raises(IndexError):
        w[len(w)]


def _windows_index(m, split, T):
    w = TokenWindows(m, split, T)
    table = {w[i].tobytes(): i for i in range(len(w))}
    assert len(table) == len(w)  # random text: windows are unique, so rows identify windows
    return table


def _row_ids(batch, table):
    full = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1).astype(np.int32)
    return [table[r.tobytes()] for r in full]


def test_iterator_batches_are_shifted_windows(small):
    m = load_manifest(small["manifest"])
    T, B = 16, 8
    it = make_iterator(m, "train", T, B, seed=0)
    table = _windows_index(m, "train", T)
    for _ in range(3):
        b = next(it)
        assert set(b) == {"inputs", "targets"}
        assert b["inputs"].shape == b["targets"].shape == (B, T)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        assert len(set(_row_ids(b, table))) == B
    unshuffled = next(make_iterator(m, "train", T, B, seed=0, shuffle=False))
    assert _row_ids(unshuffled, table) == list(range(B))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x["inputs"], y["inputs"]) and
                                    np.array_equal(x["targets"], y["targets"]) for x, y in zip(a, b))


def test_iterator_seeds(small):
    m = load_manifest(small["manifest"])
    a = _take(make_iterator(m, "train", 16, 8, seed=1), 4)
    b = _take(make_iterator(m, "train", 16, 8, seed=1, num_threads=0, prefetch=0), 4)
    c = _take(make_iterator(m, "train", 16, 8, seed=2), 4)
    assert _same(a, b)
    assert not _same(a, c)


def test_iterator_epochs_are_reshuffled_permutations(small):
    m = load_manifest(small["manifest"])
    T, B = 256, 4
    table = _windows_index(m, "train", T)
    n = len(table)
    rows = [i for b in make_iterator(m, "train", T, B, seed=4, num_epochs=2) for i in _row_ids(b, table)]
    assert len(rows) == 2 * n // B * B  # whole global batches only
    assert sorted(rows[:n]) == list(range(n))  # epoch 1: every window once
    second = rows[n:]
    assert len(set(second)) == len(second) >= n - B  # epoch 2: no repeats, only the tail dropped
    assert rows[:len(second)] != second  # a new order every epoch
    assert rows[:n] != list(range(n))


def test_iterator_state_restores_exact_next_batches(small):
    m = load_manifest(small["manifest"])
    T, B, k = 256, 8, 7
    n_windows = len(TokenWindows(m, "train", T))
    assert k * B < n_windows < (k + 6) * B  # the resumed batches cross an epoch boundary
    it = make_iterator(m, "train", T, B, seed=3)
    _take(it, k)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON
    expected = _take(it, 6)
    fresh = make_iterator(m, "train", T, B, seed=3)
    fresh.set_state(state)
    assert _same(_take(fresh, 6), expected)
    # and a restored iterator is not just replaying from the start
    assert not _same(_take(make_iterator(m, "train", T, B, seed=3), 6), expected)


def test_two_processes_split_the_global_batch(small):
    m = load_manifest(small["manifest"])
    T, B = 16, 6
    table = _windows_index(m, "train", T)
    one = [_row_ids(b, table) for b in make_iterator(m, "train", T, B, seed=5, num_epochs=1)]
    p0 = [_row_ids(b, table) for b in make_iterator(m, "train", T, B, seed=5, process_index=0, process_count=2,
                                                    num_epochs=1)]
    p1 = [_row_ids(b, table) for b in make_iterator(m, "train", T, B, seed=5, process_index=1, process_count=2,
                                                    num_epochs=1)]
    assert len(one) == len(table) // B and len(p0) == len(p1) == len(one)
    assert all(len(r) == B // 2 for r in p0 + p1)
    seen0 = {i for r in p0 for i in r}
    seen1 = {i for r in p1 for i in r}
    assert not seen0 & seen1
    assert seen0 | seen1 == {i for r in one for i in r}
    for k in range(len(one)):  # batch k of the two processes together = batch k of one process
        assert sorted(p0[k] + p1[k]) == sorted(one[k])
    with pytest.raises(ValueError) as e:
        make_iterator(m, "train", T, 7, seed=0, process_count=2)
    assert "global_batch 7" in _one_line(e)


def test_eval_batches_deterministic(small):
    m = load_manifest(small["manifest"])
    T, B = 16, 4
    table = _windows_index(m, "val", T)
    batches = list(eval_batches(m, T, B))
    assert len(batches) == len(table) // B
    assert [i for b in batches for i in _row_ids(b, table)] == list(range(len(batches) * B))
    assert _same(list(eval_batches(m, T, B, max_batches=2)), batches[:2])
    halves = [list(eval_batches(m, T, B, process_index=p, process_count=2)) for p in (0, 1)]
    for k, b in enumerate(batches):
        assert sorted(_row_ids(halves[0][k], table) + _row_ids(halves[1][k], table)) == _row_ids(b, table)


def test_to_global(small):
    import jax
    from jax.sharding import AxisType, PartitionSpec as P
    m = load_manifest(small["manifest"])
    batch = next(make_iterator(m, "train", 16, 8, seed=0))
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Auto,))
    g = to_global(batch, mesh, P("data"))
    assert set(g) == {"inputs", "targets"}
    assert g["inputs"].shape == (8, 16) and g["inputs"].dtype == np.int32
    assert g["inputs"].sharding.spec == P("data")
    assert np.array_equal(np.asarray(g["targets"]), batch["targets"])
    g2 = to_global(batch, mesh)  # default: tpa_jax.parallel.batch_sharding
    assert g2["inputs"].sharding.spec == P("data")
    assert np.array_equal(np.asarray(g2["inputs"]), batch["inputs"])


# ----------------------------------------------------------------------------------------------
# the real embedded corpus

def test_embedded_corpus(embedded):
    m = load_manifest(embedded)
    src = m["source"]
    train, val = src["files"]["train"], src["files"]["val"]
    assert m["splits"]["train"]["tokens"] > 1_000_000
    assert m["splits"]["val"]["tokens"] > 0 and len(val) >= 1
    assert not set(train) & set(val)
    files = corpus.list_files()
    assert sorted(train + val) == files
    assert not any(part in corpus.EXCLUDED_DIRS for f in files for part in f.split("/")[:-1])
    assert "os.py" in files and "json/decoder.py" in files
    # deterministic: the split is a pure function of the path, by sha256
    threshold = 0.02 * 2 ** 64
    hashed_val = [f for f in files if int.from_bytes(hashlib.sha256(f.encode()).digest()[:8], "big") < threshold]
    assert val == (hashed_val or [min(files, key=corpus.path_hash)])
    assert corpus.split_files(list(reversed(files))) == {"train": train, "val": val}
    # val holds exactly those files' bytes, each followed by a blank line
    root = corpus.stdlib_dir()
    expect = b"".join(open(os.path.join(root, f), "rb").read().decode("utf-8", "replace").encode() + SEP
                      for f in val)
    assert read_split(m, "val").astype(np.uint8).tobytes() == expect
    # preparing again reuses the cache
    mtime = os.stat(embedded).st_mtime_ns
    assert prepare_embedded(os.path.dirname(embedded), "byte") == embedded
    assert os.stat(embedded).st_mtime_ns == mtime


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TPA_JAX_CACHE", str(tmp_path))
    v = sys.version_info
    assert shards_mod.default_cache_dir("byte") == os.path.join(str(tmp_path), f"embedded-byte-py{v.major}{v.minor}")
