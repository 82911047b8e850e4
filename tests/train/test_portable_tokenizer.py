"""A run on data prepared with a locally trained Hugging Face BPE (the real ``tokenizers`` library):
the vocabulary comes from the tokenizer (rounded up to 128) when the config does not set it, the
saved config names the tokenizer used, the tokenizer is copied into the run directory and embedded
in every checkpoint, and a run directory moved elsewhere, with the original tokenizer file gone,
loads and generates with the same tokenizer."""
import json
import math
import os
import shutil

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers", reason="the HF tokenizers package is not installed")

import tpa_jax  # noqa: E402
from tpa_jax.configs import load_train_config  # noqa: E402
from tpa_jax.data import load_manifest, prepare_files  # noqa: E402
from tpa_jax.data.tokenizers import tokenizer_mismatch  # noqa: E402
from tpa_jax.train import train  # noqa: E402
from tpa_jax.train.checkpoint import manager, restore_meta  # noqa: E402

from _util import ROOT  # noqa: E402

BPE_VOCAB = 300  # > 256, so the byte-sized t6-tiny could not hold it
TEXT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n"


def _sources():
    pkg = os.path.join(ROOT, "tpa_jax")
    return sorted(os.path.join(pkg, f) for f in os.listdir(pkg) if f.endswith(".py"))


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    """(tokenizer.json path, its HF object, the prepared manifest)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(_sources(), trainer)
    (d / "tok").mkdir()
    path = d / "tok" / "tokenizer.json"
    tok.save(str(path))
    manifest = prepare_files(_sources(), d / "shards", f"hf:{path}", val_fraction=0.3)
    return path, tok, manifest


def _config(run_dir, manifest, *extra):
    return load_train_config("t6-tiny", [f"run_dir={run_dir}", "steps=2", "batch_size=4", "data.source=manifest",
                                         f"data.path={manifest}", "data.seq_len=32", "eval_batches=1",
                                         "sample_tokens=0", "model.compute_dtype=float32", *extra])


def test_moved_run_loads_its_own_tokenizer(bpe_data, tmp_path):
    path, hf, manifest = bpe_data
    n_vocab = hf.get_vocab_size(with_added_tokens=True)
    assert n_vocab == BPE_VOCAB
    original_bytes = path.read_bytes()
    want_ids = hf.encode(TEXT, add_special_tokens=False).ids

    run_dir = tmp_path / "run"
    train(_config(run_dir, manifest), progress=False)
    saved = json.load(open(run_dir / "config.json"))
    assert saved["model"]["vocab_size"] == 128 * math.ceil(BPE_VOCAB / 128) == 384
    assert saved["data"]["tokenizer"] == "hf:tokenizer.json"
    assert (run_dir / "tokenizer.json").read_bytes() == original_bytes
    mngr = manager(run_dir / "checkpoints", read_only=True)
    meta = restore_meta(mngr, 2)
    mngr.close()
    assert meta["tokenizer"]["content"].encode() == original_bytes and str(path) not in json.dumps(meta["tokenizer"])

    # move the run directory and take the original tokenizer file away
    moved = tmp_path / "elsewhere" / "copied-run"
    shutil.move(str(run_dir), str(moved))
    shutil.rmtree(path.parent)
    run = tpa_jax.load(moved)
    assert run.config.vocab_size == 384 and run.tokenizer.vocab_size == BPE_VOCAB
    assert run.encode(TEXT) == want_ids and run.decode(want_ids) == hf.decode(want_ids)
    assert run.tokenizer.eot_id == hf.token_to_id("<|endoftext|>")
    text = run.generate("def ", 6)
    out = run.generate_tokens(["def "], 6)
    assert isinstance(text, str) and text == hf.decode([int(t) for t in out.tokens[0][: out.lengths[0]]
                                                        if t != run.tokenizer.eot_id])
    assert np.all(out.tokens < 384)
    # the data's manifest (naming the deleted file) and the moved run still name the same tokenizer
    assert tokenizer_mismatch(load_manifest(manifest)["tokenizer"], run.tokenizer.to_manifest()) is None


def test_explicit_vocab_smaller_than_the_tokenizer_is_refused(bpe_data, tmp_path):
    _, _, manifest = bpe_data
    with pytest.raises(ValueError, match=r"model.vocab_size=256 is smaller than the data tokenizer's vocabulary 300"):
        train(_config(tmp_path / "run", manifest, "model.vocab_size=256"), progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything is written
    cfg = _config(tmp_path / "run2", manifest, "model.vocab_size=512")
    assert cfg.model.vocab_size == 512  # set explicitly: kept (larger than the tokenizer's is fine)
