"""The model layer: layers, RoPE, the attention mechanisms (incl. FlashTPA math and Pallas
kernels) and the T6 transformer with its entry point (``logits_fn``, ``loss_fn``, ``init_params``)."""
from .transformer import (Block, Transformer, abstract_params, cross_entropy, init_params, logits_fn, loss_fn,
                          model_of)

__all__ = ["Block", "Transformer", "cross_entropy", "logits_fn", "loss_fn", "init_params", "abstract_params",
           "model_of"]
