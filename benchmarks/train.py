"""The benchmark's training loop: one method, one seed, a fixed budget; and the sweep over
methods × seeds with a progress bar, in one process or spread over worker processes.

Every run with the same seed starts from the same initial weights (``torch.manual_seed(seed)``
before the model is built) and sees the same mini-batches in the same order. The reported test
metrics are those of the final epoch (no model selection); the validation metrics of every
epoch make the learning curves.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import queue
import time
from collections.abc import Callable, Collection, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .data import MTLData, Split, Task
from .methods import METHODS, STL, Context, build
from .metrics import task_loss, task_metric
from .models import build_model

if TYPE_CHECKING:
    from mtl_optim.diagnostics import ImbalanceReport

__all__ = ["Config", "PeakMemory", "RunResult", "evaluate", "run", "sweep"]


@dataclass(frozen=True)
class Config:
    """The budget shared by every method: epochs, batch size, Adam's lr, the architecture."""

    epochs: int
    batch_size: int
    lr: float
    arch: str = "hps"
    device: str = "cpu"
    eval_batch: int = 2048

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")


@dataclass
class RunResult:
    """One method trained with one seed (for STL: the K single-task models together)."""

    method: str
    seed: int
    test: list[float]
    val_curves: list[list[float]]  # [epoch][task]
    weights: list[list[float]]  # [epoch][task], epoch means of opt.last_weights; [] if none
    sec_per_epoch: float
    peak_mb: float
    report: ImbalanceReport | None = field(default=None, repr=False)


class PeakMemory:
    """Peak memory growth, in MB, of the code inside ``with PeakMemory(device) as m:``.

    On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at entry. On CPU (Linux):
    the process's peak resident set size (``VmHWM``, reset at entry through
    ``/proc/self/clear_refs``) minus the resident size at entry. Where that reset is impossible
    the value is the whole process's peak RSS (``getrusage``), an upper bound.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.mb = float("nan")

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise OSError(f"{key} not in /proc/self/status")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            # Hand freed heap pages back first, or a run that reuses an earlier run's freed
            # (still resident) memory would look free.
            ctypes.CDLL(None).malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            self._start = self._status_kb("VmRSS") * 1024
        except (OSError, AttributeError):
            self._start = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            peak = self._status_kb("VmHWM") * 1024 - self._start
        else:
            import resource  # Unix only; kilobytes on Linux

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mb = peak / 2**20


@dataclass
class _Fit:
    model: nn.Module
    curves: list[list[float]]
    weights: list[list[float]]
    sec_per_epoch: float
    peak_mb: float
    report: ImbalanceReport | None


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, tasks: Sequence[Task], batch: int) -> list[float]:
    """Each task's metric on ``split``."""
    was_training = model.training
    model.eval()
    chunks = [model(split.x[i : i + batch]) for i in range(0, len(split), batch)]
    model.train(was_training)
    return [
        task_metric(task, torch.cat([c[k] for c in chunks]), y)
        for k, (task, y) in enumerate(zip(tasks, split.ys))
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fit(
    data: MTLData,
    task_ids: Sequence[int],
    method: str,
    seed: int,
    cfg: Config,
    on_epoch: Callable[[], None],
    report: bool,
) -> _Fit:
    """Train one model on the tasks ``task_ids``."""
    device = torch.device(cfg.device)
    tasks = [data.tasks[i] for i in task_ids]
    train = Split(data.train.x, [data.train.ys[i] for i in task_ids])
    val = Split(data.val.x, [data.val.ys[i] for i in task_ids])
    torch.manual_seed(seed)
    model = build_model(data, cfg.arch, tasks).to(device)
    steps = -(-len(train) // cfg.batch_size)
    opt = build(method, model.parameters(), Context(len(tasks), seed, cfg.lr, steps))
    if report:
        from mtl_optim.diagnostics import ImbalanceReport
    imbalance = (
        ImbalanceReport(
            opt,
            names=model.named_parameters(),
            task_names=[t.name for t in tasks],
            label=f"{METHODS[method].label}, seed {seed}",
        )
        if report
        else None
    )
    reevaluate = METHODS[method].reevaluate
    order = torch.Generator().manual_seed(seed)

    def losses(x: Tensor, ys: Sequence[Tensor]) -> list[Tensor]:
        return [task_loss(t, out, y) for t, out, y in zip(tasks, model(x), ys)]

    curves, weights, seconds, peak = [], [], 0.0, 0.0
    for _ in range(cfg.epochs):
        weight_sum, counted = None, 0
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            batches = torch.randperm(len(train), generator=order).to(device).split(cfg.batch_size)
            for idx in batches:
                x, ys = train.x[idx], [y[idx] for y in train.ys]
                opt.zero_grad()
                opt.backward(losses(x, ys))
                opt.step()
                if reevaluate:
                    with torch.no_grad():
                        opt.update_weighting(losses(x, ys))
                if opt.last_weights is not None:
                    w = opt.last_weights.detach().double()
                    weight_sum = w if weight_sum is None else weight_sum + w
                    counted += 1
            opt.end_epoch()
            _sync(device)
            seconds += time.perf_counter() - start
        peak = max(peak, memory.mb)
        if weight_sum is not None:
            weights.append((weight_sum / counted).cpu().tolist())
        curves.append(evaluate(model, val, tasks, cfg.eval_batch))
        on_epoch()
    if imbalance is not None:
        imbalance.detach()
    return _Fit(model, curves, weights, seconds / cfg.epochs, peak, imbalance)


def run(
    data: MTLData,
    method: str,
    seed: int,
    cfg: Config,
    on_epoch: Callable[[], None] = lambda: None,
    report: bool = False,
) -> RunResult:
    """Train ``method`` with ``seed`` on ``data`` (already on ``cfg.device``) and test it.

    ``method="stl"`` trains one single-task model per task; its time per epoch is that of all
    K models, its memory the largest of them. ``report=True`` records an
    :class:`~mtl_optim.diagnostics.ImbalanceReport` of the run (not for STL); it makes the
    optimizer form per-task gradients, which a method without an aggregator otherwise skips.
    """
    if report and method == STL:
        raise ValueError("an imbalance report needs a multi-task run, not stl")
    k = len(data.tasks)
    groups = [[i] for i in range(k)] if method == STL else [list(range(k))]
    test = [float("nan")] * k
    curves = [[float("nan")] * k for _ in range(cfg.epochs)]
    weights: list[list[float]] = []
    seconds, peak, imbalance = 0.0, 0.0, None
    for ids in groups:
        fit = _fit(data, ids, method, seed, cfg, on_epoch, report)
        seconds, peak, imbalance = seconds + fit.sec_per_epoch, max(peak, fit.peak_mb), fit.report
        tasks = [data.tasks[i] for i in ids]
        split = Split(data.test.x, [data.test.ys[i] for i in ids])
        for i, value in zip(ids, evaluate(fit.model, split, tasks, cfg.eval_batch)):
            test[i] = value
        for epoch, row in enumerate(fit.curves):
            for i, value in zip(ids, row):
                curves[epoch][i] = value
        if method != STL:
            weights = fit.weights
    return RunResult(method, seed, test, curves, weights, seconds, peak, imbalance)


def _warm_up(data: MTLData, methods: Sequence[str], seed: int, cfg: Config) -> None:
    """One unmeasured epoch of every method on two batches, so that one-time costs (lazy
    library loading, first kernel calls) do not land on the first measured run."""
    tiny = data.head(2 * cfg.batch_size, 64)
    for method in methods:
        run(tiny, method, seed, replace(cfg, epochs=1))


_WORKER: dict[str, Any] = {}


def _start_worker(
    data: MTLData, methods: Sequence[str], seed: int, cfg: Config, ticks: Any, threads: int
) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(data=data, ticks=ticks)
    _warm_up(data, methods, seed, cfg)


def _worker_run(method: str, seed: int, cfg: Config, report: bool) -> RunResult:
    ticks = _WORKER["ticks"]
    return run(_WORKER["data"], method, seed, cfg, lambda: ticks.put(1), report)


def sweep(
    data: MTLData,
    methods: Sequence[str],
    seeds: Sequence[int],
    cfg: Config,
    progress: bool = True,
    label: str | None = None,
    jobs: int = 1,
    reports: Collection[str] = (),
) -> list[RunResult]:
    """Every method with every seed, under one progress bar (one tick per epoch, with ETA).

    Each process first warms up (:func:`_warm_up`). ``jobs > 1`` runs that many worker
    processes (CPU only, each with this process's ``torch.get_num_threads()``); every run is
    deterministic in its seed, so the results equal those of ``jobs=1``. The first seed of each
    method in ``reports`` also records an :class:`~mtl_optim.diagnostics.ImbalanceReport`.
    Results come in the order methods × seeds.
    """
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if jobs > 1 and torch.device(cfg.device).type != "cpu":
        raise ValueError(f"jobs > 1 runs CPU worker processes; use jobs=1 on {cfg.device}")
    k = len(data.tasks)
    plan = [(m, s, m in reports and m != STL and s == seeds[0]) for m in methods for s in seeds]
    total = sum(cfg.epochs * (k if m == STL else 1) for m, _, _ in plan)
    bar = tqdm(total=total, desc=label, unit="epoch", disable=not progress, dynamic_ncols=True)
    if jobs == 1:
        _warm_up(data, methods, seeds[0], cfg)
        results = []
        with bar:
            for method, seed, report in plan:
                bar.set_postfix_str(f"{method} seed {seed}")
                results.append(run(data, method, seed, cfg, lambda: bar.update(1), report))
        return results
    methods_ = multiprocessing.get_all_start_methods()
    # fork shares the data with the workers for free (as DataLoader's workers do on Linux)
    ctx = multiprocessing.get_context("fork" if "fork" in methods_ else "spawn")
    ticks = ctx.Queue()
    init = (data, list(methods), seeds[0], cfg, ticks, torch.get_num_threads())
    with (
        futures.ProcessPoolExecutor(jobs, ctx, initializer=_start_worker, initargs=init) as pool,
        bar,
    ):
        # STL (K models per run) first: the longest runs start early, the pool ends balanced
        order = sorted(range(len(plan)), key=lambda i: plan[i][0] != STL)
        pending = {pool.submit(_worker_run, *plan[i][:2], cfg, plan[i][2]): i for i in order}
        results: list[RunResult | None] = [None] * len(plan)
        while pending:
            done, _ = futures.wait(pending, timeout=0.5, return_when=futures.FIRST_COMPLETED)
            for future in done:
                results[pending.pop(future)] = future.result()
            while True:
                try:
                    bar.update(ticks.get_nowait())
                except queue.Empty:
                    break
            if done:
                bar.set_postfix_str(f"{len(plan) - len(pending)}/{len(plan)} runs")
    return results  # type: ignore[return-value]
