"""The training command line (``train.py`` and the ``tpa-train`` console script): reads a JSON
training config plus dotted overrides, initialises multi-process JAX when launched with a
coordinator, trains, and prints a summary.  Bad input ends with one ``error: ...`` line on stderr
and exit code 2, an unexpected error one ``error: <type>: <message>`` line and exit code 1 (its
traceback only with ``TPA_JAX_DEBUG=1``); a run stopped by a signal exits 0 after saving (rerun the
command to resume)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence



def _maybe_init_distributed() -> None:
    """Multi-host: initialise when launched with the usual coordinator/process environment."""
    import jax

    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"):
        # CPU processes need a collectives backend; it does not affect GPU / TPU devices
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS"),
            num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
            process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None,
        )
    elif env.get("TPU_WORKER_HOSTNAMES") and "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # multi-host TPU VM: everything is discovered


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code.  An unexpected exception is one ``error: <type>:
    <message>`` line and exit code 1; ``TPA_JAX_DEBUG=1`` re-raises it (with its traceback)."""
    try:
        return _main(argv)
    except Exception as e:
        if os.environ.get("TPA_JAX_DEBUG") == "1":
            raise
        lines = str(e).strip().splitlines()
        print(f"error: {type(e).__name__}: {lines[0] if lines else ''}", file=sys.stderr)
        return 1


def settings_help() -> str:
    """Every config field with its type and default, grouped (model, data, optim, mesh, top level),
    generated from the dataclasses."""
    import dataclasses

    from ..config import TrainConfig

    top = TrainConfig()
    lines = ["settings (dotted key=value overrides; model=NAME applies a named model first, whatever its",
             "position; the defaults shown are the default config's, which equal the dataclasses'):"]
    groups = [(f.name + ".", getattr(top, f.name)) for f in dataclasses.fields(top)
              if dataclasses.is_dataclass(getattr(top, f.name))] + [("", top)]
    for prefix, obj in groups:
        lines.append(f"  {prefix[:-1] or 'top level'}:")
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not dataclasses.is_dataclass(value):
                lines.append(f"    {prefix}{f.name}: {f.type} = {value!r}")
    return "\n".join(lines)


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..configs import DEFAULT_TRAIN_CONFIG, load_train_config, train_config_names

    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else ""
    parser = argparse.ArgumentParser(prog=script if script == "train.py" else "tpa-train",
                                     description="Train a T6 / TPA model (or a baseline).",
                                     epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved config as JSON and exit (touches no device or disk)")
    parser.add_argument("--config", default=None,
                        help=f"a packaged config ({', '.join(train_config_names())}) or a JSON file; "
                             f"default: {DEFAULT_TRAIN_CONFIG}, whose values the settings below show")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 model=mha-tiny")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    try:
        tcfg = load_train_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import json

        print(json.dumps(tcfg.to_dict(), indent=1))
        return 0
    _maybe_init_distributed()
    from ..accounting import model_params
    from .checkpoint import CheckpointError
    from .guard import RunLockedError
    from .loop import NonFiniteLossError, train
    from .run_data import resolve_data

    try:
        tcfg, _ = resolve_data(tcfg)  # the vocabulary, when unset, comes from the data's tokenizer
        cfg = tcfg.model
        print(f"model: {cfg.attention} L={cfg.n_layer} d={cfg.d_model} h={cfg.n_head} vocab={cfg.vocab_size} "
              f"params={model_params(cfg):,}; run_dir={tcfg.run_dir}", flush=True)
        summary = train(tcfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, NonFiniteLossError, CheckpointError, RunLockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["interrupted"]:
        print(f"stopped at step {summary['step']}; checkpoint saved in {summary['checkpoint_dir']} "
              f"(run the same command to resume)")
        return 0
    import jax

    if jax.process_count() > 1:
        print(f"process {jax.process_index()}/{jax.process_count()}: ", end="")
    print(f"done: step {summary['step']}  val_loss {summary['val_loss']:.4f}  val_ppl {summary['val_ppl']:.2f}")
    print(f"checkpoints: {summary['checkpoint_dir']}")
    if "sample" in summary:
        print("sample (greedy):\n" + summary["sample"])
    return 0
