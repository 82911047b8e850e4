"""The model layer: shared layers, RoPE, the attention mechanisms (with the FlashTPA math and its
Pallas kernel), the Section 4 equivalence, and the T6 transformer with the one entry point every
consumer uses (``model_of``, ``logits_fn``, ``loss_fn``, ``init_params``, ``abstract_params``)."""
from .transformer import (Block, Transformer, abstract_params, cross_entropy, init_params, logits_fn, loss_fn,
                          model_of)

__all__ = ["Block", "Transformer", "cross_entropy", "logits_fn", "loss_fn", "init_params", "abstract_params",
           "model_of"]
