"""Pallas kernels for inference (run on CPU with ``interpret=True``; that is how tests run them)."""
from .flashtpa_pallas import flashtpa_decode_pallas

__all__ = ["flashtpa_decode_pallas"]
