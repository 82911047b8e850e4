#!/usr/bin/env python
"""Evaluate TPA / T6 models and their baselines.

    python eval.py kv-report                                # KV cache of the paper's small family
    python eval.py kv-report --family medium --memory-gb 40 --batch 8 --out runs/eval
    python eval.py perplexity --checkpoint runs/t6-tiny
    python eval.py generate --checkpoint runs/t6-tiny --prompt "def "
    python eval.py decode-bench --max-log2 15

Bad input prints one ``error:`` line on stderr and exits with code 2.
"""
from tpa_jax.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
