"""Pallas kernels of the attention layer: FlashTPA decoding over a contiguous or a paged factor cache
(Mosaic on TPU; the Pallas interpreter on CPU, which is how the tests run them; see
``flashtpa_pallas`` for other platforms)."""
from .flashtpa_paged_pallas import flashtpa_decode_paged_pallas
from .flashtpa_pallas import flashtpa_decode_pallas

__all__ = ["flashtpa_decode_pallas", "flashtpa_decode_paged_pallas"]
