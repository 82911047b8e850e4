"""Puts this folder on sys.path so every test under tests/model/ can import ``model_reference``."""
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
