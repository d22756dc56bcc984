"""PNG plots of a benchmark sweep (matplotlib, Agg backend): validation curves per task, task
weights over training, and AdaTask's task-dominance heatmap."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from .data import MTLData
from .methods import METHODS
from .train import RunResult

__all__ = ["save_plots"]


def _grid(n: int, size: tuple[float, float]):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax in axes.flat[:n]:
        ax.xaxis.get_major_locator().set_params(integer=True)  # epochs
    return fig, list(axes.flat[:n])


def _curves(data: MTLData, runs: Sequence[RunResult], path: Path) -> Path:
    fig, axes = _grid(len(data.tasks), (4.2, 3.2))
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        epochs = range(1, len(mine[0].val_curves) + 1)
        for k, ax in enumerate(axes):
            per_epoch = [[r.val_curves[e][k] for r in mine] for e in range(len(epochs))]
            ax.plot(epochs, [statistics.fmean(v) for v in per_epoch], label=METHODS[method].label)
    for task, ax in zip(data.tasks, axes):
        ax.set_title(f"{task.name}: validation {task.metric}")
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{data.name}: validation metrics (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _weights(data: MTLData, runs: Sequence[RunResult], path: Path) -> Path | None:
    first = {}
    for r in runs:
        if r.weights and r.method not in first:
            first[r.method] = r
    if not first:
        return None
    fig, axes = _grid(len(first), (3.6, 2.8))
    for ax, (method, r) in zip(axes, first.items()):
        epochs = range(1, len(r.weights) + 1)
        for k, task in enumerate(data.tasks):
            ax.plot(epochs, [w[k] for w in r.weights], label=task.name)
        ax.set_title(f"{METHODS[method].label} (seed {r.seed})")
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{data.name}: task weights (epoch mean of opt.last_weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _dominance(data: MTLData, runs: Sequence[RunResult], path: Path) -> Path | None:
    tracked = [r for r in runs if r.dominance is not None and r.dominance.au is not None]
    if not tracked:
        return None
    r = tracked[0]
    fig = r.dominance.plot(task_names=[t.name for t in data.tasks])
    fig.axes[0].set_title(f"{METHODS[r.method].label}, seed {r.seed}: task dominance (mean rAU)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def save_plots(data: MTLData, runs: Sequence[RunResult], folder: Path, stem: str) -> list[Path]:
    """Write ``<stem>-curves.png``, ``<stem>-weights.png`` and ``<stem>-dominance.png``
    (the last two when some run has weights / a dominance tracker) under ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _curves(data, runs, folder / f"{stem}-curves.png"),
        _weights(data, runs, folder / f"{stem}-weights.png"),
        _dominance(data, runs, folder / f"{stem}-dominance.png"),
    ]
    plt.close("all")
    return [p for p in written if p is not None]
