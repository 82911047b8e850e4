"""Data: the embedded corpus (``corpus``), tokenizers, token shards + manifest (format and reader
``shards``, ``writer``, ``sources`` preparing them), the Grain pipeline and the synthetic recall task."""
from .tokenizers import (ByteTokenizer, HFTokenizer, TiktokenTokenizer, Tokenizer, load_tokenizer,
                         tokenizer_identity, tokenizer_mismatch)
from .shards import check_compatible, default_cache_dir, load_manifest, read_split, split_tokens, token_dtype
from .sources import prepare_embedded, prepare_files, prepare_hf
from .pipeline import TokenWindows, resolve_manifest, eval_batches, make_dataset, make_iterator, split_batch, to_global
from .recall import (RecallSource, RecallTask, is_recall_manifest,
                     recall_accuracy, recall_batches, recall_counts, recall_manifest)
from . import corpus

__all__ = [
    "Tokenizer", "ByteTokenizer", "TiktokenTokenizer", "HFTokenizer", "load_tokenizer", "tokenizer_identity", "tokenizer_mismatch",
    "prepare_embedded", "prepare_files", "prepare_hf", "load_manifest", "check_compatible",
    "default_cache_dir", "read_split", "split_tokens", "token_dtype",
    "TokenWindows", "resolve_manifest", "make_dataset", "make_iterator", "eval_batches", "split_batch", "to_global",
    "RecallTask", "RecallSource", "recall_manifest", "is_recall_manifest", "recall_counts", "recall_accuracy",
    "recall_batches",
    "corpus",
]
