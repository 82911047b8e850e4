"""An lm-evaluation-harness model for tpa_jax checkpoints: ``TPAJaxLM``.

With the harness installed (``pip install 'tpa-jax[lm-eval]'``, lm-eval >= 0.4.8) importing this
module registers the class under the name ``tpa_jax``.  The stock ``lm_eval`` command never imports
it (the harness discovers models only among its own modules; ``--include_path`` adds task YAMLs,
not models), so start the harness through this module instead; every argument is passed on to the
harness's own command line unchanged::

    python -m tpa_jax.eval.lm_eval_adapter --model tpa_jax \\
        --model_args checkpoint=runs/t6,step=100 --batch_size 8 --tasks hellaswag

or from Python (after the import, ``model="tpa_jax"`` with ``model_args`` works as well)::

    import lm_eval
    from tpa_jax.eval.lm_eval_adapter import TPAJaxLM
    lm_eval.simple_evaluate(model=TPAJaxLM(run), tasks=["hellaswag"])

The harness's own options reach the constructor too: ``batch_size`` (an integer, or ``auto`` /
``auto:N``, which mean ``max_batch_size`` when given, else 8: no memory probe is run), and ``device``
(not used, JAX places the model; a platform other than JAX's backend is logged as a warning).  A
``batch_size`` in ``--model_args`` wins over ``--batch_size``.

Without the harness the module still imports: ``TPAJaxLM`` then derives from a small stand-in base
(``tpa_jax.eval.lm_eval_base``) and its three request methods take plain tuples
(``(context, continuation)``, ``(text,)``, ``(context, gen_kwargs)``) as well as harness
``Instance`` objects.

Conventions (those of the harness's Hugging Face model unless stated):

* **Trailing whitespace** of a loglikelihood context moves to the front of the continuation, then
  context and continuation are encoded separately and concatenated.
* **Prefix token**: a request with an empty context, and the first window of
  ``loglikelihood_rolling``, is conditioned on ``prefix_token_id`` (default: the tokenizer's
  end-of-text id).  A tokenizer without one (the byte tokenizer) has no natural prefix; pass
  ``prefix_token_id=...`` (for a byte model trained on newline-separated documents, ``10``) or the
  *fallback* applies: the first token of the text serves as the context and gets no score, so the
  result is ``log p(x_2..x_n | x_1)``.  In ``loglikelihood`` a one-token continuation with an empty
  context then has nothing to score and raises ``ValueError``; ``loglikelihood_rolling`` of a
  one-token text returns ``0.0``.
* **Truncation**: the context is cut on the left so that context + continuation fits in
  ``max_length + 1`` tokens (the last token is never an input); a continuation longer than
  ``max_length`` tokens cannot be scored in one window and raises ``ValueError``.
* **Rolling windows**: the text is split into disjoint prediction blocks of ``max_length`` tokens;
  every block after the first is conditioned on the ``max_length`` tokens before its last target,
  exactly as the harness's ``get_rolling_token_windows(..., context_len=1)``.
* **Batching** (``tpa_jax.eval.lm_eval_scoring``): scoring rows are sorted by length (longest
  first), taken ``batch_size`` at a time and right-padded to a bucketed length; the model is
  causal, so padding never changes a score; results come back in request order.
* **Generation** (``generate_until``, through ``tpa_jax.inference.generate.generate``): requests
  with the same options are batched, longest prompt first, the batch padded to a power of two with
  copies of a prompt.  Greedy unless ``do_sample=True`` (then ``temperature``, default 1.0, and
  ``top_k`` / ``top_p`` when given); other keys are ignored.  The prompt is cut on the left so that
  prompt + ``max_gen_toks`` fits in ``max_length``.  Generation stops at the end-of-text token when
  the tokenizer has one (it is not part of the text); the decoded text is cut at the first
  occurrence of any ``until`` string.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..model import model_of
from .lm_eval_base import (DEFAULT_BATCH_SIZE, HAVE_LM_EVAL, Base, check_device, harness_kwargs, int_arg,
                           parse_model_args, register_model, request_args, resolve_batch_size)
from .lm_eval_scoring import next_pow2, rolling_windows, score_rows

__all__ = ["TPAJaxLM", "HAVE_LM_EVAL", "rolling_windows", "parse_model_args"]

_ARG_KEYS = ("checkpoint", "step", "batch_size", "max_batch_size", "device", "max_length", "max_gen_toks",
             "prefix_token_id", "seed")


def _generate_fn() -> Callable:
    """``tpa_jax.inference.generate.generate``, imported on first use."""
    from ..inference.generate import generate

    return generate


class TPAJaxLM(Base):
    """A tpa_jax model as an lm-evaluation-harness ``LM``.

    ``run``: an object with ``.config`` (``ModelConfig``), ``.params`` (unboxed parameter pytree)
    and ``.tokenizer`` (a ``tpa_jax.data.tokenizers.Tokenizer``), e.g. what ``tpa_jax.load``
    returns.  Or ``checkpoint`` (and ``step``) instead, loaded with ``tpa_jax.load(checkpoint,
    step=step)``.  The model runs through ``tpa_jax.model.logits_fn(config)``.

    ``batch_size``: rows per forward pass (or ``auto``: ``max_batch_size``, else 8).  ``device``:
    accepted for the harness, not used (see the module docstring).  ``max_length``: longest window in tokens (default and
    upper bound ``config.max_seq_len``).  ``max_gen_toks``: default generation budget.
    ``prefix_token_id``: token that conditions an empty context (default: the tokenizer's
    end-of-text id; see the module docstring for tokenizers without one).  ``seed``: base seed of
    sampled generation.
    """

    def __init__(self, run: Any = None, *, checkpoint: Optional[str] = None, step: Optional[int] = None,
                 batch_size: Any = DEFAULT_BATCH_SIZE, max_batch_size: Optional[int] = None,
                 device: Optional[str] = None, max_length: Optional[int] = None, max_gen_toks: int = 256,
                 prefix_token_id: Optional[int] = None, seed: int = 0):
        super().__init__()
        if run is None and checkpoint is None:
            raise ValueError("TPAJaxLM: pass a loaded run or checkpoint=DIR")
        if run is not None and checkpoint is not None:
            raise ValueError("TPAJaxLM: pass either a loaded run or checkpoint=DIR, not both")
        if run is None:
            import tpa_jax

            run = tpa_jax.load(checkpoint, step=None if step is None else int_arg("step", step, 0))
        for attr in ("config", "params", "tokenizer"):
            if not hasattr(run, attr):
                raise ValueError(f"TPAJaxLM: the run object has no .{attr} attribute")
        self.config = run.config
        self.params = run.params
        self.tokenizer = run.tokenizer
        self.model = model_of(self.config)

        cfg = self.config
        tok_vocab = int(getattr(self.tokenizer, "vocab_size", 0) or 0)
        if tok_vocab > cfg.vocab_size:
            raise ValueError(f"TPAJaxLM: tokenizer vocab_size {tok_vocab} exceeds the model's vocab_size "
                             f"{cfg.vocab_size}")
        self._batch_size = resolve_batch_size(batch_size, max_batch_size)
        self._device = check_device(device)
        self._max_length = cfg.max_seq_len if max_length is None else int_arg("max_length", max_length)
        if self._max_length > cfg.max_seq_len:
            raise ValueError(f"TPAJaxLM: max_length {self._max_length} exceeds the model's max_seq_len "
                             f"{cfg.max_seq_len}")
        self._max_gen_toks = int_arg("max_gen_toks", max_gen_toks)
        eot = getattr(self.tokenizer, "eot_id", None)
        self._eot = None if eot is None else int(eot)
        if prefix_token_id is not None:
            prefix_token_id = int_arg("prefix_token_id", prefix_token_id, 0)
            if prefix_token_id >= cfg.vocab_size:
                raise ValueError(f"TPAJaxLM: prefix_token_id {prefix_token_id} is outside the model's "
                                 f"vocabulary 0..{cfg.vocab_size - 1}")
        self._prefix = prefix_token_id if prefix_token_id is not None else self._eot
        self._seed = int_arg("seed", seed, 0)

    # ------------------------------------------------------------------ construction from the harness
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "TPAJaxLM":
        """``--model_args checkpoint=DIR,step=100``, plus the harness's ``batch_size`` /
        ``max_batch_size`` / ``device`` (``additional_config``) where the model args do not set them."""
        return cls.create_from_arg_obj(parse_model_args(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: Optional[dict], additional_config: Optional[dict] = None) -> "TPAJaxLM":
        """``create_from_arg_string`` with the model args already a dict (what ``simple_evaluate``
        and the harness's command line use); an unknown key raises ``ValueError``."""
        return cls(**harness_kwargs(arg_dict, additional_config, _ARG_KEYS))

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> Optional[str]:
        """The harness's ``device`` option as given (not used: JAX places the model)."""
        return self._device

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def eot_token_id(self) -> Optional[int]:
        return self._eot

    @property
    def prefix_token_id(self) -> Optional[int]:
        return self._prefix

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name", type(self.tokenizer).__name__)).replace("/", "__")

    def tok_encode(self, text: str) -> List[int]:
        return [int(t) for t in self.tokenizer.encode(text)] if text else []

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in tokens])

    # ------------------------------------------------------------------ scoring core
    def _score_rows(self, rows: Sequence[Tuple[Sequence[int], Sequence[int]]], disable_tqdm: bool = True,
                    desc: str = "") -> List[Tuple[float, bool]]:
        return score_rows(self.config, self.params, rows, batch_size=self._batch_size, max_length=self._max_length,
                          disable_tqdm=disable_tqdm or self.rank != 0, desc=desc)

    def _check_tokens(self, what: str, ids: Sequence[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self.config.vocab_size):
            bad = next(i for i in ids if i < 0 or i >= self.config.vocab_size)
            raise ValueError(f"{what}: token id {bad} is outside the model's vocabulary 0..{self.config.vocab_size - 1}")

    # ------------------------------------------------------------------ harness API
    def _loglikelihood_row(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise ValueError(f"loglikelihood: expected (context: str, continuation: str), got "
                             f"({type(context).__name__}, {type(continuation).__name__})")
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        ctx = self.tok_encode(context)
        cont = self.tok_encode(continuation)
        if not cont:
            raise ValueError(f"loglikelihood: continuation {continuation!r} encodes to zero tokens")
        if not ctx:
            if self._prefix is not None:
                ctx = [self._prefix]
            elif len(cont) >= 2:  # no prefix token: the first continuation token is context, unscored
                ctx, cont = cont[:1], cont[1:]
            else:
                raise ValueError(f"loglikelihood: empty context and a one-token continuation {continuation!r} "
                                 "with no prefix token to condition on; pass prefix_token_id=...")
        if len(cont) > self._max_length:
            raise ValueError(f"loglikelihood: continuation of {len(cont)} tokens exceeds max_length "
                             f"{self._max_length}")
        self._check_tokens("loglikelihood", ctx + cont)
        whole = (ctx + cont)[-(self._max_length + 1):]
        return whole[:-1], cont

    def loglikelihood(self, requests, disable_tqdm: bool = True) -> List[Tuple[float, bool]]:
        """``[(log p(continuation | context), continuation is the greedy continuation), ...]``."""
        args = [request_args(r) for r in requests]
        rows = []
        for a in args:
            if len(a) != 2:
                raise ValueError(f"loglikelihood: expected (context, continuation), got {len(a)} argument(s)")
            rows.append(self._loglikelihood_row(*a))
        out = self._score_rows(rows, disable_tqdm, "loglikelihood")
        for a, res in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", a, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True) -> List[float]:
        """Log-likelihood of each whole text, in disjoint windows of ``max_length`` tokens."""
        texts = []
        for r in requests:
            a = request_args(r)
            if not a or not isinstance(a[0], str):
                raise ValueError("loglikelihood_rolling: expected (text: str,) requests")
            texts.append(a[0])
        rows, owner = [], []
        for j, text in enumerate(texts):
            ids = self.tok_encode(text)
            self._check_tokens("loglikelihood_rolling", ids)
            prefix = self._prefix
            if prefix is None and ids:  # no prefix token: the first token conditions the rest, unscored
                prefix, ids = ids[0], ids[1:]
            for w in rolling_windows(ids, prefix, self._max_length):
                rows.append(w)
                owner.append(j)
        scores = self._score_rows(rows, disable_tqdm, "loglikelihood_rolling")
        out = [0.0] * len(texts)
        for j, (lp, _) in zip(owner, scores):
            out[j] += lp
        for text, res in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return out

    def _gen_options(self, gen_kwargs: Any) -> Tuple[List[str], int, float, Optional[int], Optional[float]]:
        kw = dict(gen_kwargs or {})
        until = kw.get("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"generate_until: 'until' must be a string or a list of strings, got {until!r}")
        until = [u for u in until if u]
        max_gen = int_arg("max_gen_toks", kw.get("max_gen_toks", self._max_gen_toks))
        if max_gen >= self._max_length:
            raise ValueError(f"generate_until: max_gen_toks {max_gen} leaves no room for a prompt in "
                             f"max_length {self._max_length}")
        temperature = 0.0
        top_k = top_p = None
        if kw.get("do_sample") is True:
            t = kw.get("temperature")
            temperature = 1.0 if t is None else float(t)
            if temperature < 0:
                raise ValueError(f"generate_until: temperature must be >= 0, got {temperature}")
            if temperature > 0:
                top_k = kw.get("top_k")
                top_k = None if top_k in (None, 0, -1) else int_arg("top_k", top_k)
                top_p = kw.get("top_p")
                top_p = None if top_p is None or float(top_p) >= 1.0 else float(top_p)
        return list(until), max_gen, temperature, top_k, top_p

    def generate_until(self, requests, disable_tqdm: bool = True) -> List[str]:
        """Greedy (or, with ``do_sample=True``, sampled) continuations cut at the ``until`` strings."""
        generate = _generate_fn()
        items = []
        for r in requests:
            a = request_args(r)
            if len(a) != 2 or not isinstance(a[0], str):
                raise ValueError("generate_until: expected (context: str, gen_kwargs: dict) requests")
            context, gen_kwargs = a
            until, max_gen, temperature, top_k, top_p = self._gen_options(gen_kwargs)
            ids = self.tok_encode(context)
            if not ids:
                if self._prefix is None:
                    raise ValueError("generate_until: empty context and no prefix token to condition on; "
                                     "pass prefix_token_id=...")
                ids = [self._prefix]
            self._check_tokens("generate_until", ids)
            ids = ids[-(self._max_length - max_gen):]
            items.append(dict(args=a, ids=ids, until=until, key=(max_gen, temperature, top_k, top_p)))

        stops = () if self._eot is None else (self._eot,)
        out: List[Optional[str]] = [None] * len(items)
        groups: dict = {}
        for i, it in enumerate(items):
            groups.setdefault(it["key"], []).append(i)
        call = 0
        for (max_gen, temperature, top_k, top_p), idx in groups.items():
            idx = sorted(idx, key=lambda i: -len(items[i]["ids"]))
            for s in range(0, len(idx), self._batch_size):
                chunk = idx[s: s + self._batch_size]
                prompts = [items[i]["ids"] for i in chunk]
                # pad the batch to a power of two with copies of its first prompt (fewer recompiles)
                prompts += [prompts[0]] * (min(self._batch_size, next_pow2(len(chunk))) - len(chunk))
                gen = generate(self.params, self.config, prompts, max_gen,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=self._seed + call,
                               stop_tokens=stops)
                call += 1
                toks = np.asarray(gen.tokens)
                lens = np.asarray(gen.lengths)
                for r, i in enumerate(chunk):
                    row = [int(t) for t in toks[r, : int(lens[r])]]
                    if self._eot is not None and self._eot in row:
                        row = row[: row.index(self._eot)]
                    text = self.tok_decode(row)
                    for u in items[i]["until"]:
                        text = text.split(u, 1)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", items[i]["args"], text)
        return out  # type: ignore[return-value]


if HAVE_LM_EVAL and register_model is not None:
    try:
        TPAJaxLM = register_model("tpa_jax")(TPAJaxLM)
    except Exception:  # already registered (module reloaded) or an incompatible registry
        pass


def main() -> None:
    """``python -m tpa_jax.eval.lm_eval_adapter ARGS``: the harness's command line with ``tpa_jax``
    registered as a model."""
    if not HAVE_LM_EVAL:
        raise SystemExit("lm-evaluation-harness is not installed: pip install 'tpa-jax[lm-eval]'")
    import runpy

    runpy.run_module("lm_eval", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
