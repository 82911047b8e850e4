"""``python -m tpa_jax.compare``: the command line of the parameter-matched comparison.

Examples::

    python -m tpa_jax.compare --size tiny --steps 600
    python -m tpa_jax.compare --size tiny --steps 300 --task recall --mechanisms t6 mha
    python -m tpa_jax.compare --size mini --steps 2000 --data-path data/manifest.json model.compute_dtype=float32

Trailing ``key=value`` arguments override TrainConfig fields (JSON values): ``optim.warmup_steps=10``,
``eval_batches=4``; ``model.<field>=...`` goes to every member's ModelConfig.  Bad input ends with
one ``error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from .members import MECHANISM_ORDER, SIZES, CompareError, one_line
from .runner import run_comparison

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line."""

    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m tpa_jax.compare",
                description="Train the parameter-matched family of one size with identical data and schedule; "
                            "write a table (compare.md / compare.json) and loss curves (loss_curves.png).")
    p.add_argument("--size", default="tiny", help=f"one of {list(SIZES)} (default tiny)")
    p.add_argument("--steps", type=int, required=True, help="training steps per member")
    p.add_argument("--batch", type=int, default=None, help="global batch in sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128 tiny/mini, 1024)")
    p.add_argument("--task", default="corpus", help="corpus (embedded or --data-path) or recall")
    p.add_argument("--mechanisms", nargs="+", default=None, metavar="M",
                   help=f"subset of {list(MECHANISM_ORDER)} (default: all)")
    p.add_argument("--data-path", default=None, help="token manifest (file or directory) for --task corpus")
    p.add_argument("--recall-pairs", type=int, default=None, help="key-value pairs per recall sequence")
    p.add_argument("--recall-queries", type=int, default=None, help="queries per recall sequence")
    p.add_argument("--out", default=None, help="output directory (default runs/compare-<size>-<task>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3 tiny/mini, 6e-4)")
    p.add_argument("--eval-every", type=int, default=None, help="validation interval in steps (default steps/10)")
    p.add_argument("--devices", type=int, default=None, help="train on the first N local devices (default: all)")
    p.add_argument("--force", action="store_true", help="clear OUT's comparison files first")
    p.add_argument("--progress", action="store_true", help="progress bars while training")
    p.add_argument("overrides", nargs="*", help="TrainConfig overrides key=value, e.g. optim.warmup_steps=10 "
                                                "eval_batches=4 model.compute_dtype=float32")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    mechanisms = args.mechanisms
    overrides = list(args.overrides)
    if mechanisms is not None:  # key=value items swallowed by --mechanisms' nargs
        overrides = [m for m in mechanisms if "=" in m] + overrides
        mechanisms = [m for m in mechanisms if "=" not in m]
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    command = "python -m tpa_jax.compare " + shlex.join(argv)
    from ..train import NonFiniteLossError

    try:
        devices = None
        if args.devices is not None:
            import jax

            if not 1 <= args.devices <= jax.local_device_count():
                raise CompareError(f"--devices must be in [1, {jax.local_device_count()}], got {args.devices}")
            devices = jax.local_devices()[:args.devices]
        report = run_comparison(args.size, args.steps, out=args.out, mechanisms=mechanisms, task=args.task,
                                batch=args.batch, seq_len=args.seq_len, data_path=args.data_path, seed=args.seed,
                                lr=args.lr, eval_every=args.eval_every, recall_pairs=args.recall_pairs,
                                recall_queries=args.recall_queries, overrides=overrides, force=args.force,
                                devices=devices, progress=args.progress, command=command)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if report["interrupted"]:
        print(f"interrupted during {report['interrupted']}; run the same command again to resume", flush=True)
    return 0
