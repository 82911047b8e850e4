from .transformer import Block, Transformer, cross_entropy

__all__ = ["Block", "Transformer", "cross_entropy"]
