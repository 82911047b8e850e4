"""``python -m tpa_jax.compare``: runs :func:`tpa_jax.compare.cli.main`."""
import sys

from .cli import main

sys.exit(main())
