"""Fixtures of the data tests: a small prepared corpus of random text files."""
import pytest

from tpa_jax.data import prepare_files
from _data_util import random_docs


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """40 random-text .txt files, byte tokenizer, 20 % val, shards of 4000 tokens (several per split)."""
    d = tmp_path_factory.mktemp("small")
    src = d / "src"
    src.mkdir()
    docs = random_docs(40)
    names = [f"doc{i:02d}.txt" for i in range(40)]
    for name, text in zip(names, docs):
        (src / name).write_text(text)
    path = prepare_files([str(src / n) for n in names], d / "out", "byte", val_fraction=0.2, shard_tokens=4000)
    return {"manifest": path, "docs": dict(zip(names, docs)), "names": names, "src": src}
