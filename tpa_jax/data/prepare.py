"""Prepare token shards: ``python -m tpa_jax.data.prepare --source embedded|files|fineweb-edu|openwebtext --out DIR``.

Examples::

    python -m tpa_jax.data.prepare --source embedded                     # byte-level stdlib corpus, default cache dir
    python -m tpa_jax.data.prepare --source files --files a.txt b.jsonl --out data/mine --tokenizer gpt2
    python -m tpa_jax.data.prepare --source fineweb-edu --name sample-10BT --out data/fwe --max-tokens 1000000000

Prints the manifest path and the token counts per split as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import shards, sources


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpa_jax.data.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, choices=["embedded", "files", "fineweb-edu", "openwebtext", "hf"])
    p.add_argument("--out", default=None, help="output directory (embedded: default cache dir)")
    p.add_argument("--tokenizer", default=None,
                   help="byte | gpt2 | tiktoken:<enc> | hf:<tokenizer.json> (default: byte for embedded/files, gpt2 for HF)")
    p.add_argument("--files", nargs="+", default=None, help="--source files: .txt / .jsonl files or directories")
    p.add_argument("--text-field", default="text", help="JSONL / HF field holding the text")
    p.add_argument("--dataset", default=None, help="--source hf: hub path of the dataset")
    p.add_argument("--name", default=None, help="HF config name (fineweb-edu: sample-10BT, sample-100BT, ...)")
    p.add_argument("--split", default="train", help="HF split to stream")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on train + val tokens")
    p.add_argument("--val-fraction", type=float, default=None)
    p.add_argument("--shard-tokens", type=int, default=shards.DEFAULT_SHARD_TOKENS)
    p.add_argument("--overwrite", action="store_true", help="replace a preparation from another source")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    try:
        if a.source == "embedded":
            kw = {} if a.val_fraction is None else {"val_fraction": a.val_fraction}
            path = sources.prepare_embedded(a.out, a.tokenizer or "byte", shard_tokens=a.shard_tokens, **kw)
        elif a.source == "files":
            if not a.files or not a.out:
                p.error("--source files needs --files and --out")
            path = sources.prepare_files(a.files, a.out, a.tokenizer or "byte",
                                         0.01 if a.val_fraction is None else a.val_fraction,
                                         text_field=a.text_field, shard_tokens=a.shard_tokens,
                                         max_tokens=a.max_tokens, overwrite=a.overwrite)
        else:
            dataset = a.dataset if a.source == "hf" else a.source
            if not dataset or not a.out:
                p.error(f"--source {a.source} needs --out" + (" and --dataset" if a.source == "hf" else ""))
            kw = {} if a.val_fraction is None else {"val_fraction": a.val_fraction}
            path = sources.prepare_hf(dataset, a.out, name=a.name, split=a.split, tokenizer=a.tokenizer or "gpt2",
                                      max_tokens=a.max_tokens, text_field=a.text_field,
                                      shard_tokens=a.shard_tokens, overwrite=a.overwrite, **kw)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    m = shards.load_manifest(path)
    print(json.dumps({"manifest": path, "tokenizer": m["tokenizer"]["name"], "dtype": m["dtype"],
                      "tokens": {s: sp["tokens"] for s, sp in m["splits"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
