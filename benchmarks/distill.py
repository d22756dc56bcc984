"""Distillation on MultiDigits: SCD vs plain adaptor distillation vs no distillation (Δm vs STL).

Three single-task teachers (STL, one per task: left digit, right digit, their sum) are trained
first; then, from the same seed, one multi-task student per method:

* **MTL**: the student alone, equal weights (``MTLOptimizer`` over Adam);
* **MTL + KD**: plus :class:`mtl_optim.distill.AdaptorDistillation` of both trunk layers
  from every teacher at every step (λ = 1; docs/methods/distillation.md);
* **MTL + SCD**: plus :class:`mtl_optim.distill.SequentialCooperativeDistillation` over the
  same adaptor distillation: one warm-up epoch measuring the gradient cosine of the trunk and
  the MTL/STL loss ratio, then block-by-block distillation (our design, see
  docs/methods/distillation.md).

Model: ``digits_demo.py``'s MLP (two shared Linear(·, 128) + ReLU layers, one linear head per task);
Adam lr 1e-3, batch 64; the adaptors in their own param group (Adam lr 1e-2, weight decay 5e-4). The
table gives test accuracy (%) after the last epoch, mean ± std over seeds, and Δm
(docs/benchmarks.md, "Δm"; higher accuracy is better) of each method against the STL teachers of the
same seed, then averaged; lower Δm is better.

    python -m benchmarks.distill            # 3 seeds, 8 epochs
    python -m benchmarks.distill --quick    # 1 seed, 2 epochs
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import mtl_optim
from mtl_optim.distill import AdaptorDistillation, SequentialCooperativeDistillation

from ._timing import markdown_table, report
from .data import MTLData, multidigits

BATCH, LR, ADAPTOR_LR, ADAPTOR_WD = 64, 1e-3, 1e-2, 5e-4
METHODS = ("MTL", "MTL + KD", "MTL + SCD")


class Net(nn.Module):
    """Two shared Linear + ReLU layers (the distilled feature levels) and one head per task."""

    def __init__(self, classes: tuple[int, ...], width: int = 128) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(128, width), nn.Linear(width, width)
        self.heads = nn.ModuleList(nn.Linear(width, c) for c in classes)

    def features(self, x: Tensor) -> list[Tensor]:
        h1 = torch.relu(self.l1(x.flatten(1)))
        return [h1, torch.relu(self.l2(h1))]

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feats = self.features(x)
        return [head(feats[-1]) for head in self.heads], feats


def batches(n: int, seed: int, epoch: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return list(torch.randperm(n, generator=g).split(BATCH))


def accuracy(model: Net, data: MTLData, tasks: list[int]) -> list[float]:
    """Test accuracy (%) of the model's heads, which predict ``tasks``."""
    with torch.no_grad():
        preds, _ = model(data.test.x)
    return [
        (p.argmax(1) == data.test.ys[t]).float().mean().item() * 100 for p, t in zip(preds, tasks)
    ]


def train_teacher(task: int, data: MTLData, seed: int, epochs: int) -> Net:
    torch.manual_seed(seed)
    model = Net((data.tasks[task].classes,))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = data.train.x, data.train.ys[task]
    for epoch in range(epochs):
        for idx in batches(len(x), seed, epoch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx])[0][0], y[idx]).backward()
            opt.step()
    return model


def train_student(
    method: str, teachers: list[Net], data: MTLData, seed: int, epochs: int
) -> tuple[list[float], float, str]:
    """Test accuracies, seconds per epoch, and (for SCD) the schedule it built."""
    torch.manual_seed(seed)
    model = Net(tuple(t.classes for t in data.tasks))
    groups: list[dict] = [{"params": list(model.parameters())}]
    distill: Callable[..., Tensor] | None = None
    scd = None
    if method != "MTL":
        kd = AdaptorDistillation(
            teachers, channels=[128, 128], teacher_forward=lambda m, v: m.features(v)
        )
        distill = kd
        if method == "MTL + SCD":
            scd = SequentialCooperativeDistillation(kd, total_epochs=epochs, warmup_epochs=1)
            distill = scd
        groups.append(
            {"params": list(kd.parameters()), "lr": ADAPTOR_LR, "weight_decay": ADAPTOR_WD}
        )
    opt = mtl_optim.MTLOptimizer(groups, base=torch.optim.Adam, lr=LR)
    x, ys = data.train.x, data.train.ys
    start = time.perf_counter()
    for epoch in range(epochs):
        if scd is not None:
            scd.step(epoch)
        for idx in batches(len(x), seed, epoch):
            preds, feats = model(x[idx])
            losses = [F.cross_entropy(p, y[idx]) for p, y in zip(preds, ys)]
            if scd is not None and scd.measuring:
                with torch.no_grad():
                    stl = [F.cross_entropy(t(x[idx])[0][0], y[idx]) for t, y in zip(teachers, ys)]
                trunk = [*model.l1.parameters(), *model.l2.parameters()]
                scd.observe(losses=losses, shared=trunk, stl_losses=stl)
            objectives = torch.stack(losses)
            if distill is not None:
                objectives = objectives + distill(feats, x[idx])
            opt.zero_grad()
            opt.backward(objectives)
            opt.step()
    per_epoch = (time.perf_counter() - start) / epochs
    schedule = ""
    if scd is not None:
        schedule = (
            f"blocks {[list(b) for b in scd.blocks]}, queue {list(scd.order)}, "
            f"stages start at {list(scd.stage_boundaries)}"
        )
    return accuracy(model, data, list(range(len(data.tasks)))), per_epoch, schedule


def delta_m(acc: list[float], stl: list[float]) -> float:
    """Δm with every metric higher-better: -(1/K) Σ (M - M_stl) / M_stl × 100."""
    return -100 * statistics.mean((m - b) / b for m, b in zip(acc, stl))


def _cell(values: list[float], digits: int = 1) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    seeds = 1 if args.quick else args.seeds
    epochs = 2 if args.quick else args.epochs
    torch.set_num_threads(1)  # tiny models: one thread is fastest and fair to a shared machine

    acc: dict[str, list[list[float]]] = {m: [] for m in ("STL", *METHODS)}
    secs: dict[str, list[float]] = {m: [] for m in METHODS}
    dm: dict[str, list[float]] = {m: [] for m in METHODS}
    schedules = []
    for seed in range(seeds):
        data = multidigits(seed)
        teachers = [train_teacher(t, data, seed, epochs) for t in range(len(data.tasks))]
        stl = [accuracy(m, data, [t])[0] for t, m in enumerate(teachers)]
        acc["STL"].append(stl)
        for method in METHODS:
            a, s, schedule = train_student(method, teachers, data, seed, epochs)
            acc[method].append(a)
            secs[method].append(s)
            dm[method].append(delta_m(a, stl))
            if schedule:
                schedules.append(f"seed {seed}: {schedule}")

    names = [t.name for t in data.tasks]
    headers = ["method", *(f"{n} acc %" for n in names), "Δm % (↓)", "s / epoch"]
    rows = []
    for method, runs in acc.items():
        cells = [_cell([r[t] for r in runs]) for t in range(len(names))]
        delta = "0 (baseline)" if method == "STL" else _cell(dm[method], 2)
        per_epoch = "—" if method == "STL" else f"{statistics.mean(secs[method]):.2f}"
        rows.append([method, *cells, delta, per_epoch])
    notes = (
        f"MultiDigits (`benchmarks/data.py`, sklearn digits pairs): 8000 train / 2000 test, "
        f"{epochs} epochs for teachers and students, batch {BATCH}, Adam lr {LR:g}, seeds "
        f"{list(range(seeds))}; adaptors Adam lr {ADAPTOR_LR:g}, weight decay {ADAPTOR_WD:g}. "
        "Δm per seed against that seed's STL teachers, then mean ± std. SCD (warm-up 1 epoch, "
        "gradient cosine of the trunk, complexity = MTL/STL loss ratio, linear decay) built:\n\n"
        + "\n".join(f"- {s}" for s in schedules)
    )
    report(
        "distill",
        "Distillation on MultiDigits: SCD vs adaptor KD vs none (Δm vs STL)",
        markdown_table(headers, rows),
        notes,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
