"""Fixtures shared by the training tests: the corpus and one reference run that the loop, step,
checkpoint and metrics tests all compare against (trained once per session)."""
import pytest

from tpa_jax.train import train

from _train_util import STEPS, make_cfg, make_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The manifest of a small byte-token corpus of project sources."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def straight(tmp_path_factory, corpus):
    """(run_dir, summary) of a 16-step run on all 8 devices (fsdp=8), checkpoints at 8 and 16."""
    run = tmp_path_factory.mktemp("straight")
    out = train(make_cfg(run, corpus, steps=STEPS, save_every=8), progress=False)
    return run, out
