"""What a run takes from its data before anything is built: the manifest, the vocabulary, and the
tokenizer it keeps.

- ``resolve_data(tcfg)``: the data's manifest and ``tcfg`` completed from it.  A ``model.vocab_size``
  left unset (None: what a named model in a training config gives) becomes the tokenizer's
  vocabulary rounded up to a multiple of ``VOCAB_MULTIPLE`` (logged once); with ``source="manifest"``
  ``data.tokenizer`` becomes the name of the tokenizer the manifest used, so the saved
  ``config.json`` says what the run was trained with.  Then the data / model checks run.
- ``save_tokenizer(run_dir, spec)``: an HF tokenizer's ``tokenizer.json`` copied into the run
  directory (atomically), beside ``config.json``.

Checkpoint metadata stores ``portable_spec`` of the tokenizer (the ``tokenizer.json`` text embedded),
so a run directory moved or copied elsewhere loads without the original file.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from ..config import TrainConfig
from ..data import check_compatible, resolve_manifest
from ..data.tokenizers import HF_FILE

__all__ = ["VOCAB_MULTIPLE", "resolve_data", "save_tokenizer", "used_tokenizer_name"]

log = logging.getLogger(__name__)
VOCAB_MULTIPLE = 128  # embedding rows rounded up to this (MXU / tensor-core friendly)


def used_tokenizer_name(spec: dict) -> str:
    """How ``data.tokenizer`` names a manifest's tokenizer: ``byte``, ``gpt2``, ``tiktoken:<enc>``,
    or ``hf:tokenizer.json`` (the copy in the run directory)."""
    if spec.get("kind") == "hf":
        return f"hf:{HF_FILE}"
    return str(spec.get("name", spec.get("kind")))


def resolve_data(tcfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """(``tcfg`` completed from its data, the manifest); see the module docstring.  Bad input (data
    whose vocabulary exceeds an explicit ``model.vocab_size``, too few tokens, ...) is a one-line
    ValueError."""
    manifest = resolve_manifest(tcfg.data)
    model, data = tcfg.model, tcfg.data
    if model.vocab_size is None:
        vocab = int(manifest["vocab_size"])
        rounded = -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        log.info("model.vocab_size %d: the tokenizer's %d rounded up to a multiple of %d", rounded, vocab,
                 VOCAB_MULTIPLE)
        model = dataclasses.replace(model, vocab_size=rounded)
    elif int(manifest["vocab_size"]) > model.vocab_size:
        raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than the data tokenizer's vocabulary "
                         f"{manifest['vocab_size']} ({manifest['tokenizer'].get('name')!r}); leave model.vocab_size "
                         f"unset (null) to take the tokenizer's, rounded up to a multiple of {VOCAB_MULTIPLE}")
    if data.source == "manifest":
        data = dataclasses.replace(data, tokenizer=used_tokenizer_name(manifest["tokenizer"]))
    tcfg = dataclasses.replace(tcfg, model=model, data=data)
    check_compatible(manifest, model.vocab_size, data.seq_len, model.max_seq_len)
    return tcfg, manifest


def save_tokenizer(run_dir: str, spec: dict) -> Optional[str]:
    """Write an HF tokenizer's ``tokenizer.json`` (``spec`` from ``portable_spec``) into ``run_dir``;
    returns its path (None for tokenizers without a file)."""
    if spec.get("kind") != "hf":
        return None
    path = os.path.join(run_dir, HF_FILE)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(spec["content"].encode("utf-8"))  # the original bytes: the same sha256
    os.replace(tmp, path)
    return path
