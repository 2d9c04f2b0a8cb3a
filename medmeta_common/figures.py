"""The finishing touches every medmeta plot shares, and its PNG bytes."""

from __future__ import annotations

import io
from typing import Any


def finished_png(fig: Any, ax: Any) -> bytes:
    """Grid, legend and tight layout on ``ax``; the figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
