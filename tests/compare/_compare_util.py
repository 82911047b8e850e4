"""Shared settings of the comparison tests: two tiny members, 4 steps of 4 x 32 tokens, one device."""
import jax

from tpa_jax.compare import cli

MEMBERS = ["t6", "mha"]
TINY_OVERRIDES = ["eval_batches=1", "save_every=100", "model.compute_dtype=float32"]


def tiny_kwargs(corpus, **kw):
    """run_comparison keywords of the reference run, updated with ``kw``."""
    args = dict(size="tiny", steps=4, batch=4, seq_len=32, eval_every=2, data_path=str(corpus), mechanisms=MEMBERS,
                overrides=list(TINY_OVERRIDES), devices=jax.devices()[:1], log=None)
    args.update(kw)
    return args


def tiny_argv(corpus, out, *extra):
    """The command line of the reference run into ``out``, with ``extra`` options."""
    return ["--size", "tiny", "--steps", "4", "--batch", "4", "--seq-len", "32", "--eval-every", "2",
            "--data-path", str(corpus), "--out", str(out), "--devices", "1", *extra, *TINY_OVERRIDES]


def rows_by_member(report):
    return {r["member"]: r for r in report["rows"]}


def run_main(argv):
    """The CLI's exit status, also when argparse exits."""
    try:
        return cli.main(argv)
    except SystemExit as e:
        return e.code
