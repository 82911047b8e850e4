"""Tokenizers behind one small interface.

Every tokenizer has ``name``, ``vocab_size``, ``eot_id`` (``None`` when it has no end-of-text
token), ``encode(str) -> list[int]``, ``decode(list[int]) -> str`` and ``to_manifest() -> dict``
(what a shard manifest or a checkpoint stores; ``load_tokenizer`` turns it back into a tokenizer).

- ``ByteTokenizer``: UTF-8 bytes, vocabulary 256, no end-of-text token. Built in, no files.
- ``TiktokenTokenizer("gpt2")``: GPT-2 BPE (vocabulary 50257, ``<|endoftext|>`` = 50256), as the
  paper trained on. tiktoken downloads its BPE files on first use and caches them
  (``$TIKTOKEN_CACHE_DIR``); without network and without a cache this raises a one-line
  ``RuntimeError``.
- ``HFTokenizer(path)``: a Hugging Face ``tokenizer.json`` through the optional ``tokenizers``
  package (imported lazily).

A shard manifest names its tokenizer by where it is (an HF tokenizer by the absolute path of its
``tokenizer.json``).  A training run stores ``portable_spec(...)`` instead: the same entry with the
``tokenizer.json`` text embedded (``content``), so a run directory or a checkpoint moved or copied
elsewhere loads its tokenizer without the original file.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

__all__ = ["Tokenizer", "ByteTokenizer", "TiktokenTokenizer", "HFTokenizer", "load_tokenizer", "tokenizer_identity",
           "tokenizer_mismatch", "portable_spec", "HF_FILE"]

HF_FILE = "tokenizer.json"  # what a portable HF entry (and a run directory's copy) calls its file


class Tokenizer:
    """Interface (and defaults) shared by the tokenizers below."""

    name: str = "base"
    vocab_size: int = 0
    eot_id: Optional[int] = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def to_manifest(self) -> dict:
        raise NotImplementedError

    # Fast paths used by shard preparation; subclasses override when they can do better.
    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D int64 array."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: vocabulary 256, no end-of-text token; decode replaces invalid UTF-8."""

    name = "byte"
    vocab_size = 256
    eot_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            bad = int(arr[(arr < 0) | (arr > 255)][0])
            raise ValueError(f"byte tokenizer: token id {bad} is outside 0..255")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_manifest(self) -> dict:
        return {"kind": "byte", "name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding (default GPT-2 BPE). Text is encoded with ``encode_ordinary``: a literal
    ``<|endoftext|>`` inside a document is plain text, never the end-of-text token."""

    def __init__(self, encoding: str = "gpt2", num_threads: int = 8):
        try:
            import tiktoken
        except ImportError:
            raise ImportError("TiktokenTokenizer needs the `tiktoken` package: pip install tiktoken") from None
        try:
            self._enc = tiktoken.get_encoding(encoding)
        except ValueError as e:  # unknown encoding name
            raise ValueError(f"tiktoken has no encoding {encoding!r}: {str(e).splitlines()[0]}") from None
        except Exception as e:  # download failed: no network and no cached BPE files
            import tempfile
            cache = (os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                     or os.path.join(tempfile.gettempdir(), "data-gym-cache"))
            files = " (vocab.bpe, encoder.json)" if encoding == "gpt2" else ""
            first = str(e).splitlines()[0][:120] if str(e) else ""
            raise RuntimeError(
                f"tiktoken could not load the {encoding!r} BPE files{files}: not in its cache {cache} and the "
                f"download failed ({type(e).__name__}: {first}...); run once where the network is reachable, "
                f"or set TIKTOKEN_CACHE_DIR to a directory holding the cached files") from None
        self.encoding = encoding
        self.name = "gpt2" if encoding == "gpt2" else f"tiktoken:{encoding}"
        self.vocab_size = int(self._enc.n_vocab)
        self.eot_id = getattr(self._enc, "eot_token", None)
        self.num_threads = num_threads

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self._enc.encode_ordinary_batch(list(texts), num_threads=self.num_threads)
        return [np.asarray(ids, dtype=np.int64) for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def to_manifest(self) -> dict:
        return {"kind": "tiktoken", "name": self.name, "encoding": self.encoding,
                "vocab_size": self.vocab_size, "eot_id": self.eot_id}


_EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` via the optional ``tokenizers`` package.

    ``eot_token``: the end-of-text token's string; by default the first of ``<|endoftext|>``,
    ``</s>``, ``<|end_of_text|>``, ``<eos>``, ``<|eot_id|>``, ``[SEP]`` that the vocabulary has
    (``None`` if none)."""

    def __init__(self, path: Union[str, os.PathLike], eot_token: Optional[str] = None, *,
                 content: Optional[str] = None):
        """``path``: a ``tokenizer.json`` (or its folder).  With ``content`` (that file's text) the
        file is not read and ``path`` only names where it came from."""
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError:
            raise ImportError("HFTokenizer needs the `tokenizers` package: pip install tokenizers") from None
        if content is not None:
            self._tok = _HFTok.from_str(content)
            self.path = os.fspath(path)
            self.sha256 = _sha256(content.encode("utf-8"))
        else:
            path = os.path.abspath(os.fspath(path))
            if os.path.isdir(path):
                path = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"HF tokenizer file not found: {path}")
            self._tok = _HFTok.from_file(path)
            self.path = path
            self.sha256 = _file_sha256(path)
        self.name = f"hf:{self.path}"
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if eot_token is not None and eot_token not in vocab:
            raise ValueError(f"HF tokenizer {path}: eot_token {eot_token!r} is not in its vocabulary")
        cands = (eot_token,) if eot_token is not None else _EOT_CANDIDATES
        self.eot_token = next((t for t in cands if t in vocab), None)
        self.eot_id = None if self.eot_token is None else int(vocab[self.eot_token])

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_manifest(self) -> dict:
        return {"kind": "hf", "name": self.name, "path": self.path, "sha256": self.sha256,
                "eot_token": self.eot_token, "vocab_size": self.vocab_size, "eot_id": self.eot_id}


TokenizerSpec = Union[str, dict, Tokenizer]


def load_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    """A tokenizer from a name (``"byte"``, ``"gpt2"``, ``"tiktoken:<encoding>"``, ``"hf:<path>"``),
    from a ``to_manifest()`` dict (a shard manifest's ``tokenizer`` entry), or passed through."""
    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "byte":
            tok: Tokenizer = ByteTokenizer()
        elif kind == "tiktoken":
            tok = TiktokenTokenizer(spec.get("encoding", "gpt2"))
        elif kind == "hf":
            tok = HFTokenizer(spec["path"], eot_token=spec.get("eot_token"), content=spec.get("content"))
        else:
            raise ValueError(f"tokenizer manifest: unknown kind {kind!r} (expected 'byte', 'tiktoken' or 'hf')")
        want = spec.get("vocab_size")
        if want is not None and int(want) != tok.vocab_size:
            raise ValueError(f"tokenizer {tok.name!r}: vocab_size is {tok.vocab_size}, the manifest says {want}")
        return tok
    if isinstance(spec, str):
        if spec == "byte":
            return ByteTokenizer()
        if spec == "gpt2":
            return TiktokenTokenizer("gpt2")
        if spec.startswith("tiktoken:"):
            return TiktokenTokenizer(spec[len("tiktoken:"):])
        if spec.startswith("hf:"):
            return HFTokenizer(spec[len("hf:"):])
        raise ValueError(f"tokenizer: unknown name {spec!r} (expected 'byte', 'gpt2', 'tiktoken:<encoding>' or 'hf:<path>')")
    raise TypeError(f"tokenizer: expected a name, a manifest dict or a Tokenizer, got {type(spec).__name__}")


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return _sha256(f.read())


def portable_spec(spec: dict) -> dict:
    """A tokenizer manifest entry that does not depend on where its files are: an HF entry gets its
    ``tokenizer.json`` text (``content``; read from ``path``, which must exist unless the entry
    already carries it) and ``path`` becomes ``HF_FILE``, the name of a run directory's copy; byte and tiktoken entries are
    returned as they are (they name no file)."""
    if spec.get("kind") != "hf" or "content" in spec:
        return dict(spec)
    path = spec["path"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path} (named by the data's manifest) does not exist")
    with open(path, "rb") as f:
        raw = f.read()
    digest = _sha256(raw)
    if spec.get("sha256") not in (None, digest):
        raise ValueError(f"tokenizer file {path} changed since the data was tokenized (sha256 {digest[:12]}... "
                         f"vs the manifest's {spec['sha256'][:12]}...)")
    return {**spec, "path": HF_FILE, "sha256": digest, "name": f"hf:{HF_FILE}", "content": raw.decode("utf-8")}


def tokenizer_identity(spec: dict) -> tuple:
    """What makes two tokenizer manifests the same tokenizer: (kind, vocab_size, what it is built
    from): nothing for ``byte``, the encoding for tiktoken, the sha256 of the ``tokenizer.json``
    for HF (read from the file when an older manifest did not record it; None when neither is known)."""
    kind = spec.get("kind")
    vocab = spec.get("vocab_size")
    vocab = None if vocab is None else int(vocab)
    if kind == "tiktoken":
        return kind, vocab, spec.get("encoding", "gpt2")
    if kind == "hf":
        digest = spec.get("sha256")
        if digest is None and spec.get("path") and os.path.isfile(spec["path"]):
            digest = _file_sha256(spec["path"])
        return kind, vocab, digest
    return kind, vocab, None


def tokenizer_mismatch(data: dict, model: dict) -> Optional[str]:
    """None when the data's tokenizer manifest names the model's tokenizer, else a short description
    of the difference (for one-line errors)."""
    a, b = tokenizer_identity(data), tokenizer_identity(model)
    if a == b:
        return None
    field = ("kind", "vocab_size", "encoding" if a[0] == "tiktoken" else "tokenizer.json sha256")
    i = next(i for i in range(3) if a[i] != b[i])
    return (f"the data was tokenized with {data.get('name')!r}, the model was trained with {model.get('name')!r} "
            f"({field[i]} {a[i]!r} vs {b[i]!r})")


def tokenizer_slug(spec: TokenizerSpec) -> str:
    """A filesystem-safe short name for cache directories (``byte``, ``gpt2``, ``hf-<hash>``)."""
    import hashlib
    import re
    name = spec if isinstance(spec, str) else (spec.get("name") if isinstance(spec, dict) else spec.name)
    name = str(name)
    if name.startswith("hf:"):
        return "hf-" + hashlib.sha256(name.encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def iter_chunks(items: Iterable[Any], n: int):
    """Lists of up to ``n`` consecutive items."""
    buf: list = []
    for x in items:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf
