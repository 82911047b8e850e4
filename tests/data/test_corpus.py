"""The embedded corpus (tpa_jax.data.corpus): which stdlib files, and the train / val split by path."""
import os

import pytest

from tpa_jax.data import corpus
from _data_util import in_val


@pytest.fixture(scope="module")
def files():
    return corpus.list_files()


def test_files(files):
    assert files == sorted(files) and len(files) > 100
    assert not any(part in corpus.EXCLUDED_DIRS for f in files for part in f.split("/")[:-1])
    assert not any(part.startswith("config-") for f in files for part in f.split("/")[:-1])
    assert not any(os.path.basename(f).startswith("_sysconfigdata") for f in files)
    assert "os.py" in files and "json/decoder.py" in files
    assert all(f.endswith(".py") for f in files)


def test_split_is_by_path_hash(files):
    parts = corpus.split_files(files)
    train, val = parts["train"], parts["val"]
    assert val and not set(train) & set(val) and sorted(train + val) == files
    # deterministic: the split is a pure function of the path, by sha256
    hashed_val = [f for f in files if in_val(f, corpus.VAL_FRACTION)]
    assert val == (hashed_val or [min(files, key=corpus.path_hash)])
    assert corpus.split_files(list(reversed(files))) == parts
    # no file below the threshold: the smallest hash goes to val, so val is never empty
    few = ["a.py", "b.py", "c.py"]
    tiny = corpus.split_files(few, 1e-12)
    assert tiny["val"] == [min(few, key=corpus.path_hash)] and len(tiny["train"]) == 2
    assert corpus.split_files(few, 0.0) == {"train": few, "val": []}
    with pytest.raises(ValueError):
        corpus.split_files(few, 1.0)


def test_documents_and_fingerprint(tmp_path):
    for rel, text in (("a.py", "x = 1\n"), ("pkg/b.py", "y = 'é'\n"), ("test/c.py", ""), ("d.txt", "")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert corpus.list_files(str(tmp_path)) == ["a.py", "pkg/b.py"]
    parts = corpus.split_files(["a.py", "pkg/b.py"], 0.5)
    for split in ("train", "val"):
        docs = list(corpus.iter_documents(split, str(tmp_path), 0.5))
        assert [rel for rel, _ in docs] == parts[split]
        assert all(text == (tmp_path / rel).read_text() for rel, text in docs)
    fp = corpus.fingerprint(str(tmp_path))
    (tmp_path / "a.py").write_text("x = 10\n")  # another size: another fingerprint
    assert corpus.fingerprint(str(tmp_path)) != fp
