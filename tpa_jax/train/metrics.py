"""Training metrics: the writer that appends one JSON record per line to a run's
``metrics.jsonl`` (scalars mirrored to TensorBoard), ``read_metrics`` to read them back, and the
dense bf16 peak FLOP/s per accelerator chip that model-FLOPs utilisation (MFU) is measured against."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax

# dense bf16 peak per chip, matched as substrings of the lower-cased ``device_kind`` in this order
# (v5p chips report "TPU v5", v5e chips "TPU v5 lite")
PEAK_FLOPS = [
    ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("tpu v5", 459e12), ("v4", 275e12),
    ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
]


def peak_flops(device: Any = None) -> Optional[float]:
    """Peak FLOP/s of ``device`` (default: the first device); None on CPU and unknown chips."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind.lower()
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    return None


PERF_KEYS = ("step_time", "tokens_per_s", "mfu", "compile_s")


def tensorboard_tag(key: str) -> str:
    """The grouped TensorBoard tag of a ``metrics.jsonl`` key: ``val_loss`` -> ``val/loss``,
    ``tokens_per_s`` -> ``perf/tokens_per_s``, ``loss`` -> ``train/loss``."""
    if key.startswith("val_"):
        return "val/" + key[len("val_"):]
    return ("perf/" if key in PERF_KEYS else "train/") + key


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl``; scalars also to TensorBoard, under
    grouped tags (``tensorboard_tag``: ``train/``, ``val/``, ``perf/``)."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.f = open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(tensorboard_tag(k), v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def read_metrics(run_dir: str) -> list[dict]:
    """The records of ``run_dir``'s ``metrics.jsonl``, in the order they were written."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
