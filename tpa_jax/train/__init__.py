"""Training: the AdamW optimizer and its schedule, the jit train / eval steps, the loop (mesh,
sharded state, Grain data, evaluation, resume, signals, NaN policy), Orbax checkpoints and the
metrics writers.  ``train(TrainConfig)`` runs (or resumes) one run; ``train.py`` is its command line."""
from .checkpoint import CheckpointError
from .guard import RunLockedError
from .loop import NonFiniteLossError, train
from .optimizer import lr_schedule, make_optimizer

__all__ = ["CheckpointError", "NonFiniteLossError", "RunLockedError", "train", "lr_schedule", "make_optimizer"]
