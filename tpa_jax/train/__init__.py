from .checkpoint import CheckpointError
from .loop import NonFiniteLossError, train
from .optimizer import lr_schedule, make_optimizer

__all__ = ["CheckpointError", "NonFiniteLossError", "train", "lr_schedule", "make_optimizer"]
