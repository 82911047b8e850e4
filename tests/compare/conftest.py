"""Fixtures of the comparison tests: a small byte-token corpus and one reference comparison run
(t6-tiny and mha-tiny, uninterrupted), each made once per session."""
import os

import pytest

from tpa_jax import compare
from tpa_jax.data import prepare_files
from _util import ROOT
from _compare_util import tiny_kwargs


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def reference(tmp_path_factory, corpus):
    """An uninterrupted comparison of t6-tiny and mha-tiny: (OUT, report)."""
    out = tmp_path_factory.mktemp("compare_ref")
    report = compare.run_comparison(**tiny_kwargs(corpus, out=str(out)))
    return out, report
