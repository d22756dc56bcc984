"""The results table (markdown) and the raw results (JSON) of a benchmark sweep."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from ._timing import machine_line, markdown_table
from .data import MTLData, Task
from .methods import METHODS, STL
from .metrics import delta_m
from .train import Config, RunResult

__all__ = ["delta_m_by_run", "paired_difference", "results_json", "results_markdown", "write"]

# Two-sided 95 % quantiles of Student's t with 1..10 degrees of freedom (beyond: the normal's).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: Sequence[float], digits: int) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _digits(task: Task) -> int:
    return {"binary": 4, "multiclass": 2, "regression": 3}[task.kind]


def delta_m_by_run(data: MTLData, runs: Sequence[RunResult]) -> dict[tuple[str, int], float]:
    """Δm % of every run against the STL test metrics averaged over the STL seeds (empty
    without STL runs)."""
    stl = [r.test for r in runs if r.method == STL]
    if not stl:
        return {}
    baseline = [statistics.fmean(column) for column in zip(*stl)]
    directions = [t.higher_better for t in data.tasks]
    return {(r.method, r.seed): delta_m(r.test, baseline, directions) for r in runs}


def paired_difference(
    dm: dict[tuple[str, int], float], method: str, reference: str, seeds: Sequence[int]
) -> tuple[float, float, bool] | None:
    r"""Seed-paired difference of Δm, ``method`` minus ``reference``: mean, standard deviation
    and whether it exceeds seed noise by a paired t-test at 5 %,
    :math:`|\bar d| > t_{0.975, n-1}\, s_d / \sqrt{n}` (both runs of a seed share initial
    weights and batches, so the seed's luck cancels). ``None`` with fewer than two common
    seeds."""
    pairs = [
        dm[(method, s)] - dm[(reference, s)]
        for s in seeds
        if (method, s) in dm and (reference, s) in dm
    ]
    if len(pairs) < 2:
        return None
    mean, std = _mean_std(pairs)
    t = _T95[len(pairs) - 2] if len(pairs) - 1 <= len(_T95) else 1.96
    return mean, std, abs(mean) > t * std / len(pairs) ** 0.5


def results_markdown(
    data: MTLData,
    runs: Sequence[RunResult],
    cfg: Config,
    seeds: Sequence[int],
    model: str,
    wall_seconds: float,
    jobs: int = 1,
    cpu_seconds: float | None = None,
) -> str:
    """The results table with a header that states the data, the budget and the machine, and
    (with STL and equal weighting among the runs) each method's Δm against equal weighting,
    paired by seed, with a mark where the difference exceeds seed noise."""
    methods = list(dict.fromkeys(r.method for r in runs))
    dm = delta_m_by_run(data, runs)
    compare = bool(dm) and "equal" in methods and len(seeds) > 1
    arrows = ["↑" if t.higher_better else "↓" for t in data.tasks]
    headers = ["method"]
    headers += [f"{t.name} {t.metric} {a}" for t, a in zip(data.tasks, arrows)]
    headers += ["Δm % ↓"] + ["Δm − equal (paired)"] * compare + ["s / epoch", "peak MB"]
    rows, separated, compared = [], [], 0
    for method in methods:
        mine = [r for r in runs if r.method == method]
        row = [METHODS[method].label]
        row += [
            _cell([r.test[k] for r in mine], _digits(task)) for k, task in enumerate(data.tasks)
        ]
        row.append(_cell([dm[(method, r.seed)] for r in mine], 2) if dm else "n/a (no stl)")
        if compare:
            diff = None if method == "equal" else paired_difference(dm, method, "equal", seeds)
            if diff is None:
                row.append("—")
            else:
                compared += 1
                mean, std, beyond = diff
                row.append(f"{mean:+.2f} ± {std:.2f}" + " *" * beyond)
                if beyond:
                    separated.append(METHODS[method].label)
        timed = [r for r in mine if r.report is None] or mine  # the report's hooks cost time
        row.append(f"{statistics.fmean(r.sec_per_epoch for r in timed):.2f}")
        row.append(f"{max(r.peak_mb for r in mine):.0f}")
        rows.append(row)
    n_train, n_val, n_test = data.sizes
    task_list = ", ".join(f"{t.name} ({t.kind}, {t.metric})" for t in data.tasks)
    lines = [
        f"# {data.name}: mtl_optim methods against single-task learning",
        "",
        machine_line() + f"; device {cfg.device}",
        "",
        f"- **Data**: {data.name} ({data.source}); train {n_train} / val {n_val} / "
        f"test {n_test}; K = {len(data.tasks)} tasks: {task_list}.",
        f"- **Budget, identical for every method**: {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"Adam lr {cfg.lr}, model {model}; seeds {', '.join(map(str, seeds))} (same initial "
        "weights and batch order per seed).",
        "- **Metrics**: test split after the last epoch, mean ± std over seeds. Δm % "
        "(docs/benchmarks.md) against the STL row's mean; lower is better.",
        "",
        markdown_table(headers, rows),
        "",
    ]
    if compare:
        lines += [
            f"**Separation**: {len(separated)} of {compared} methods differ from equal weighting "
            "by more than seed noise (`*`: paired t-test over the seeds at 5 %; each seed's two "
            "runs share initial weights and batches)"
            + (f": {', '.join(separated)}." if separated else "."),
            "",
        ]
    reported = sorted({METHODS[r.method].label for r in runs if r.report is not None})
    lines += [
        "s / epoch: training only, evaluation excluded (STL: its K models together). "
        "peak MB: the largest growth of peak memory during a training epoch "
        + (
            "(CUDA max_memory_allocated)."
            if torch.device(cfg.device).type == "cuda"
            else "(resident set, Linux VmHWM)."
        )
        + (
            f" The first seed of {' and '.join(reported)} also records an imbalance report: "
            "per-task gradients at every step (equal weighting then sums K per-task gradients, "
            "the single-pass gradient up to rounding); s / epoch leaves those runs out."
            if reported
            else ""
        )
        + f" Wall time {wall_seconds:.0f} s"
        + (f" with {jobs} worker processes" if jobs > 1 else "")
        + ("" if cpu_seconds is None else f", CPU time {cpu_seconds:.0f} s (all processes)")
        + ", data loading and plots included.",
    ]
    return "\n".join(lines) + "\n"


def results_json(
    data: MTLData, runs: Sequence[RunResult], cfg: Config, seeds: Sequence[int]
) -> str:
    """Every run's numbers (per seed, per epoch) for later analysis."""
    dm = delta_m_by_run(data, runs)
    payload = {
        "dataset": data.name,
        "sizes": data.sizes,
        "tasks": [
            {"name": t.name, "kind": t.kind, "metric": t.metric, "higher_better": t.higher_better}
            for t in data.tasks
        ],
        "config": {
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "arch": cfg.arch,
            "device": cfg.device,
        },
        "seeds": list(seeds),
        "runs": [
            {
                "method": r.method,
                "seed": r.seed,
                "test": r.test,
                "delta_m": dm.get((r.method, r.seed)),
                "val_curves": r.val_curves,
                "weights": r.weights,
                "sec_per_epoch": r.sec_per_epoch,
                "peak_mb": r.peak_mb,
            }
            for r in runs
        ],
    }
    return json.dumps(payload, indent=1)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
