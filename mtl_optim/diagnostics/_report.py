r"""ImbalanceReport: how balanced the tasks are during training, recorded per step, on one page.

After every optimizer step the report keeps, from what the optimizer's gradient hook already
holds (no backward pass of its own):

* the task losses :math:`L_i(t)` and their ratios to the start,
  :math:`r_i(t) = L_i(t) / L_i(t_0)` with :math:`t_0` the first recorded step;
* the task weights the update applied (``opt.last_weights``; NaN where the method sets none);
* the Gramian :math:`G = J J^\top` (``K×K``, float64) of the per-task gradients of the shared
  parameters, from which follow the gradient norms :math:`\lVert g_i\rVert = \sqrt{G_{ii}}`,
  the cosines :math:`c_{ij} = G_{ij} / (\lVert g_i\rVert \lVert g_j\rVert)` and the *conflict*,
  the fraction of task pairs :math:`i < j` with :math:`c_{ij} < 0`.

That is :math:`K^2 + 2K` numbers per step, whatever the model's size. Where
:class:`~mtl_optim.diagnostics.TaskDominance` applies (AdaTask; Adam with equal weighting or
``Sum``) it also accumulates the AU dominance of every shared coordinate (a fixed ``(K, d)``
array, not per step), summarised per layer.

:meth:`ImbalanceReport.save` renders one page: loss ratios per task, weights over time, gradient
norm ratios, conflict, and the dominance heatmap, each beside a ``baseline`` report (e.g. equal
weighting) when one is given.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from ._report_records import DOMINATED, ReportRecords

__all__ = ["ImbalanceReport"]


def _matplotlib() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "ImbalanceReport renders with matplotlib, which is not installed: "
            "pip install matplotlib"
        ) from e
    return Figure


def _log_axis(ax: Any) -> None:
    """Log scale with plain tick labels (0.5, 2) instead of 5×10⁻¹."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
    ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _smooth(values: Tensor, window: int) -> tuple[Any, Any]:
    """Moving average of each column of ``values`` (T, n) over ``window`` steps, NaNs left out;
    returns the window centres (1-based steps) and the averages (NaN where a window has none)."""
    import numpy as np

    v = values.numpy()
    t = v.shape[0]
    window = max(1, min(window, t))
    ok = ~np.isnan(v)
    sums = np.concatenate([np.zeros((1, v.shape[1])), np.cumsum(np.where(ok, v, 0.0), 0)])
    counts = np.concatenate([np.zeros((1, v.shape[1])), np.cumsum(ok, 0)])
    total = sums[window:] - sums[:-window]
    n = counts[window:] - counts[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    centres = np.arange(window, t + 1) - (window - 1) / 2
    return centres, mean


class ImbalanceReport(ReportRecords):
    r"""Record task imbalance after every step of ``optimizer`` and render it on one page.

    Two lines in any training loop::

        report = ImbalanceReport(opt)       # attaches to the optimizer
        ...                                 # train as usual
        report.save("imbalance.png")        # or .html (the page embedded), .pdf, .svg

    The report registers a gradient hook that needs the per-task gradients ``J``: for a method
    that otherwise skips them (equal weighting, a loss weighting) ``backward`` then takes K
    reverse passes instead of one. What it reads are the gradients of the objectives the method
    differentiates: with a loss weighting, row ``i`` is :math:`\nabla (w_i L_i)`. Numbers are
    taken once per ``step`` from the last ``backward`` before it (with gradient accumulation:
    ``J`` of the whole window, the losses of its last micro-batch). A ``backward`` skipped for
    a non-finite value records nothing; if an earlier micro-batch of the same window was
    finite, the skipped step is recorded with that micro-batch's numbers. Without ``J``
    (``features=``) the gradient columns are NaN; the Gramian route supplies ``G`` directly.
    Tracking dominance keeps a ``(K, d)`` array (two for Adam) and, with AdaTask, makes it take
    its unfused update path, which materialises the per-task steps.

    Args:
        optimizer: an :class:`~mtl_optim.MTLOptimizer` (or ``AdaTask``).
        names: ``(name, param)`` pairs, e.g. ``model.named_parameters()``, to label layers in
            the dominance heatmap.
        task_names: the K task names for legends (default ``task 0``, ...).
        label: the run's name on the page (default: the method, e.g. ``AdaTask (Adam)``).
        dominance: ``None`` tracks :class:`TaskDominance` where it applies, ``True`` requires
            it (``TypeError`` where it cannot), ``False`` never (saves its ``(K, d)`` arrays).
    """

    # --- the page ------------------------------------------------------------------------
    def figure(self, baseline: ImbalanceReport | None = None) -> Any:
        """The page as a matplotlib ``Figure`` (no pyplot, no display: it renders with Agg).

        Panels: loss ratios per task, task weights, gradient norm ratios, conflict, and the
        dominance heatmap; with ``baseline`` (e.g. the equal-weighting run) its curves are drawn
        dashed beside this run's and its heatmap stands to the left of this run's.
        """
        Figure = _matplotlib()
        if self._n == 0:
            raise RuntimeError("nothing recorded yet: the report fills at every opt.step()")
        if baseline is not None and (baseline._k or 0) != self._k:
            raise ValueError(f"baseline has {baseline._k} tasks, this report {self._k}")
        # fixed positions (figure fractions): a layout engine costs more than the drawing
        fig = Figure(figsize=(14.0, 7.6))
        top, bottom, height = 0.55, 0.07, 0.33
        ax_loss, ax_weights, ax_norms, ax_conflict = (
            fig.add_axes((left, y, 0.26, height))
            for left, y in ((0.05, top), (0.38, top), (0.71, top), (0.05, bottom))
        )
        runs = [self] if baseline is None else [baseline, self]
        heat_axes = [fig.add_axes((0.42 + 0.31 * i, 0.12, 0.18, 0.25)) for i in range(len(runs))]
        if baseline is None:
            self._text(fig.add_axes((0.74, bottom, 0.23, 0.3)))
        names = self._task_names()
        colors = [f"C{i}" for i in range(len(names))]
        window = max(1, self._n // 40)
        styles = [(self, "-", 1.6)] + ([(baseline, "--", 1.1)] if baseline is not None else [])

        def lines(ax: Any, values_of: Any, log: bool) -> None:
            for run, style, width in styles:
                x, y = _smooth(values_of(run), window)
                for i, color in enumerate(colors):
                    ax.plot(x, y[:, i], style, color=color, lw=width)
            if log:
                _log_axis(ax)
            ax.set_xlabel("step")

        lines(ax_loss, lambda r: r.loss_ratios, log=True)
        ax_loss.set_title("loss ratio Lᵢ(t) / Lᵢ(0)")
        lines(ax_norms, lambda r: r.grad_norms / r.grad_norms.nanmean(1, keepdim=True), log=True)
        ax_norms.axhline(1.0, color="0.6", lw=0.8)
        ax_norms.set_title("gradient norm ratio ‖gᵢ‖ / meanⱼ ‖gⱼ‖")
        weights = self.weights
        if weights.isnan().all():
            ax_weights.set_axis_off()
            self._text(ax_weights, "no task weights (the method sets none)\n\n")
        else:
            x, y = _smooth(weights, window)
            for i, color in enumerate(colors):
                ax_weights.plot(x, y[:, i], color=color, lw=1.6)
        ax_weights.set_title(f"task weights ({self.label})")
        ax_weights.set_xlabel("step")
        for run, style, width in styles:
            x, y = _smooth(run.conflict[:, None], window)
            ax_conflict.plot(x, y[:, 0], style, color="k", lw=width, label=run.label)
        ax_conflict.set_ylim(-0.03, 1.03)
        ax_conflict.set_title("conflict: share of task pairs with cos < 0")
        ax_conflict.set_xlabel("step")
        ax_conflict.legend(fontsize="small", loc="upper right")
        handles = [ax_loss.plot([], [], color=c, lw=1.6, label=n)[0] for c, n in zip(colors, names)]
        ax_loss.legend(handles=handles, fontsize="small", loc="lower left")
        images = [run._heatmap(ax, names) for ax, run in zip(heat_axes, runs)]
        images = [image for image in images if image is not None]
        if images:
            right = heat_axes[-1].get_position().x1
            bar = fig.add_axes((right + 0.01, 0.12, 0.008, 0.25))
            fig.colorbar(images[0], cax=bar, label="mean rAU")
        title = self.label if baseline is None else f"{self.label} (solid) vs {baseline.label}"
        fig.suptitle(
            f"Task imbalance: {title}; {self._n} steps, curves are moving averages over "
            f"{window} step{'s' * (window > 1)}"
        )
        return fig

    def _heatmap(self, ax: Any, names: list[str]) -> Any:
        dom = self.dominance()
        if dom is None:
            ax.set_axis_off()
            note = self.dominance_note or "no step recorded"
            text = f"{self.label}:\nno dominance heatmap\n({note})"
            ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)
            return None
        data = dom["mean_rau"].numpy()
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        shares = dom["dominated"].tolist()
        ax.set_xticks(range(len(names)), [f"{n}\n{100 * v:.0f}%" for n, v in zip(names, shares)])
        ax.set_xlabel(f"%: coordinates with the task's rAU > {DOMINATED}", size="small")
        layers = [n if len(n) <= 22 else "…" + n[-21:] for n in dom["names"]]
        ax.set_yticks(range(len(layers)), layers, fontsize="small")
        if data.size <= 80:
            for row, col in ((r, c) for r in range(data.shape[0]) for c in range(data.shape[1])):
                value = float(data[row, col])
                color = "w" if value < 0.6 else "k"
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", color=color, size=7)
        ax.set_title(f"task dominance, mean rAU per layer\n{self.label}")
        return image

    def _text(self, ax: Any, head: str = "") -> None:
        if not head:
            ax.set_axis_off()
        s = self.summary()
        lines = [f"{head}{s['steps']} steps; mean conflict {s['mean_conflict']:.2f}"]
        for i, name in enumerate(s["tasks"]):
            lines.append(
                f"{name}: loss ratio {s['last_loss_ratio'][i]:.3g}, "
                f"norm ratio {s['median_norm_ratio'][i]:.3g}"
            )
        text = "\n".join(lines)
        ax.text(
            0.03, 0.95, text, va="top", family="monospace", size="small", transform=ax.transAxes
        )

    def save(
        self, path: str | Path, baseline: ImbalanceReport | None = None, dpi: int = 80
    ) -> Path:
        """Write the page to ``path``: ``.html`` embeds the PNG and a table of
        :meth:`summary` (of ``baseline`` too); any other suffix is matplotlib's format
        (``.png``, ``.pdf``, ``.svg``). Creates missing folders; returns the path."""
        path = Path(path)
        fig = self.figure(baseline)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() not in (".html", ".htm"):
            fig.savefig(path, dpi=dpi)
            return path
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        image = base64.b64encode(buffer.getvalue()).decode("ascii")
        runs = [self] if baseline is None else [self, baseline]
        rows = []
        for run in runs:
            s = run.summary()
            dominated = s["dominated"] or [math.nan] * len(s["tasks"])
            for i, name in enumerate(s["tasks"]):
                cells = [
                    run.label,
                    name,
                    f"{s['last_loss_ratio'][i]:.4g}",
                    f"{s['median_norm_ratio'][i]:.4g}",
                    f"{100 * dominated[i]:.1f}",
                    f"{s['mean_conflict']:.3f}",
                ]
                rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        head = ["run", "task", "last loss ratio", "median norm ratio", "dominated %", "conflict"]
        title = html.escape(f"Task imbalance: {self.label}")
        path.write_text(
            "<!doctype html>\n<html><head><meta charset='utf-8'>"
            f"<title>{title}</title></head><body>\n<h1>{title}</h1>\n"
            f"<img alt='imbalance report' src='data:image/png;base64,{image}'>\n"
            "<table border='1' cellpadding='4'>\n<tr>"
            + "".join(f"<th>{h}</th>" for h in head)
            + "</tr>\n"
            + "\n".join(rows)
            + "\n</table>\n</body></html>\n"
        )
        return path

    def __repr__(self) -> str:
        state = "attached" if self.optimizer is not None else "detached"
        return f"ImbalanceReport({self.label!r}, K={self._k}, steps={self._n}, {state})"
