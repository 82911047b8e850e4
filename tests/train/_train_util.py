"""Shared pieces of the training tests: a small corpus of project sources, a fast training config
on it, and readers for what a run leaves behind."""
import os

import jax
import numpy as np

from tpa_jax import configs
from tpa_jax.config import DataConfig, OptimConfig, TrainConfig
from tpa_jax.data import prepare_files
from tpa_jax.train.metrics import read_metrics

from _util import ROOT

STEPS = 16  # the shared reference run ("straight"): 16 steps, checkpoints at 8 and 16
LR, MIN_LR, WARMUP = 3e-3, 3e-4, 2  # its schedule
BATCH, SEQ = 8, 32  # its global batch and sequence length


def make_corpus(directory):
    """Real Python source from this project as byte-token shards (20% held out); the manifest path."""
    src = directory / "src"
    src.mkdir()
    for dp, _, fs in os.walk(os.path.join(ROOT, "tpa_jax")):
        for f in fs:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dp, f), ROOT).replace(os.sep, "_")
                (src / (rel + ".txt")).write_text(open(os.path.join(dp, f)).read())
    return prepare_files(sorted(str(p) for p in src.iterdir()), directory / "shards", "byte", val_fraction=0.2)


def make_cfg(run_dir, manifest, **kw) -> TrainConfig:
    """t6-tiny (float32) on the corpus: 8 steps of 8 x 32 tokens, metrics every step, no sample."""
    model = kw.pop("model", configs.get("t6-tiny", compute_dtype="float32", max_seq_len=64))
    fields = dict(model=model, data=DataConfig(source="manifest", path=str(manifest), seq_len=SEQ),
                  optim=OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP), run_dir=str(run_dir), steps=8,
                  batch_size=BATCH, log_every=1, eval_every=1000, eval_batches=2, save_every=4, sample_tokens=0)
    fields.update(kw)
    return TrainConfig(**fields)


def losses(run_dir) -> dict:
    """{step: training loss} from the run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def params_of(summary):
    """The summary's final params as host NumPy arrays."""
    return jax.tree_util.tree_map(np.asarray, summary["state"]["params"])
