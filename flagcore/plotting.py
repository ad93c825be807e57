"""The book's common figure style. The only flagcore module that touches matplotlib.

Notebooks call :func:`use_book_style` once; it sets matplotlib rcParams (a plotting setting, not a
torch one) so every figure in the book shares fonts, sizes and colours.
"""

from __future__ import annotations

import matplotlib as mpl
import matplotlib.pyplot as plt

__all__ = ["LEVEL_COLORS", "MIN_FONT_PT", "PALETTE", "finish", "use_book_style"]

#: The smallest text the book style draws (legend, tick labels). The book's page check requires it to be
#: at least 9 pt as displayed, so a figure must not be wider than the text column can show at full size
#: (about 6.9 in at a 1280-px window; figures are 6.5 in wide); notebooks never set a smaller ``fontsize``.
MIN_FONT_PT = 9.0

#: Colour-blind-safe palette (Okabe & Ito 2008), used in this order.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]

#: One colour per alignment level 0..3 (Definition 3.1), shared by every figure that shows levels.
LEVEL_COLORS = {0: "#999999", 1: "#56B4E9", 2: "#0072B2", 3: "#D55E00"}


def use_book_style() -> None:
    """Apply the book's figure style (sizes for a page column, high-dpi PNGs, the palette)."""
    mpl.rcParams.update(
        {
            "figure.figsize": (6.5, 3.4),
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "figure.constrained_layout.use": True,
            "axes.prop_cycle": mpl.cycler(color=PALETTE),
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "legend.frameon": False,
            "font.size": 10,
            "image.cmap": "viridis",
        }
    )


def finish(fig: plt.Figure, title: str | None = None) -> plt.Figure:
    """Give a figure its suptitle and return it, so a notebook cell ends by displaying it."""
    if title:
        fig.suptitle(title, fontsize=12)
    return fig
