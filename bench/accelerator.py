"""One accelerator benchmark: training throughput, decode against the memory limit, cached prefill.

    python bench/accelerator.py --out runs/accelerator      # one GPU or TPU: about 8 minutes
    python bench/accelerator.py --smoke                     # a tiny form on CPU (under a minute or so)

Runs three parts, each the project's own benchmark in a child process (so that one part running
out of memory or time, or an attention implementation this backend lacks, is recorded and the
others still run):

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
    train += ["--quick"] if smoke else ["--size", "small", "--batch", "16", "--seq-len", "1024", "--dtype", "bfloat16"]
    decode = [py, os.path.join(HERE, "decode.py"), "--quiet", "--d-model", "1024", "--batch", "1"]
    if smoke:
        decode = [py, os.path.join(HERE, "decode.py"), "--quiet", "--d-model", "256", "--batch", "1", "--reps", "2",
                  "--warmup", "1", "--param-init", "fast"]
    span = ["--min-log2", "6", "--max-log2", "7"] if smoke else ["--min-log2", "10", "--max-log2", "19",
                                                                   "--memory-cap-gb", "16"]
    bw = ["--bandwidth", f"{bandwidth:g}"] if bandwidth else []
    no_prefill = ["--prefill-lengths"]  # an empty list: no prefill points in the decode parts
    prefill_lengths = ["64", "128"] if smoke else ["4096", "16384"]
    prefill_chunk = ["--prefill-chunk", "64" if smoke else "1024"]
    return {
        "train": [(impl, train + ["--attention-impl", impl]) for impl in IMPLS_BY_BACKEND.get(backend, ("xla",))],
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


def summarise(parts: dict) -> dict:
    """Headline numbers: train tokens/s and MFU per impl and mechanism; decode multiples of the limit."""
    out: dict = {"train": {}, "decode_points": 0}
    for impl, rec in parts.get("train", {}).items():
        res = rec.get("result", {}).get("results", {})
        out["train"][impl] = {m: {k: r.get(k) for k in ("tokens_per_s", "mfu")} for m, r in res.items()}
    for rec in parts.get("decode", {}).values():
        out["decode_points"] += len(rec.get("result", {}).get("points", []))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, for CPU (a test runs this)")
    ap.add_argument("--parts", default="train,decode,prefill", help="comma-separated subset of train,decode,prefill")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per child run (default 150; 120 with --smoke)")
    ap.add_argument("--out", default=None, help="directory for accelerator.json")
    args = ap.parse_args(argv)
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    import jax

    from tpa_jax.eval.bench_timing import environment
    from tpa_jax.train.metrics import hbm_bandwidth, peak_flops

    backend = jax.default_backend()
    bandwidth = hbm_bandwidth()
    commands = part_commands(backend, args.smoke, bandwidth)
    unknown = sorted(set(wanted) - set(commands))
    if unknown:
        raise SystemExit(f"error: --parts: unknown {unknown}; expected some of {sorted(commands)}")
    timeout = args.timeout or (120 if args.smoke else 150)
    t0 = time.perf_counter()
    parts = {}
    for part in wanted:
        parts[part] = {}
        for label, cmd in commands[part]:
            print(f"[accelerator] {part}/{label} ...", file=sys.stderr, flush=True)
            parts[part][label] = run_one(cmd, timeout)
    out = {"benchmark": "accelerator", "smoke": args.smoke, "environment": environment(),
           "peak_flops_per_device": peak_flops(), "hbm_bandwidth_bytes_per_s": bandwidth,
           "wall_s": round(time.perf_counter() - t0, 1), "summary": summarise(parts), "parts": parts}
    print(json.dumps(out, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "accelerator.json"), "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
