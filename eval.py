#!/usr/bin/env python
"""Evaluate TPA / T6 models and their baselines.

    python eval.py kv-report                                # KV cache of the paper's small family
    python eval.py kv-report --family medium --memory-gb 40 --batch 8 --out runs/eval

Bad input prints one ``error:`` line on stderr and exits with code 2.
"""
from tpa_jax.eval.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
