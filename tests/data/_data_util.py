"""Shared helpers of the data tests: random documents, one-line error messages, a local tiktoken."""
import hashlib

import numpy as np

SEP = b"\n\n"  # what the byte tokenizer's shards put after every document


def random_docs(n, seed=0, lo=200, hi=900):
    """``n`` random texts of ``lo``..``hi`` characters (letters, spaces, punctuation, newlines)."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      .,\n", dtype=np.uint8)
    return ["".join(map(chr, rng.choice(alphabet, size=int(rng.integers(lo, hi))))) for _ in range(n)]


def one_line(excinfo):
    """The message of a ``pytest.raises`` result, checked to be one non-empty line."""
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def in_val(doc_id, val_fraction):
    """The split rule, written out: val when the first 8 bytes of sha256(id) fall below the fraction of 2**64."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") < val_fraction * 2 ** 64


def toy_tiktoken():
    """A byte-level tiktoken Encoding built locally (no download), with <|endoftext|> = 256."""
    import tiktoken
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="toy", pat_str=pat, mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})
