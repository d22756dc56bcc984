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

__all__ = ["delta_m_by_run", "results_json", "results_markdown", "write"]


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


def results_markdown(
    data: MTLData,
    runs: Sequence[RunResult],
    cfg: Config,
    seeds: Sequence[int],
    model: str,
    wall_seconds: float,
) -> str:
    """The results table with a header that states the data, the budget and the machine."""
    methods = list(dict.fromkeys(r.method for r in runs))
    dm = delta_m_by_run(data, runs)
    arrows = ["↑" if t.higher_better else "↓" for t in data.tasks]
    headers = ["method"]
    headers += [f"{t.name} {t.metric} {a}" for t, a in zip(data.tasks, arrows)]
    headers += ["Δm % ↓", "s / epoch", "peak MB"]
    rows = []
    for method in methods:
        mine = [r for r in runs if r.method == method]
        row = [METHODS[method].label]
        row += [
            _cell([r.test[k] for r in mine], _digits(task)) for k, task in enumerate(data.tasks)
        ]
        row.append(_cell([dm[(method, r.seed)] for r in mine], 2) if dm else "n/a (no stl)")
        row.append(f"{statistics.fmean(r.sec_per_epoch for r in mine):.2f}")
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
        "s / epoch: training only, evaluation excluded (STL: its K models together). "
        "peak MB: the largest growth of peak memory during a training epoch "
        + (
            "(CUDA max_memory_allocated)."
            if torch.device(cfg.device).type == "cuda"
            else "(resident set, Linux VmHWM)."
        )
        + " The first AdaTask seed also feeds the TaskDominance diagnostic. "
        f"Total wall time {wall_seconds:.0f} s.",
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
