#!/usr/bin/env python
"""Train a T6 (or baseline) model.

    python train.py                                   # tiny T6 on the embedded corpus (CPU-friendly)
    python train.py --config t6-small optim.lr=3e-4 run_dir=runs/x
    python train.py model=mha-tiny steps=200 mesh.tensor=2

Dotted ``key=value`` overrides apply to the config (values parsed as JSON, bare strings allowed).
A run directory that holds checkpoints is resumed from its latest one.
"""
from tpa_jax.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
