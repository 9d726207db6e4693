"""matplotlib for the report writers, or None with one notice where it is not installed; and the one
figure style the bench plots share.

`forerun bench`, `bench-serve` and `scale` write their tables and JSON without it; the plots need the
`plots` extra (`pip install -e '.[plots]'`, included in `bench`, `serve`, `scale` and `dev`).

A figure is sized for a screen or a page: at most MAX_INCHES at DPI (1600 x 900 pixels), whatever the
number of categories or contenders, with its legend outside the axes so that it never covers data.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

DPI = 100
MAX_INCHES = (16.0, 9.0)  # 1600 x 900 pixels at DPI
MIN_WIDTH_INCHES = 8.0  # room for a one-line title over a plot of few bars


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


def figure(plt, width: float, height: float, ncols: int = 1):
    """(fig, ax or axes) of width x height inches, the width at least MIN_WIDTH_INCHES and both at most
    MAX_INCHES, with constrained layout so that a legend placed outside the axes (legend_outside) gets
    its own room."""
    size = (min(max(width, MIN_WIDTH_INCHES), MAX_INCHES[0]), min(height, MAX_INCHES[1]))
    return plt.subplots(1, ncols, figsize=size, layout="constrained")


def legend_outside(fig, ax) -> None:
    """The axes' legend below the axes and their x label, in up to four columns, outside the data (to
    the right it would collide with a title wider than the axes)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 4), fontsize="small")


def plain_log_ticks(plt, ax) -> None:
    """The y tick labels of a log axis as plain numbers (30, 60, 200) rather than 3 x 10^1; the ticks
    between powers of ten are labelled only where the axis spans less than a factor of ten."""
    plain = plt.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if high < 10 * low else plt.NullFormatter())


def colors(plt, n: int) -> list:
    """n distinct colors: matplotlib's ten, or its twenty where there are more series than ten (the
    default cycle repeats after ten, giving two contenders one color)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def save(plt, fig, path: Path) -> Path:
    """Write the figure at DPI and free it."""
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
