"""One accelerator benchmark: training throughput, decode against the memory limit, cached prefill.

    python bench/accelerator.py --out runs/accelerator      # one GPU or TPU: about 8 minutes
    python bench/accelerator.py --smoke                     # a tiny form on CPU (about 20 s)

Runs three parts, each the project's own benchmark in a child process (so that one part running
out of memory or time, or an attention implementation this backend lacks, is recorded and the
others still run); ``--smoke`` runs the same benchmarks with tiny models, contexts 2^6..2^7 and
one timed rep, in this process (one jax start, unoptimised CPU compiles; no per-part timeout):

  (a) ``train``: training tokens/s and MFU of t6-small and mha-small (bf16, batch 16 x 1024) with
      every ``attention_impl`` this backend has (``bench/train.py --attention-impl``);
  (b) ``decode``: per-token decode time against context 2^10 ... 2^19 for MHA, GQA, MLA and TPA
      (``decode_impl`` flash, and pallas for TPA), each point beside its memory-bound limit
      (bytes read per step / the chip's HBM bandwidth; ``bench/decode.py --bandwidth``);
  (c) ``prefill``: TPA's cached prefill per token, Alg. 1 against materialising K and V
      (``bench/decode.py --prefill-only``).

Prints one JSON object (and writes ``accelerator.json`` under ``--out``): the device, each part's
command, wall time, exit status and parsed result, plus a short summary.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

IMPLS_BY_BACKEND = {"gpu": ("xla", "blocked", "cudnn"), "tpu": ("xla", "blocked", "splash"),
                    "cpu": ("xla", "blocked")}


def part_commands(backend: str, smoke: bool, bandwidth) -> dict[str, list]:
    """{part name: [(label, argv)]}: what each part runs."""
    py = sys.executable
    train = [py, os.path.join(HERE, "train.py"), "--mechanisms", "t6"]
    train += ["--quick", "--reps", "1", "--warmup", "0"] if smoke else ["--size", "small", "--batch", "16",
                                                                      "--seq-len", "1024", "--dtype", "bfloat16"]
    decode = [py, os.path.join(HERE, "decode.py"), "--quiet", "--d-model", "1024", "--batch", "1"]
    if smoke:
        decode = [py, os.path.join(HERE, "decode.py"), "--quiet", "--d-model", "256", "--batch", "1", "--reps", "1",
                  "--warmup", "0", "--prefill-reps", "1", "--param-init", "fast"]
    impls = IMPLS_BY_BACKEND.get(backend, ("xla",))
    # smoke: every implementation in one train run (results keyed mechanism@impl)
    train_runs = ([(",".join(impls), train + ["--attention-impl", ",".join(impls)])] if smoke else
                  [(impl, train + ["--attention-impl", impl]) for impl in impls])
    span = ["--min-log2", "6", "--max-log2", "7"] if smoke else ["--min-log2", "10", "--max-log2", "19",
                                                                   "--memory-cap-gb", "16"]
    bw = ["--bandwidth", f"{bandwidth:g}"] if bandwidth else []
    no_prefill = ["--prefill-lengths"]  # an empty list: no prefill points in the decode parts
    prefill_lengths = ["64", "128"] if smoke else ["4096", "16384"]
    prefill_chunk = ["--prefill-chunk", "64" if smoke else "1024"]
    return {
        "train": train_runs,
        "decode": [("flash", decode + span + bw + no_prefill + ["--mechanism", "mha", "gqa", "mla", "tpa"]),
                   ("pallas", decode + span + bw + no_prefill + ["--mechanism", "tpa", "--decode-impl", "pallas"])],
        "prefill": [("alg1_vs_materialize", decode + ["--prefill-only", "--prefill-lengths", *prefill_lengths,
                                                      *prefill_chunk])],
    }


def run_one(argv: list, timeout: float) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": argv, "status": "timeout", "wall_s": round(time.perf_counter() - t0, 1)}
    rec = {"command": argv, "status": "ok" if p.returncode == 0 else f"exit {p.returncode}",
           "wall_s": round(time.perf_counter() - t0, 1)}
    try:
        rec["result"] = json.loads(p.stdout[p.stdout.index("{"):])
    except ValueError:
        rec["stderr_tail"] = p.stderr.strip().splitlines()[-5:]
    if p.returncode:
        rec.setdefault("stderr_tail", p.stderr.strip().splitlines()[-5:])
    return rec


_MODULES: dict = {}


def run_in_process(argv: list) -> dict:
    """``run_one`` without a child: ``main(argv[2:])`` of the bench script ``argv[1]`` in this process
    (its progress output is dropped; its return value is the result)."""
    t0 = time.perf_counter()
    path = argv[1]
    rec: dict = {"command": argv}
    try:
        if path not in _MODULES:
            spec = importlib.util.spec_from_file_location(f"_bench_{os.path.basename(path)[:-3]}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _MODULES[path] = module
        with contextlib.redirect_stdout(io.StringIO()):
            rec["result"] = _MODULES[path].main(argv[2:])
        rec["status"] = "ok"
    except SystemExit as e:
        rec["status"], rec["stderr_tail"] = f"exit {e.code}", [str(e.code)]
    except Exception as e:  # noqa: BLE001 - recorded; the other parts still run
        rec["status"], rec["stderr_tail"] = "error", [f"{type(e).__name__}: {e}"]
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    return rec


def summarise(parts: dict, bandwidth) -> dict:
    """Headline numbers: (a) train tokens/s and MFU per attention_impl and mechanism; (b) each decode
    point's time per token beside its limits -- ``limit_ms`` measured in the same run (one read of a
    buffer of the step's bytes) and, when the chip's HBM bandwidth is known, ``hbm_limit_ms`` (the
    step's bytes / bandwidth); (c) prefill time per token of Alg. 1 over materialising K and V."""
    out: dict = {"train": {}, "decode": [], "prefill": []}
    for label, rec in parts.get("train", {}).items():
        for name, r in rec.get("result", {}).get("results", {}).items():
            mechanism, _, impl = name.partition("@")  # keyed mechanism@impl when one run compares several
            out["train"].setdefault(impl or label, {})[mechanism] = {k: r.get(k) for k in ("tokens_per_s", "mfu")}
    for impl, rec in parts.get("decode", {}).items():
        for e in rec.get("result", {}).get("entries", []):
            point = {"mechanism": e["mechanism"], "decode_impl": impl, "context": e["context"], "batch": e["batch"],
                     "per_token_ms": 1e3 * e["per_token_s"], "limit_ms": 1e3 * e["limit_s"], "x_limit": e["x_limit"],
                     "hbm_limit_ms": 1e3 * e["limit_bytes"] / bandwidth if bandwidth else None}
            out["decode"].append(point)
    for rec in parts.get("prefill", {}).values():
        entries = rec.get("result", {}).get("prefill", {}).get("entries", [])
        by = {(e["prompt"], e["prefill_impl"]): e["per_token_s"] for e in entries}
        for prompt in sorted({p for p, _ in by}):
            if (prompt, "flash") in by and (prompt, "materialize") in by:
                out["prefill"].append({"prompt": prompt, "alg1_ms_per_token": 1e3 * by[prompt, "flash"],
                                       "materialize_ms_per_token": 1e3 * by[prompt, "materialize"],
                                       "alg1_over_materialize": by[prompt, "flash"] / by[prompt, "materialize"]})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for CPU (a test runs this)")
    ap.add_argument("--parts", default="train,decode,prefill", help="comma-separated subset of train,decode,prefill")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per child run (default 150; --smoke runs in this process, untimed)")
    ap.add_argument("--budget", type=float, default=450,
                    help="seconds for the whole benchmark: a child gets at most what is left (default 450)")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="HBM bytes/s for the decode points' memory-bound limits (default: the chip's from "
                         "tpa_jax.train.metrics.hbm_bandwidth; none known on CPU)")
    ap.add_argument("--out", default=None, help="directory for accelerator.json")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (every part's command) and exit")
    ap.add_argument("--backend", default=None, choices=sorted(IMPLS_BY_BACKEND),
                    help="plan for this backend instead of the present one (with --dry-run)")
    args = ap.parse_args(argv)
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    if args.bandwidth is not None and not args.bandwidth > 0:
        ap.error(f"--bandwidth: expected bytes/s > 0, got {args.bandwidth:g}")
    if args.smoke and not args.dry_run:
        from tpa_jax.eval.bench_timing import use_smoke_xla_flags

        use_smoke_xla_flags()  # before jax creates its backend: fast unoptimised CPU compiles
    import jax

    from tpa_jax.eval.bench_timing import environment
    from tpa_jax.train.metrics import hbm_bandwidth, peak_flops

    backend = args.backend or jax.default_backend()
    bandwidth = args.bandwidth or hbm_bandwidth()
    commands = part_commands(backend, args.smoke, bandwidth)
    unknown = sorted(set(wanted) - set(commands))
    if unknown:
        raise SystemExit(f"error: --parts: unknown {unknown}; expected some of {sorted(commands)}")
    if args.dry_run:
        plan = {"backend": backend, "smoke": args.smoke,
                "parts": {p: {label: [os.path.relpath(a, os.path.dirname(HERE)) if a.startswith(HERE) else a
                                      for a in cmd[1:]] for label, cmd in commands[p]} for p in wanted}}
        print(json.dumps(plan, indent=1))
        return plan
    timeout = args.timeout or 150
    t0 = time.perf_counter()
    parts = {}
    for part in wanted:
        parts[part] = {}
        for label, cmd in commands[part]:
            left = args.budget - (time.perf_counter() - t0)
            if left < 10:
                parts[part][label] = {"command": cmd, "status": "skipped: the --budget is spent"}
                continue
            print(f"[accelerator] {part}/{label} ...", file=sys.stderr, flush=True)
            parts[part][label] = run_in_process(cmd) if args.smoke else run_one(cmd, min(timeout, left))
    out = {"benchmark": "accelerator", "smoke": args.smoke, "environment": environment(),
           "peak_flops_per_device": peak_flops(), "hbm_bandwidth_bytes_per_s": bandwidth,
           "wall_s": round(time.perf_counter() - t0, 1), "summary": summarise(parts, bandwidth), "parts": parts}
    print(json.dumps(out, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "accelerator.json"), "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
