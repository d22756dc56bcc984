"""What the GPU suite's sections share: the run context, the time guard, table files, timing on
the device (CUDA events) or the host (interleaved wall clock), comparisons and models."""

from __future__ import annotations

import datetime
import math
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .._timing import cuda_event_times, markdown_table, time_fns

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "gpu"


class Deadline:
    """A wall-clock limit; :meth:`within` gives a sub-limit for one section."""

    def __init__(self, seconds: float, end: float | None = None) -> None:
        self.end = time.monotonic() + seconds if end is None else end

    def left(self) -> float:
        return self.end - time.monotonic()

    def expired(self, reserve: float = 0.0) -> bool:
        return self.left() <= reserve

    def within(self, seconds: float) -> Deadline:
        return Deadline(0.0, end=min(self.end, time.monotonic() + seconds))


@dataclass
class Run:
    """One run of the suite: where tables go, the device, the sizes' mode and the time guard."""

    out: Path
    device: torch.device
    quick: bool
    deadline: Deadline
    header: str = ""
    status: dict[str, str] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def log(self, message: str) -> None:
        left = self.deadline.left()
        print(f"[gpu-suite {left:6.0f}s left] {message}", flush=True)

    def write(self, name: str, title: str, body: str, notes: str = "") -> Path:
        """Write ``<out>/<name>.md`` with the run header; returns its path."""
        self.out.mkdir(parents=True, exist_ok=True)
        text = f"# {title}\n\n{self.header}\n\n{body}\n"
        if notes:
            text += f"\n{notes.strip()}\n"
        path = self.out / f"{name}.md"
        path.write_text(text)
        self.log(f"wrote {path}")
        return path


def _driver() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def environment(device: torch.device, quick: bool, sizes: str) -> str:
    """The header every table carries: device, driver, versions, sizes, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        import numpy

        numpy_version = numpy.__version__
    except ImportError:  # pragma: no cover - mtl_optim needs numpy
        numpy_version = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = (
            f"{props.name} ({props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.1f} GiB), driver {_driver()}, "
            f"CUDA {torch.version.cuda}"
        )
    else:
        proc = platform.processor() or platform.machine()
        what = f"CPU only ({proc}, {torch.get_num_threads()} threads): CUDA sections skipped"
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"Device: {what}; torch {torch.__version__}, triton {triton_version}, "
        f"numpy {numpy_version}, Python {platform.python_version()}; "
        f"{'--quick' if quick else 'full'} sizes: {sizes}; date {date}"
    )


# --- timing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """Median and interquartile range of ``n`` timed runs, in seconds."""

    median: float
    iqr: float
    n: int

    def ms(self) -> str:
        return f"{self.median * 1e3:.3f} ±{self.iqr * 1e3:.3f}"


def _stat(times: Sequence[float]) -> Stat:
    times = sorted(times)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Stat(statistics.median(times), q[2] - q[0], len(times))


#: Bytes overwritten before each timed run: 256 MiB, over 4x an H200's L2 (50 MiB).
FLUSH_BYTES = 2**28
_FLUSH: dict[tuple[torch.device, int], Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    """Overwrite :data:`FLUSH_BYTES`, as ``triton.testing.do_bench`` does, so that a timed run
    does not find its inputs in the cache."""
    buf = _FLUSH.get((device, FLUSH_BYTES))
    if buf is None:
        buf = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        _FLUSH[(device, FLUSH_BYTES)] = buf
    buf.zero_()


def bench_cuda(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    rep_ms: float = 60.0,
    min_reps: int = 3,
    max_reps: int = 100,
    flush: bool = True,
) -> dict[str, Stat]:
    """Median of CUDA-event times per function: one warm-up call (compilation, allocation),
    one call to estimate the cost, then ``rep_ms / estimate`` calls (within
    ``[min_reps, max_reps]``), each after an L2 flush and bracketed by its own events."""
    out = {}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end), 1e-3)
        reps = int(min(max_reps, max(min_reps, rep_ms / estimate)))
        pairs = []
        for _ in range(reps):
            if flush:
                _flush_l2(device)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            pairs.append((s, e))
        torch.cuda.synchronize()
        out[name] = _stat([s.elapsed_time(e) / 1e3 for s, e in pairs])
    return out


def bench_steps_cuda(
    fns: dict[str, Callable[[], object]], warmup: int, repeat: int
) -> dict[str, Stat]:
    """Whole training steps timed with CUDA events, interleaved round by round (the order
    rotates), so that drift affects every variant alike."""
    return {name: _stat(t) for name, t in cuda_event_times(fns, warmup, repeat).items()}


def bench_host(
    fns: dict[str, Callable[[], object]], warmup: int = 2, repeat: int = 5
) -> dict[str, Stat]:
    """Wall-clock times on the CPU, interleaved round by round (``benchmarks._timing``)."""
    return {
        name: Stat(med, iqr, repeat)
        for name, (med, iqr) in time_fns(fns, warmup=warmup, repeat=repeat).items()
    }


# --- comparisons ----------------------------------------------------------------------------
def tolerance(dtype: torch.dtype, steps: int = 1) -> float:
    """Relative error allowed between two runs of the same computation in ``dtype`` (different
    devices, summation orders, or float32 against float64): ``sqrt(eps)`` per step, i.e.
    1.5e-8 per step in float64 and 3.5e-4 in float32, far below the O(lr) error of a wrong
    update."""
    return steps * math.sqrt(torch.finfo(dtype).eps)


def rel_error(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> float:
    """``‖a − e‖ / ‖e‖`` over all tensors together, in float64 on the CPU (inf on a shape
    mismatch or a non-finite value, so that it never passes)."""
    if len(actual) != len(expected):
        return math.inf
    num = den = 0.0
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            return math.inf
        a64 = a.detach().to("cpu", torch.float64)
        e64 = e.detach().to("cpu", torch.float64)
        if not (torch.isfinite(a64).all() and torch.isfinite(e64).all()):
            return math.inf
        num += float((a64 - e64).square().sum())
        den += float(e64.square().sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


@dataclass(frozen=True)
class Check:
    """One comparison: the relative error against the allowed one."""

    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tol

    def cell(self) -> str:
        if self.ok:
            return f"{self.error:.1e} ≤ {self.tol:.0e} ok"
        return f"{self.error:.1e} > {self.tol:.0e} **FAIL**"


def compare(actual: Sequence[Tensor], expected: Sequence[Tensor], tol: float) -> Check:
    return Check(rel_error(actual, expected), tol)


# --- models ---------------------------------------------------------------------------------
class HPS(nn.Module):
    """Hard parameter sharing: a two-layer tanh trunk and K linear heads."""

    def __init__(self, k: int, d_in: int = 6, width: int = 16, d_out: int = 2) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(width, d_out) for _ in range(k))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [h(z) for h in self.heads]


def mse(outs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
    return [nn.functional.mse_loss(o, y) for o, y in zip(outs, ys)]


def hps_batches(
    k: int, n: int, dtype: torch.dtype, device: torch.device, batch: int = 24, d_in: int = 6
) -> list[tuple[Tensor, list[Tensor]]]:
    """``n`` seeded batches (drawn on the CPU, then moved) with task-dependent target scales."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(batch, d_in, generator=g, dtype=torch.float64)
        ys = [(i + 1) * torch.randn(batch, 2, generator=g, dtype=torch.float64) for i in range(k)]
        out.append((x.to(device, dtype), [y.to(device, dtype) for y in ys]))
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    return markdown_table(headers, rows)
