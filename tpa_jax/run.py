"""Loading a trained run for inference: ``load`` restores a training checkpoint's model into a
``Run`` (config, params, tokenizer) that encodes, generates text and computes logits.

    run = tpa_jax.load("runs/t6-tiny")           # the run directory (or its checkpoints/ folder)
    run.generate("def fibonacci(n):", max_new_tokens=64)
    run.config, run.params, run.tokenizer, run.model, run.step, run.train_config

``load`` reads the checkpoint's saved configuration and tokenizer, restores the parameters of the
latest step (or ``step``) onto whatever devices are present -- replicated on one device by default,
or sharded by their logical axes over a given ``mesh`` -- and leaves the optimizer state on disk.
A latest checkpoint that cannot be read, or whose params differ from their saved checksums or are
not finite, is reported and the previous one is used (nothing on disk is changed).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np
import orbax.checkpoint as ocp

from .config import ModelConfig, TrainConfig
from .data.tokenizers import Tokenizer, load_tokenizer
from .inference.engine import Engine
from .inference.generate import Generation, generate, length_bucket
from .model import Transformer, abstract_params, logits_fn, model_of
from .train.checkpoint import CheckpointError, manager, restore_newest, verify

__all__ = ["Run", "load", "find_checkpoint_dir", "CheckpointError"]

LOGITS_BUCKET = 16  # smallest padded length of Run.logits


@dataclasses.dataclass
class Run:
    """A restored model: config, params, tokenizer and the flax module, plus text generation."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    train_config: TrainConfig
    step: int
    checkpoint_dir: str

    @property
    def model(self) -> Transformer:
        """The flax module of ``config`` (``logits`` and ``generate`` run it through its entry point)."""
        return model_of(self.config)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def generate_tokens(self, prompts: Sequence[str], max_new_tokens: int = 64, *, stop_at_eot: bool = True,
                        **sampling: Any) -> Generation:
        """``tpa_jax.generate`` on the encoded prompts (an empty prompt starts from end-of-text),
        stopping each row at end-of-text when ``stop_at_eot``."""
        ids = [self.encode(p) for p in prompts]
        for i, x in enumerate(ids):
            if not x:
                if self.tokenizer.eot_id is None:
                    raise ValueError(f"prompt {i} is empty and the tokenizer has no end-of-text token to start from")
                ids[i] = [self.tokenizer.eot_id]
        stops = tuple(sampling.pop("stop_tokens", ()))
        if stop_at_eot and self.tokenizer.eot_id is not None:
            stops += (self.tokenizer.eot_id,)
        return generate(self.params, self.config, ids, max_new_tokens, stop_tokens=stops, **sampling)

    def generate(self, text: Union[str, Sequence[str]], max_new_tokens: int = 64, *, temperature: float = 0.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                 stop_at_eot: bool = True) -> Union[str, list[str]]:
        """Continuation(s) of ``text`` (a string, or a list of strings generated as one batch).
        The end-of-text token, when the tokenizer has one, ends a row and is not returned."""
        single = isinstance(text, str)
        prompts = [text] if single else list(text)
        out = self.generate_tokens(prompts, max_new_tokens, stop_at_eot=stop_at_eot, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed)
        texts = []
        for row, n in zip(out.tokens, out.lengths):
            row = [int(t) for t in row[:n]]
            if stop_at_eot and row and row[-1] == self.tokenizer.eot_id:
                row = row[:-1]
            texts.append(self.decode(row))
        return texts[0] if single else texts

    def engine(self, *, max_batch: int = 8, page_size: int = 16, num_pages: Optional[int] = None,
               **kwargs: Any) -> "Engine":
        """A continuous-batching :class:`tpa_jax.inference.Engine` serving this model (``num_pages``
        default: room for every slot at ``max_len``); ``kwargs``: ``cache_dtype``, ``max_len``,
        ``prefill_chunk``.  Submit token ids (``encode``), read ids back (``decode``)."""
        max_len = kwargs.get("max_len") or self.config.max_seq_len
        if num_pages is None:
            num_pages = max_batch * -(-max_len // page_size) if isinstance(page_size, int) and page_size > 0 else 1
        return Engine(self.params, self.config, max_batch=max_batch, page_size=page_size, num_pages=num_pages,
                      **kwargs)

    def logits(self, tokens: Any) -> np.ndarray:
        """Full-forward float32 logits [B, T, vocab] (numpy) of int tokens [B, T] (or one sequence [T]).

        The length is padded on the right to its bucket (the next power of two, at least
        ``LOGITS_BUCKET``, at most ``max_seq_len``) and the result sliced back: causal attention
        leaves earlier positions unchanged, and one compiled program serves every length in a bucket."""
        ids = np.asarray(tokens)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"tokens: expected int ids [batch, length], got {ids.dtype} shape {ids.shape}")
        t = ids.shape[1]
        if not 1 <= t <= self.config.max_seq_len:
            raise ValueError(f"tokens: length {t} outside 1..max_seq_len={self.config.max_seq_len}")
        padded = length_bucket(t, LOGITS_BUCKET, self.config.max_seq_len)
        ids = np.pad(ids.astype(np.int32), ((0, 0), (0, padded - t)))
        return np.asarray(_jit_logits(self.config)(self.params, ids))[:, :t]  # sliced on the host

    def __repr__(self) -> str:
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))
        c = self.config
        return (f"Run(step={self.step}, attention={c.attention!r}, n_layer={c.n_layer}, d_model={c.d_model}, "
                f"params={n:,}, tokenizer={self.tokenizer.name!r}, checkpoint_dir={self.checkpoint_dir!r})")


@functools.lru_cache(maxsize=None)
def _jit_logits(cfg: ModelConfig):
    return jax.jit(logits_fn(cfg))


def find_checkpoint_dir(path: Union[str, os.PathLike]) -> str:
    """The Orbax checkpoint directory of ``path``: a run directory or its ``checkpoints`` folder."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    sub = os.path.join(path, "checkpoints")
    if os.path.isdir(sub):
        path = sub
    steps = [d for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))]
    if not steps:
        raise CheckpointError(f"no checkpoints in {path} (expected numbered step folders, e.g. a run "
                              f"directory's checkpoints/)")
    return path


def _restore_step(mngr: ocp.CheckpointManager, step: int, mesh: Optional[jax.sharding.Mesh]) -> tuple[dict, Any]:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    tcfg = TrainConfig.from_dict(meta["config"])
    target = {"params": abstract_params(tcfg.model, mesh)}
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    params = state["state"]["params"]
    verify(step, {"params": params}, meta)  # the saved checksums of the params leaves; finiteness
    return meta, params


def load(checkpoint_dir: Union[str, os.PathLike], step: Optional[int] = None, *,
         mesh: Optional[jax.sharding.Mesh] = None) -> Run:
    """Restore a training run's model for inference (see the module docstring).

    Errors, each one line: a missing directory (``FileNotFoundError``), a directory without
    checkpoints or none that can be read (``CheckpointError``), a ``step`` that does not exist
    (``CheckpointError`` listing the steps there are).
    """
    path = find_checkpoint_dir(checkpoint_dir)
    mngr = manager(path, read_only=True)
    try:
        s, (meta, params) = restore_newest(mngr, lambda s: _restore_step(mngr, s, mesh), step, what="loaded")
    finally:
        mngr.close()
    tcfg = TrainConfig.from_dict(meta["config"])
    return Run(config=tcfg.model, params=params, tokenizer=load_tokenizer(meta["tokenizer"]), train_config=tcfg,
               step=int(s), checkpoint_dir=path)
