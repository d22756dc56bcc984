"""Side by side with TorchJD: one training step of mtl_optim against TorchJD 0.18 and a loop.

    python -m benchmarks.vs_torchjd            # -> results/vs_torchjd.md (under 10 minutes)
    python -m benchmarks.vs_torchjd --quick    # -> results/vs_torchjd-quick.md (under a minute)

In one process, one thread, on identical models, batches and initial weights, for each model,
number of tasks K and method, this times one full training step (``zero_grad``, forward, the
multi-task backward, Adam's ``step``) of

* **ours**: ``MTLOptimizer(base=Adam, aggregator=...)`` with its default ``route="auto"``
  (the table says which route it took), or ``AdaTask(base=Adam)``;
* **ours, Jacobian / Gramian route**: ``route="jacobian"`` and ``route="gramian"``, for the
  aggregators that depend only on the Gramian;
* **TorchJD**: ``torchjd.autojac.mtl_backward(losses, features=z)`` then
  ``jac_to_grad(shared, aggregator)`` and ``Adam.step()``; for the AdaTask row the aggregator
  is UPGrad (TorchJD has no per-task optimizer state);
* **TorchJD autogram**: ``Engine(trunk, batch_dim=None).compute_gramian(losses)``, the
  aggregator's weighting on it and ``losses.backward(weights)`` (TorchJD's documented use: the
  heads get the weighted gradients too), where TorchJD allows it: a Gramian weighting
  (not Nash-MTL, which keeps state) and no BatchNorm;
* **loop**: the LibMTL pattern, K ``loss_i.backward(retain_graph=True)`` calls, each task's
  shared gradients copied into a freshly zeroed ``(K, d)`` matrix, our aggregator on it, the
  result written back to ``.grad``.

The variants of a case run interleaved, round by round, so drift in machine load hits them
alike; a step's time is the CPU time of the (single) thread by default, which on a shared
machine leaves out the time spent waiting for a core (``--clock wall`` for wall-clock time).
Peak memory is the growth of the resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) over a fresh optimizer's first three steps, each variant in its own
forked process; the plain ``sum(losses).backward(); Adam.step()`` step is measured alike as a
baseline.

Models (K linear heads ``width -> 8``, MSE losses against random targets):

* ``mlp256``/``mlp1024``: input 64, two Linear+ReLU layers of that width, batch 64;
* ``convbn``: two Conv3x3+BatchNorm+ReLU blocks (16 and 32 channels, the second with
  stride 2) and global average pooling, 16 images of 3x16x16;
* ``transformer``: one pre-LayerNorm encoder block written from Linear layers (model width 64,
  4 attention heads, feed-forward 256), 32 sequences of 16 tokens, mean-pooled.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor, nn

import mtl_optim
from mtl_optim import aggregators

from ._timing import RESULTS, machine_line, markdown_table

try:  # the `bench` extra
    import torchjd
    from torchjd import aggregation as tja
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward
except ImportError:  # pragma: no cover - reported by main()
    torchjd = None

OUT_DIM = 8
LR = 1e-3
METHODS = ("UPGrad", "MGDA", "Nash-MTL", "PCGrad", "IMTL-G", "AdaTask")
MODELS = ("mlp256", "mlp1024", "convbn", "transformer")
KS = (2, 4, 8, 16)


# --- models ---------------------------------------------------------------------------
class MultiTask(nn.Module):
    """A shared ``trunk`` giving the representation ``z`` and K linear heads."""

    def __init__(self, trunk: nn.Module, z_dim: int, num_tasks: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(z_dim, OUT_DIM) for _ in range(num_tasks))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        z = self.trunk(x)
        return z, [head(z) for head in self.heads]


class EncoderBlock(nn.Module):
    """Pre-LayerNorm self-attention + feed-forward block, mean-pooled over the tokens.

    Built from ``nn.Linear`` modules that are called (not ``nn.MultiheadAttention``, which reads
    its output projection's weight directly), so TorchJD's autogram engine sees every layer."""

    def __init__(self, width: int = 64, heads: int = 4, ffn: int = 256) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Linear(ffn, width))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        att = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, c))
        x = x + self.ffn(self.norm2(x))
        return x.mean(dim=1)


def build_model(name: str, k: int) -> tuple[MultiTask, Tensor]:
    """The model (seeded) and its input batch."""
    torch.manual_seed(0)
    if name.startswith("mlp"):
        width = int(name[3:])
        trunk = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        return MultiTask(trunk, width, k), torch.randn(64, 64)
    if name == "convbn":
        trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        return MultiTask(trunk, 32, k), torch.randn(16, 3, 16, 16)
    if name == "transformer":
        return MultiTask(EncoderBlock(), 64, k), torch.randn(32, 16, 64)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# --- the methods on each side ---------------------------------------------------------
GRAMIAN_METHODS = ("UPGrad", "MGDA", "Nash-MTL", "IMTL-G")


def ours_aggregator(method: str) -> aggregators.Aggregator:
    return {
        "UPGrad": aggregators.UPGrad,
        "MGDA": aggregators.MGDA,
        "Nash-MTL": aggregators.NashMTL,
        "PCGrad": aggregators.PCGrad,
        "IMTL-G": aggregators.IMTLG,
        "AdaTask": aggregators.UPGrad,  # the loop's stand-in (LibMTL has no AdaTask)
    }[method]()


def torchjd_aggregator(method: str, k: int):
    if method == "Nash-MTL":
        return tja.NashMTL(n_tasks=k)
    return {
        "UPGrad": tja.UPGrad,
        "MGDA": tja.MGDA,
        "PCGrad": tja.PCGrad,
        "IMTL-G": tja.IMTLG,
        "AdaTask": tja.UPGrad,
    }[method]()


def torchjd_weighting(method: str):
    """TorchJD's Gramian weighting for autogram, or ``None`` where it has none."""
    return {
        "UPGrad": tja.UPGradWeighting,
        "MGDA": tja.MGDAWeighting,
        "PCGrad": tja.PCGradWeighting,
        "IMTL-G": tja.IMTLGWeighting,
        "AdaTask": tja.UPGradWeighting,
    }.get(method, lambda: None)()


@dataclass(frozen=True)
class Case:
    model: str
    k: int
    method: str


def variants(case: Case) -> list[str]:
    """The step variants measured for ``case``."""
    out = ["ours"]
    if case.method in GRAMIAN_METHODS:
        out += ["ours-jacobian", "ours-gramian"]
    out.append("torchjd")
    if case.method != "Nash-MTL" and case.model != "convbn":
        out.append("autogram")
    out.append("loop")
    return out


def _losses(outs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
    return [nn.functional.mse_loss(o, y) for o, y in zip(outs, ys)]


class Step:
    """One training step of a variant (callable); ``route`` says which route ours took."""

    def __init__(self, run: Callable[[], str | None]) -> None:
        self._run = run
        self.route: str | None = None

    def __call__(self) -> None:
        self.route = self._run()


def make_step(case: Case, variant: str) -> Step:
    """A fresh model and optimizer for ``variant`` and a function running one training step."""
    model, x = build_model(case.model, case.k)
    g = torch.Generator().manual_seed(1)
    ys = [torch.randn(x.shape[0], OUT_DIM, generator=g) for _ in range(case.k)]
    shared = [p for p in model.trunk.parameters() if p.requires_grad]

    if variant.startswith("ours"):
        if case.method == "AdaTask":
            opt = mtl_optim.AdaTask(model.parameters(), base=torch.optim.Adam, lr=LR)
        else:
            opt = mtl_optim.MTLOptimizer(
                model.parameters(),
                base=torch.optim.Adam,
                aggregator=ours_aggregator(case.method),
                lr=LR,
                route={"ours": "auto", "ours-jacobian": "jacobian"}.get(variant, "gramian"),
            )

        def ours() -> str:
            opt.zero_grad()
            _, outs = model(x)
            opt.backward(_losses(outs, ys))
            route = "Jacobian" if opt._engine.jacobian is not None else "Gramian"
            opt.step()
            return route

        return Step(ours)

    adam = torch.optim.Adam(model.parameters(), lr=LR)
    if variant == "adam":  # the single-objective baseline of the memory table

        def step() -> None:
            adam.zero_grad()
            _, outs = model(x)
            sum(_losses(outs, ys)).backward()
            adam.step()

        return Step(step)

    if variant == "torchjd":
        agg = torchjd_aggregator(case.method, case.k)

        def step() -> None:
            adam.zero_grad()
            z, outs = model(x)
            mtl_backward(_losses(outs, ys), features=z)
            jac_to_grad(shared, agg)
            adam.step()

        return Step(step)

    if variant == "autogram":
        engine = Engine(model.trunk, batch_dim=None)
        weighting = torchjd_weighting(case.method)

        def step() -> None:
            adam.zero_grad()
            _, outs = model(x)
            losses = torch.stack(_losses(outs, ys))
            weights = weighting(engine.compute_gramian(losses))
            losses.backward(weights)
            adam.step()

        return Step(step)

    if variant == "loop":
        agg = ours_aggregator(case.method)
        sizes = [p.numel() for p in shared]
        d = sum(sizes)

        def step() -> None:
            adam.zero_grad()
            _, outs = model(x)
            losses = _losses(outs, ys)
            grads = torch.zeros(case.k, d)
            for i, loss in enumerate(losses):
                for p in shared:
                    p.grad = None
                loss.backward(retain_graph=True)
                offset = 0
                for p, n in zip(shared, sizes):
                    if p.grad is not None:
                        grads[i, offset : offset + n] = p.grad.view(-1)
                    offset += n
            direction = agg(grads)
            for p, chunk in zip(shared, direction.split(sizes)):
                p.grad = chunk.view_as(p).clone()
            if agg.max_norm is not None:
                torch.nn.utils.clip_grad_norm_(shared, agg.max_norm)
            adam.step()

        return Step(step)

    raise ValueError(f"unknown variant {variant!r}")


def shared_dim(case: Case) -> int:
    model, _ = build_model(case.model, case.k)
    return sum(p.numel() for p in model.trunk.parameters())


# --- memory: one forked process per case and variant ----------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _peak_child(case: Case, variant: str, conn) -> None:
    try:
        step = make_step(case, variant)
        ctypes.CDLL(None).malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start = _status_kb("VmRSS")
        for _ in range(3):
            step()
        conn.send((_status_kb("VmHWM") - start) / 1024)
    except Exception as err:  # reported in the table, never hangs the parent
        conn.send(f"{type(err).__name__}: {err}")
    finally:
        conn.close()


def peak_mb(case: Case, variant: str) -> float | str:
    """Growth of the peak resident set over three fresh steps, in MB, in a forked process."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_peak_child, args=(case, variant, send))
    proc.start()
    send.close()
    result = recv.recv() if recv.poll(300) else "timeout"
    proc.join(10)
    return result


# --- the run ---------------------------------------------------------------------------
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
CLOCK_TEXT = {"cpu": "the thread's CPU time", "wall": "wall-clock time"}


def interleaved(
    fns: dict[str, Callable[[], None]], repeat: int, clock: Callable[[], float]
) -> dict[str, float]:
    """Median time of each function over ``repeat`` rounds; every round runs all of them, in
    an order that rotates from round to round."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = clock()
            fns[name]()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(case: Case, budget_s: float, max_repeat: int, memory: bool, clock: str) -> dict:
    names = variants(case)
    steps = {name: make_step(case, name) for name in names}
    for step in steps.values():  # lazy imports, cvxpy's problem set-up, Adam's state
        step()
    once = interleaved(steps, 1, CLOCKS[clock])
    repeat = max(5, min(max_repeat, int(budget_s / max(sum(once.values()), 1e-6))))
    times = interleaved(steps, repeat, CLOCKS[clock])
    mem = {name: peak_mb(case, name) for name in ["adam", *names]} if memory else {}
    return {"times": times, "repeat": repeat, "memory": mem, "route": steps["ours"].route}


def _ms(t: float | None) -> str:
    return "—" if t is None else f"{t * 1e3:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}"


def _mb(m: float | str | None) -> str:
    if m is None:
        return "—"
    return m if isinstance(m, str) else f"{m:.1f}"


def tables(cases: list[Case], results: dict[Case, dict]) -> tuple[str, str, list[float]]:
    timing_rows, memory_rows, ratios = [], [], []
    for case in cases:
        t, m = results[case]["times"], results[case]["memory"]
        ratio = t["ours"] / t["torchjd"]
        ratios.append(ratio)
        timing_rows.append(
            [
                case.model,
                case.k,
                case.method,
                _ms(t["ours"]),
                _ms(t["torchjd"]),
                f"**{ratio:.2f}**" if ratio <= 0.9 else f"{ratio:.2f} ✗",
                results[case]["route"] or "—",
                _ratio(t["ours"], t.get("autogram")),
                _ratio(t["ours"], t["loop"]),
                _ratio(t.get("ours-gramian"), t.get("ours-jacobian")),
                results[case]["repeat"],
            ]
        )
        if m:
            memory_rows.append(
                [case.model, case.k, case.method]
                + [
                    _mb(m.get(v))
                    for v in (
                        "adam",
                        "ours",
                        "ours-jacobian",
                        "ours-gramian",
                        "torchjd",
                        "autogram",
                        "loop",
                    )
                ]
            )
    timing = markdown_table(
        [
            "model",
            "K",
            "method",
            "ours ms",
            "TorchJD ms",
            "ours / TorchJD",
            "route taken",
            "ours / autogram",
            "ours / loop",
            "Gramian / Jacobian route",
            "rounds",
        ],
        timing_rows,
    )
    memory = markdown_table(
        [
            "model",
            "K",
            "method",
            "Adam on the sum",
            "ours",
            "Jacobian route",
            "Gramian route",
            "TorchJD",
            "autogram",
            "loop",
        ],
        memory_rows,
    )
    return timing, memory, ratios


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid, under a minute")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the table")
    parser.add_argument(
        "--models", default=None, help="comma-separated subset of " + ",".join(MODELS)
    )
    parser.add_argument("--ks", default=None, help="comma-separated K values")
    parser.add_argument("--methods", default=None, help="comma-separated subset of methods")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="cpu",
        help="cpu: the thread's CPU time (default; on a shared machine it leaves out the time "
        "spent waiting for a core); wall: wall-clock time",
    )
    args = parser.parse_args(argv)
    if torchjd is None:
        sys.exit("benchmarks.vs_torchjd needs TorchJD: pip install 'torchjd[full]==0.18.0'")
    torch.set_num_threads(1)
    if args.quick:
        models, ks, methods = ("mlp256", "transformer"), (2, 4), ("UPGrad", "PCGrad", "AdaTask")
        budget_s, max_repeat = 0.5, 8
    else:
        models, ks, methods = MODELS, KS, METHODS
        budget_s, max_repeat = 3.5, 40
    models = args.models.split(",") if args.models else models
    ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else ks
    methods = args.methods.split(",") if args.methods else methods
    cases = [Case(m, k, meth) for m in models for k in ks for meth in methods]

    started = time.perf_counter()
    results = {}
    for case in cases:
        results[case] = measure(case, budget_s, max_repeat, not args.no_memory, args.clock)
        t = results[case]["times"]
        print(
            f"{case.model:12s} K={case.k:<3d} {case.method:9s} "
            + " ".join(f"{n}={v * 1e3:.2f}" for n, v in t.items())
            + f"  ours/TorchJD={t['ours'] / t['torchjd']:.2f}",
            flush=True,
        )
    elapsed = time.perf_counter() - started
    timing, memory, ratios = tables(cases, results)
    within = sum(r <= 0.9 for r in ratios)
    geo = math.exp(statistics.fmean(math.log(r) for r in ratios))
    dims = {f"{m} (K={k})": f"{shared_dim(Case(m, k, 'UPGrad')):,}" for m in models for k in ks[:1]}
    text = (
        "# mtl_optim vs TorchJD: training-step time and peak memory\n\n"
        f"{machine_line()}; TorchJD {version('torchjd')}; {len(cases)} cases in "
        f"{elapsed:.0f} s.\n\n"
        f"**{within} of {len(cases)} cases at or below 0.9x TorchJD's step; geometric mean of "
        f"ours / TorchJD {geo:.2f}.**\n\n"
        f"## Step time (median ms of {CLOCK_TEXT[args.clock]}; ratios below 1: ours is "
        "faster)\n\n"
        f"{timing}\n\n"
        "## Peak memory (MB growth of the resident set over a fresh optimizer's first three "
        "steps, one forked process per cell)\n\n"
        f"{memory if memory.count(chr(10)) > 1 else '(not measured: --no-memory)'}\n\n"
        "Shared parameters per model: "
        + ", ".join(f"{m.split(' ')[0]} {d}" for m, d in dims.items())
        + ".\n\n"
        + __doc__.split("\n\n", 2)[2].strip()
        + "\n"
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"vs_torchjd{'-quick' if args.quick else ''}.md").write_text(text)


if __name__ == "__main__":
    main()
