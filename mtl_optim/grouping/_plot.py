"""A heatmap of an inter-task affinity matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import Tensor

from ._select import _as_matrix

__all__ = ["plot_affinity"]

_ANNOTATE_MAX_TASKS = 12  # beyond this the cell values are unreadable


def plot_affinity(
    affinity: Tensor | np.ndarray | Sequence[Sequence[float]],
    names: Sequence[str] | None = None,
    ax: Any = None,
) -> Any:
    """Heatmap of ``affinity`` (row ``a``: the loss of task ``a``; column ``b``: the step on
    task ``b``) on a colour scale symmetric about 0; returns the matplotlib figure.

    Args:
        affinity: a K×K matrix, e.g. :meth:`TaskAffinity.affinity`.
        names: K task names for the axes (default ``task 0`` … ``task K-1``).
        ax: a matplotlib ``Axes`` to draw on (default: a new figure).
    """
    import matplotlib.pyplot as plt  # optional dependency, imported on use

    a = _as_matrix(affinity)
    k = a.shape[0]
    labels = list(names) if names is not None else [f"task {i}" for i in range(k)]
    if len(labels) != k:
        raise ValueError(f"got {len(labels)} names for {k} tasks")
    if ax is None:
        fig, ax = plt.subplots(figsize=(2.0 + 0.6 * k, 1.5 + 0.6 * k))
    else:
        fig = ax.figure
    bound = float(np.abs(a).max()) or 1.0
    image = ax.imshow(a, cmap="RdBu", vmin=-bound, vmax=bound)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("step on task")
    ax.set_ylabel("loss of task")
    ax.set_title("inter-task affinity")
    if k <= _ANNOTATE_MAX_TASKS:
        for (row, col), value in np.ndenumerate(a):
            ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig
