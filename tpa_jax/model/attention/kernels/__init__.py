"""Pallas kernels of the attention layer: FlashTPA decoding (Mosaic on TPU; the Pallas
interpreter on CPU, which is how the tests run it; see ``flashtpa_pallas`` for other platforms)."""
from .flashtpa_pallas import flashtpa_decode_pallas

__all__ = ["flashtpa_decode_pallas"]
