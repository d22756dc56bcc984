"""The benchmark's training loop: one method, one seed, a fixed budget; and the sweep over
methods × seeds with a progress bar.

Every run with the same seed starts from the same initial weights (``torch.manual_seed(seed)``
before the model is built) and sees the same mini-batches in the same order. The reported test
metrics are those of the final epoch (no model selection); the validation metrics of every
epoch make the learning curves.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from mtl_optim.diagnostics import TaskDominance

from .data import MTLData, Split, Task
from .methods import METHODS, STL, Context, build
from .metrics import task_loss, task_metric
from .models import build_model

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
    dominance: TaskDominance | None = field(default=None, repr=False)


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
    tracker: TaskDominance | None


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
    dominance: bool,
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
    tracker = TaskDominance(opt, names=model.named_parameters()) if dominance else None
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
    return _Fit(model, curves, weights, seconds / cfg.epochs, peak, tracker)


def run(
    data: MTLData,
    method: str,
    seed: int,
    cfg: Config,
    on_epoch: Callable[[], None] = lambda: None,
    dominance: bool = False,
) -> RunResult:
    """Train ``method`` with ``seed`` on ``data`` (already on ``cfg.device``) and test it.

    ``method="stl"`` trains one single-task model per task; its time per epoch is that of all
    K models, its memory the largest of them. ``dominance=True`` attaches a
    :class:`~mtl_optim.diagnostics.TaskDominance` tracker (AdaTask, or Adam with ``Sum``).
    """
    k = len(data.tasks)
    groups = [[i] for i in range(k)] if method == STL else [list(range(k))]
    test = [float("nan")] * k
    curves = [[float("nan")] * k for _ in range(cfg.epochs)]
    weights: list[list[float]] = []
    seconds, peak, tracker = 0.0, 0.0, None
    for ids in groups:
        fit = _fit(data, ids, method, seed, cfg, on_epoch, dominance)
        seconds, peak, tracker = seconds + fit.sec_per_epoch, max(peak, fit.peak_mb), fit.tracker
        tasks = [data.tasks[i] for i in ids]
        split = Split(data.test.x, [data.test.ys[i] for i in ids])
        for i, value in zip(ids, evaluate(fit.model, split, tasks, cfg.eval_batch)):
            test[i] = value
        for epoch, row in enumerate(fit.curves):
            for i, value in zip(ids, row):
                curves[epoch][i] = value
        if method != STL:
            weights = fit.weights
    return RunResult(method, seed, test, curves, weights, seconds, peak, tracker)


def sweep(
    data: MTLData,
    methods: Sequence[str],
    seeds: Sequence[int],
    cfg: Config,
    progress: bool = True,
    label: str | None = None,
) -> list[RunResult]:
    """Every method with every seed, under one progress bar (one tick per epoch, with ETA).

    First every method runs one epoch on two batches, unmeasured, so that one-time costs (lazy
    library loading, first kernel calls) do not land on the first measured run. The first
    AdaTask run also records task dominance for the heatmap.
    """
    from tqdm.auto import tqdm

    tiny = data.head(2 * cfg.batch_size, 64)
    for method in methods:
        run(tiny, method, seeds[0], replace(cfg, epochs=1))
    k = len(data.tasks)
    total = sum(cfg.epochs * len(seeds) * (k if m == STL else 1) for m in methods)
    results = []
    bar = tqdm(total=total, desc=label, unit="epoch", disable=not progress, dynamic_ncols=True)
    with bar:
        for method in methods:
            for seed in seeds:
                bar.set_postfix_str(f"{method} seed {seed}")
                first_adatask = method == "adatask" and seed == seeds[0]
                results.append(
                    run(data, method, seed, cfg, lambda: bar.update(1), dominance=first_adatask)
                )
    return results
