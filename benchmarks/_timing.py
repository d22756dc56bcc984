"""Shared helpers for the benchmarks: timing, a hard-parameter-sharing MLP, tables."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

RESULTS = Path(__file__).resolve().parent / "results"


def _stats(times: list[float]) -> tuple[float, float]:
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return statistics.median(times), q3 - q1


def time_fn(fn: Callable[[], object], warmup: int = 3, repeat: int = 20) -> tuple[float, float]:
    """``(median, interquartile range)`` of ``fn``'s wall time in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _stats(times)


def time_fns(
    fns: dict[str, Callable[[], object]], warmup: int = 3, repeat: int = 20
) -> dict[str, tuple[float, float]]:
    """Like :func:`time_fn` for several functions, interleaved round by round so that drift in
    machine load affects all of them alike (the order rotates every round)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: _stats(ts) for name, ts in times.items()}


class SharedMLP(nn.Module):
    """Hard parameter sharing: ``depth`` Linear+ReLU trunk layers, then K linear heads."""

    def __init__(self, in_dim: int, width: int, out_dim: int, num_tasks: int, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, out_dim) for _ in range(num_tasks))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]


def make_batch(
    batch: int, in_shape: Sequence[int], out_dim: int, num_tasks: int, seed: int = 0
) -> tuple[Tensor, list[Tensor]]:
    """A random input batch of shape ``(batch, *in_shape)`` and K regression targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *in_shape, generator=g)
    return x, [torch.randn(batch, out_dim, generator=g) for _ in range(num_tasks)]


def mse_losses(model: nn.Module, x: Tensor, targets: Sequence[Tensor]) -> list[Tensor]:
    """Forward pass and the K per-task MSE losses."""
    return [nn.functional.mse_loss(out, y) for out, y in zip(model(x), targets, strict=True)]


def num_params(params: Sequence[Tensor]) -> int:
    return sum(p.numel() for p in params)


def machine_line() -> str:
    proc = platform.processor() or platform.machine()
    try:  # platform.processor() is often empty on Linux; the CPU model name is more useful
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                proc = f"{proc} ({line.split(':', 1)[1].strip()})"
                break
    except OSError:
        pass
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"Machine: {proc}, torch {torch.__version__}, "
        f"torch.get_num_threads()={torch.get_num_threads()}; date {date}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(name: str, title: str, table: str, notes: str = "", quick: bool = False) -> None:
    """Print the table and write it, with a machine/date header, to ``results/<name>.md``
    (``results/<name>-quick.md`` for a ``--quick`` run, so it never replaces a full run's)."""
    text = f"# {title}\n\n{machine_line()}\n\n{table}\n"
    if notes:
        text += f"\n{notes}\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}{'-quick' if quick else ''}.md").write_text(text)


def cuda_event_times(
    fns: dict[str, Callable[[], object]], warmup: int, repeat: int
) -> dict[str, list[float]]:
    """Seconds per call of each function from CUDA events, interleaved round by round (the
    order rotates, so that drift affects every variant alike), after ``warmup`` rounds."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    torch.cuda.synchronize()
    events: dict[str, list] = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) / 1e3 for s, e in pairs] for name, pairs in events.items()}
