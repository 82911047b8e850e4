"""Checkpoint interop: ``torch_t6.convert`` loads the official PyTorch TPA/T6 code's state dicts."""
from . import torch_t6

__all__ = ["torch_t6"]
