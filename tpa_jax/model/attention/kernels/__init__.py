"""Pallas kernels of the attention layer: FlashTPA decoding (compiled on an accelerator; run by the
Pallas interpreter with ``interpret=True`` on CPU, which is how the tests run it)."""
from .flashtpa_pallas import flashtpa_decode_pallas

__all__ = ["flashtpa_decode_pallas"]
