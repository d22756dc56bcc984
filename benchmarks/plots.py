"""PNG plots of a benchmark sweep (matplotlib, Agg backend): validation curves per task, task
weights over training, and the imbalance page of one method beside equal weighting
(:class:`mtl_optim.diagnostics.ImbalanceReport`)."""

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


def _imbalance(runs: Sequence[RunResult], path: Path, method: str) -> Path | None:
    reports = {r.method: r.report for r in runs if r.report is not None}
    if method not in reports:
        return None
    baseline = reports.get("equal") if method != "equal" else None
    return reports[method].save(path, baseline=baseline)


def save_plots(
    data: MTLData, runs: Sequence[RunResult], folder: Path, stem: str, report: str = "adatask"
) -> list[Path]:
    """Write ``<stem>-curves.png``, ``<stem>-weights.png`` and ``<stem>-imbalance.png`` under
    ``folder``: the weights when some run has them, the imbalance page when the ``report``
    method's run recorded one (beside equal weighting's, when that was recorded too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _curves(data, runs, folder / f"{stem}-curves.png"),
        _weights(data, runs, folder / f"{stem}-weights.png"),
        _imbalance(runs, folder / f"{stem}-imbalance.png", report),
    ]
    plt.close("all")
    return [p for p in written if p is not None]
