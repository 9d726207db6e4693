"""matplotlib for the report writers, or None with one notice where it is not installed.

`forerun bench`, `bench-serve` and `scale` write their tables and JSON without it; the plots need the
`plots` extra (`pip install -e '.[plots]'`, included in `bench`, `serve`, `scale` and `dev`).
"""
from __future__ import annotations

import functools
import sys


@functools.cache
def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (said once on stderr)."""
    try:
        import matplotlib
    except ImportError:
        print("forerun: matplotlib is not installed, so no plots are written "
              "(pip install 'forerun[plots]' adds it)", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
