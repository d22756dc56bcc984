"""Section 4: one training step, ours against TorchJD, and the Gramian route against the
Jacobian route.

Same seeded model, batch and aggregator (UPGrad and MGDA, whose defaults match TorchJD's),
Adam on every parameter, K linear heads on a shared trunk:

* **ours (J)**: ``MTLOptimizer(aggregator=...)``: ``opt.backward(losses); opt.step()``;
* **ours (G)**: the same with ``route="gramian"`` (the K×K Gramian, never ``J``);
* **TorchJD autojac**: ``torchjd.autojac.mtl_backward(losses, features=z)``, then
  ``jac_to_grad(trunk parameters, aggregator)`` and ``Adam.step()`` (TorchJD 0.18);
* **TorchJD autogram**: ``torchjd.autogram.Engine(trunk, batch_dim=None)``:
  ``compute_gramian(losses)``, the aggregator's weighting, ``losses.backward(weights)``
  (this also weights the heads' gradients; ours gives the heads their plain gradients).

Trunks: an MLP, a conv net and a pre-norm transformer block (attention written out with
matmuls, so that every route can differentiate it). Step times are CUDA-event medians of
interleaved steps; memory is the peak allocated during the third step of a fresh run, above
what the model and batch held before the optimizer existed (so ``J``, kept between steps by
the Jacobian route, is counted). The trunk gradient after the first step of every variant is
compared with ours (J): the routes must agree to the solvers' accuracy.
"""

from __future__ import annotations

import copy
import gc
import importlib
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import mtl_optim
from mtl_optim import aggregators

from ._common import Run, bench_host, bench_steps_cuda, rel_error, table

NAME = "04-step-time-torchjd"
OUT_DIM = 8


class MeanPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


class Block(nn.Module):
    """Pre-norm transformer block: attention (written out) and a GELU MLP, residuals."""

    def __init__(self, dim: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, ff), nn.Linear(ff, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        att = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(self.act(self.ff1(self.norm2(x))))


class Net(nn.Module):
    """A trunk and K linear heads; ``forward`` gives the shared features and the K outputs."""

    def __init__(self, trunk: nn.Module, features: int, k: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(features, OUT_DIM) for _ in range(k))

    def losses(self, x: Tensor, ys: list[Tensor], z: Tensor | None = None) -> list[Tensor]:
        z = self.trunk(x) if z is None else z
        return [nn.functional.mse_loss(h(z), y) for h, y in zip(self.heads, ys)]


def models(big: bool) -> dict[str, tuple[Callable[[int], Net], tuple[int, ...], int]]:
    """name -> (build(K), input shape without batch, batch)."""
    if big:
        d_in, width, ch, size, dim, seq = 512, 2048, 64, 32, 256, 64
        batches = (256, 64, 32)
    else:
        d_in, width, ch, size, dim, seq = 32, 64, 8, 12, 32, 8
        batches = (32, 8, 8)

    def mlp(k: int) -> Net:
        trunk = nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        return Net(trunk, width, k)

    def conv(k: int) -> Net:
        trunk = nn.Sequential(
            nn.Conv2d(3, ch, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * ch, 2 * ch, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        return Net(trunk, 2 * ch, k)

    def transformer(k: int) -> Net:
        trunk = nn.Sequential(
            nn.Linear(d_in // 4, dim), Block(dim, 8 if big else 4, 4 * dim), MeanPool()
        )
        return Net(trunk, dim, k)

    return {
        "MLP": (mlp, (d_in,), batches[0]),
        "conv": (conv, (3, size, size), batches[1]),
        "transformer block": (transformer, (seq, d_in // 4), batches[2]),
    }


def torchjd_modules() -> tuple[object, object, object] | str:
    """``(autojac, autogram, aggregation)`` of TorchJD, or why they cannot be imported."""
    try:
        autojac = importlib.import_module("torchjd.autojac")
        autogram = importlib.import_module("torchjd.autogram")
        aggregation = importlib.import_module("torchjd.aggregation")
        version = importlib.import_module("importlib.metadata").version("torchjd")
    except Exception as e:  # not installed, or a dependency (quadprog) is missing
        return f"TorchJD not importable ({type(e).__name__}: {e})"
    if not hasattr(autojac, "jac_to_grad"):
        return f"TorchJD {version} has no autojac.jac_to_grad (needs 0.18)"
    return autojac, autogram, aggregation


AGGREGATORS = {"UPGrad": "UPGrad", "MGDA": "MGDA"}  # ours -> TorchJD's class name


def variants(
    build: Callable[[int], Net], k: int, agg: str, x: Tensor, ys: list[Tensor], tjd: object
) -> dict[str, Callable[[], tuple[Callable[[], None], Net]]]:
    """name -> factory of ``(step, model)`` on a fresh copy of the same seeded model."""
    torch.manual_seed(0)
    proto = build(k).to(x.device)
    ours_cls = getattr(aggregators, agg)

    def ours(route: str) -> Callable[[], tuple[Callable[[], None], Net]]:
        def make() -> tuple[Callable[[], None], Net]:
            model = copy.deepcopy(proto)
            opt = mtl_optim.MTLOptimizer(
                model.parameters(), aggregator=ours_cls(), route=route, lr=1e-3
            )

            def step() -> None:
                opt.zero_grad()
                opt.backward(model.losses(x, ys))
                opt.step()

            return step, model

        return make

    out = {"ours (J)": ours("jacobian"), "ours (G)": ours("gramian")}
    if isinstance(tjd, str):
        return out
    autojac, autogram, aggregation = tjd

    def autojac_make() -> tuple[Callable[[], None], Net]:
        model = copy.deepcopy(proto)
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)
        shared = list(model.trunk.parameters())
        aggregator = getattr(aggregation, AGGREGATORS[agg])()

        def step() -> None:
            adam.zero_grad()
            z = model.trunk(x)
            autojac.mtl_backward(model.losses(x, ys, z), features=z)
            autojac.jac_to_grad(shared, aggregator)
            adam.step()

        return step, model

    def autogram_make() -> tuple[Callable[[], None], Net]:
        model = copy.deepcopy(proto)
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)
        engine = autogram.Engine(model.trunk, batch_dim=None)
        weighting = getattr(aggregation, f"{AGGREGATORS[agg]}Weighting")()

        def step() -> None:
            adam.zero_grad()
            losses = torch.stack(model.losses(x, ys))
            losses.backward(weighting(engine.compute_gramian(losses)))
            adam.step()

        return step, model

    out["TorchJD autojac"] = autojac_make
    out["TorchJD autogram"] = autogram_make
    return out


def first_grads(make: Callable[[], tuple[Callable[[], None], Net]]) -> list[Tensor]:
    """The trunk's ``.grad`` after the first step of a fresh run."""
    step, model = make()
    step()
    return [p.grad.detach().clone() for p in model.trunk.parameters()]


def peak_memory(make: Callable[[], tuple[Callable[[], None], Net]], device: torch.device) -> int:
    """Bytes allocated at the peak of the third step, above the memory before the optimizer."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    step, model = make()
    before += sum(p.numel() * p.element_size() for p in model.parameters())  # the model copy
    step()
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def measure(run: Run, name: str, k: int, agg: str, tjd: object) -> tuple[list[str], dict]:
    build, shape, batch = models(run.cuda)[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(run.device)
    ys = [torch.randn(batch, OUT_DIM, generator=g).to(run.device) for _ in range(k)]
    makes = variants(build, k, agg, x, ys, tjd)
    d = sum(p.numel() for p in build(1).trunk.parameters())
    ref = first_grads(makes["ours (J)"])
    agree: dict[str, str] = {}
    for n in [n for n in makes if n != "ours (J)"]:
        try:  # a route that cannot handle this model is reported, the others still run
            agree[n] = f"{rel_error(first_grads(makes[n]), ref):.0e}"
        except Exception as e:
            agree[n] = f"**error** {type(e).__name__}: {str(e)[:80]}"
            del makes[n]
    mem = {n: peak_memory(m, run.device) for n, m in makes.items()} if run.cuda else {}
    steps = {n: m()[0] for n, m in makes.items()}
    if run.cuda:
        t = bench_steps_cuda(steps, warmup=3, repeat=5 if run.quick else 10)
    else:
        t = bench_host(steps, warmup=1, repeat=3)
    del steps

    def ms(key: str) -> str:
        return t[key].ms() if key in t else "—"

    def mib(key: str) -> str:
        return f"{mem[key] / 2**20:,.1f}" if key in mem else "—"

    ratios = {}
    for ours, theirs in (("J", "TorchJD autojac"), ("G", "TorchJD autogram")):
        if theirs in t and f"ours ({ours})" in t:
            ratios[ours] = t[f"ours ({ours})"].median / t[theirs].median
    if isinstance(tjd, str):
        ratio_cell = "— (TorchJD not importable)"
    else:
        ratio_cell = " / ".join(f"{ratios[r]:.2f}×" if r in ratios else "—" for r in "JG")
    agree_cell = "; ".join(f"{n}: {e}" for n, e in agree.items())
    row = [
        name,
        f"{d:,}",
        str(k),
        agg,
        ms("ours (J)"),
        ms("ours (G)"),
        ms("TorchJD autojac"),
        ms("TorchJD autogram"),
        ratio_cell,
        f"{t['ours (G)'].median / t['ours (J)'].median:.2f}×" if "ours (G)" in t else "—",
        " / ".join(mib(n) for n in ("ours (J)", "ours (G)", "TorchJD autojac", "TorchJD autogram")),
        agree_cell,
    ]
    return row, ratios


HEADERS = [
    "trunk",
    "d (shared)",
    "K",
    "aggregator",
    "ours (J) ms",
    "ours (G) ms",
    "TorchJD autojac ms",
    "TorchJD autogram ms",
    "ours / TorchJD (J vs autojac / G vs autogram)",
    "ours G / J time",
    "peak MiB: ours J / ours G / autojac / autogram",
    "trunk grad vs ours (J), step 1",
]


def plan(run: Run) -> tuple[list[int], list[str]]:
    if not run.cuda:
        return [2, 4], ["UPGrad"]
    if run.quick:
        return [2, 8], ["UPGrad"]
    return [2, 4, 8, 16], ["UPGrad", "MGDA"]


def main(run: Run, budget: float) -> None:
    end = time.monotonic() + budget
    tjd = torchjd_modules()
    ks, aggs = plan(run)
    rows: list[list[str]] = []
    slower: list[str] = []
    compared = 0
    tjd_note = (
        tjd
        if isinstance(tjd, str)
        else "TorchJD " + importlib.import_module("importlib.metadata").version("torchjd")
    )
    notes = (
        f"{tjd_note}. Cells: median ±IQR of "
        + ("interleaved CUDA-event step times" if run.cuda else "interleaved wall-clock steps")
        + " (ms); peak memory is CUDA-only. 'ours / TorchJD' < 1 means ours is faster. The "
        "last column is ‖g − g_ours(J)‖/‖g_ours(J)‖ of the trunk gradient after one step "
        "(TorchJD's MGDA stops its Frank-Wolfe iterations at 1e-3; its autogram route weights "
        "the heads too, but the trunk gradient is the same combination)."
    )

    def write(verdict: str = "") -> None:
        title = "GPU suite 4: step time, ours vs TorchJD"
        run.write(NAME, title, verdict + table(HEADERS, rows), notes)

    for name in models(run.cuda):
        for agg in aggs:
            for k in ks:
                label = [name, "", str(k), agg]
                if time.monotonic() > end or run.deadline.expired(20):
                    rows.append(label + ["skipped: time guard"] + [""] * (len(HEADERS) - 5))
                    continue
                run.log(f"4/5 step time: {name}, K={k}, {agg}")
                try:
                    row, ratios = measure(run, name, k, agg, tjd)
                except Exception as e:
                    row, ratios = label + [f"**error** {type(e).__name__}: {str(e)[:120]}"], {}
                    row += [""] * (len(HEADERS) - len(row))
                rows.append(row)
                if ratios:
                    compared += 1
                    if max(ratios.values()) > 1:
                        slower.append(f"{name} K={k} {agg}")
                if run.cuda:
                    torch.cuda.empty_cache()
                write()
    if compared:
        verdict = "met" if not slower else "**missed**"
        line = (
            f"Step time vs TorchJD: ours no slower on {compared - len(slower)} of {compared} "
            f"cases (both routes): {verdict}" + (f"; slower: {', '.join(slower)}" if slower else "")
        )
        if run.cuda:
            run.targets.append(line)
        else:
            line = "CPU (not a target): " + line.replace("**missed**", "slower somewhere")
    else:
        line = f"{len(rows)} cases; {tjd_note}"
    run.status[NAME] = line
    write(line + "\n\n")
