r"""Partial labels: training when each batch labels only some of the tasks.

``opt.backward([l0, None, l2])`` lets a batch leave out the tasks it has no labels for (see
docs/methods/partial-labels.md). This benchmark removes labels from real data (MultiDigits and
census-wide, :mod:`benchmarks.data`) and compares, for the same model (:mod:`benchmarks.models`),
initial weights and optimizer budget:

* **partial** — every batch is used; each batch labels one random half of the tasks (for odd K,
  ⌊K/2⌋ or ⌈K/2⌉ tasks with probability 1/2 each, so half of the labels are kept in
  expectation; never fewer than one task); the unlabelled tasks' losses are ``None``;
* **fully labelled subset** — the standard practice it replaces: only fully labelled samples,
  a random subset with as many labels as the partial runs kept (⌈L / K⌉ samples for L kept
  labels), trained for the same number of optimizer steps (more passes over fewer samples) or
  for the same number of epochs (half the steps);
* **zero-fill** — the naive alternative: the partial runs' batches, but an unlabelled task's
  loss becomes ``0 * loss``, a present task with a zero gradient; and AdaTask's own version,
  ``AdaTask(missing="zero")``;
* **full labels** — every label of every batch: the upper bound and the Δm reference.

The label draw: the training set is cut once (seeded) into batches; each batch gets its
labelled tasks once and keeps them, and every epoch visits the same batches in a new order, so
a partial run never sees a removed label and takes exactly as many steps as a full-label run.

Methods (built by :func:`benchmarks.methods.build`, all Adam with the same lr): equal
weighting, AdaTask (Adam), MGDA and uncertainty weighting (UW). Test metrics after the last
epoch (:func:`benchmarks.train.evaluate`), mean ± std over seeds; Δm
(:func:`benchmarks.metrics.delta_m`, lower is better) of each run against the same seed's
full-label run of the same method and of equal weighting.

    python -m benchmarks.partial_labels            # 3 seeds -> benchmarks/results/partial_labels.md
    python -m benchmarks.partial_labels --quick    # MultiDigits, 1 seed, 1 epoch, 2000 samples
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

import mtl_optim

from ._timing import machine_line, markdown_table
from .data import MTLData, Split, load
from .methods import METHODS, Context, build
from .metrics import delta_m, task_loss
from .models import build_model
from .train import evaluate

__all__ = [
    "BUDGETS",
    "MODES",
    "Budget",
    "Run",
    "Schedule",
    "VARIANTS",
    "fixed_batches",
    "label_mask",
    "main",
    "render",
    "run",
    "schedule",
    "eval_losses",
]

RESULTS = Path(__file__).resolve().parent / "results"
#: mode -> row label
MODES = {
    "full": "full labels (upper bound)",
    "partial": "partial (`None` for unlabelled)",
    "subset": "fully labelled subset, same steps",
    "subset-epochs": "fully labelled subset, same epochs",
    "zero": "zero-fill (`0 * loss`)",
    "zero-arg": 'zero-fill (`AdaTask(missing="zero")`)',
}
#: (mode, method) in table order; methods are keys of :data:`benchmarks.methods.METHODS`
VARIANTS: tuple[tuple[str, str], ...] = (
    *(("full", m) for m in ("equal", "adatask", "mgda", "uw")),
    *(("partial", m) for m in ("equal", "adatask", "mgda", "uw")),
    *(("subset", m) for m in ("equal", "adatask", "mgda", "uw")),
    *(("subset-epochs", m) for m in ("equal", "adatask")),
    *(("zero", m) for m in ("equal", "adatask", "mgda")),
    ("zero-arg", "adatask"),
)


@dataclass(frozen=True)
class Budget:
    """Epochs, batch size and Adam's lr: the main job's budget for the data set."""

    epochs: int
    batch_size: int
    lr: float = 1e-3


#: The data sets of the default run and their budgets (those of ``python -m benchmarks``).
BUDGETS = {"multidigits": Budget(4, 64), "census-wide": Budget(2, 256)}
END = torch.empty(0, dtype=torch.long)  # a plan entry that ends an epoch


@dataclass
class Run:
    """One (mode, method, seed): test metrics and losses, labels used, steps, wall time."""

    mode: str
    method: str
    seed: int
    test: list[float]
    losses: list[float]
    labels: int
    steps: int
    seconds: float


def label_mask(num_batches: int, num_tasks: int, generator: torch.Generator) -> Tensor:
    """``(num_batches, K)`` bool: the tasks each batch labels, one random half per batch.

    ⌊K/2⌋ tasks, or for odd K ⌊K/2⌋ or ⌈K/2⌉ with probability 1/2 each (at least one), chosen
    uniformly among the tasks.
    """
    size = torch.full((num_batches,), num_tasks // 2)
    if num_tasks % 2:
        size += torch.randint(2, (num_batches,), generator=generator)
    size.clamp_(min=1)
    rank = torch.rand(num_batches, num_tasks, generator=generator).argsort(1).argsort(1)
    return rank < size[:, None]


def fixed_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """The training set cut once into batches of ``batch_size`` (a seeded permutation)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


@torch.no_grad()
def eval_losses(model: nn.Module, split: Split, data: MTLData) -> list[float]:
    """Each task's loss (:func:`benchmarks.metrics.task_loss`) on the whole ``split``."""
    was_training = model.training
    model.eval()
    out = model(split.x)
    model.train(was_training)
    return [task_loss(t, o, y).item() for t, o, y in zip(data.tasks, out, split.ys)]


def _optimizer(mode: str, method: str, model: nn.Module, ctx: Context) -> mtl_optim.MTLOptimizer:
    # the trunk is named shared: the first batch of a partial run already misses tasks, so the
    # optimizer cannot find the shared parameters in that batch's graph
    trunk, heads = cast(nn.Module, model.trunk), cast(nn.Module, model.heads)
    groups: Any = [  # param groups, which MTLOptimizer accepts in place of parameters
        {"params": list(trunk.parameters()), "shared": True},
        {"params": list(heads.parameters())},
    ]
    if mode == "zero-arg":
        if method != "adatask":
            raise ValueError(f"mode 'zero-arg' is AdaTask's own zero-fill, not {method!r}'s")
        return mtl_optim.AdaTask(groups, base=torch.optim.Adam, lr=ctx.lr, missing="zero")
    return build(method, groups, ctx)


@dataclass
class Schedule:
    """The batches of one run in order: ``(sample ids, labelled tasks)`` per step, where the
    labelled tasks are a ``(K,)`` bool mask or ``None`` (every task); an empty id tensor ends
    an epoch (a pass over the data). ``labels``: how many labels the run may use."""

    steps: list[tuple[Tensor, Tensor | None]]
    labels: int
    batches_per_epoch: int


def schedule(
    n: int, num_tasks: int, mode: str, seed: int, epochs: int, batch_size: int
) -> Schedule:
    """The batches and labels of a run in ``mode`` (a :data:`MODES` key) on ``n`` samples.

    The same ``seed`` gives every mode the same label draw and every mode but the subsets the
    same batches in the same order.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    k = num_tasks
    batches = fixed_batches(n, batch_size, torch.Generator().manual_seed(20_000 + seed))
    mask = label_mask(len(batches), k, torch.Generator().manual_seed(10_000 + seed))
    kept = int(sum(len(b) * int(row.sum()) for b, row in zip(batches, mask)))
    order = torch.Generator().manual_seed(seed)
    plan: list[tuple[Tensor, Tensor | None]] = []
    if mode in ("subset", "subset-epochs"):
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(30_000 + seed))
        keep = keep[: math.ceil(kept / k)]
        per_pass = math.ceil(len(keep) / batch_size)
        steps = epochs * (per_pass if mode == "subset-epochs" else len(batches))
        taken = 0
        while taken < steps:  # passes over the subset until the step budget is spent
            for i in torch.randperm(len(keep), generator=order).split(batch_size)[: steps - taken]:
                plan.append((keep[i], None))
                taken += 1
            plan.append((END, None))
        return Schedule(plan, len(keep) * k, per_pass)
    for _ in range(epochs):
        plan += [
            (batches[b], None if mode == "full" else mask[b])
            for b in torch.randperm(len(batches), generator=order).tolist()
        ]
        plan.append((END, None))
    return Schedule(plan, n * k if mode == "full" else kept, len(batches))


def run(
    data: MTLData, mode: str, method: str, seed: int, epochs: int, batch_size: int, lr: float
) -> Run:
    """Train ``method`` (a :data:`benchmarks.methods.METHODS` key) in ``mode`` (a :data:`MODES`
    key) with ``seed`` on the batches of :func:`schedule`; every run of a seed starts from the
    same initial weights."""
    k = len(data.tasks)
    plan = schedule(len(data.train), k, mode, seed, epochs, batch_size)
    torch.manual_seed(seed)
    model = build_model(data)
    opt = _optimizer(mode, method, model, Context(k, seed, lr, plan.batches_per_epoch))
    x_all, ys_all = data.train.x, data.train.ys
    start = time.perf_counter()
    for idx, labelled in plan.steps:
        if not len(idx):  # the end of an epoch (a pass over the subset)
            opt.end_epoch()
            continue
        out = model(x_all[idx])
        full = [task_loss(t, o, y[idx]) for t, o, y in zip(data.tasks, out, ys_all)]
        losses: list[Tensor | None] = list(full)
        if labelled is not None:
            for i in (~labelled).nonzero().flatten().tolist():
                losses[i] = 0 * full[i] if mode == "zero" else None
        opt.zero_grad()
        opt.backward(losses)  # None: a task without labels
        opt.step()
    seconds = time.perf_counter() - start
    test = evaluate(model, data.test, data.tasks, 4096)
    steps = sum(1 for idx, _ in plan.steps if len(idx))
    losses_ = eval_losses(model, data.test, data)
    return Run(mode, method, seed, test, losses_, plan.labels, steps, seconds)


def _cell(values: Sequence[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def render(data: MTLData, runs: Sequence[Run]) -> str:
    """The results table: one row per (mode, method), mean ± std over seeds."""
    tasks = data.tasks
    hb = [t.higher_better for t in tasks]
    digits = [3 if t.kind == "binary" else 2 for t in tasks]
    ref = {(r.method, r.seed): r.test for r in runs if r.mode == "full"}
    headers = [
        "labels",
        "method",
        *(f"{t.name} {t.metric}" for t in tasks),
        "Δm vs full, same method %",
        "Δm vs full, equal %",
        "labels used",
        "steps",
        "s / run",
    ]
    rows = []
    for mode, method in dict.fromkeys((r.mode, r.method) for r in runs):
        group = [r for r in runs if (r.mode, r.method) == (mode, method)]
        cells = [_cell([r.test[i] for r in group], digits[i]) for i in range(len(tasks))]
        same = [
            delta_m(r.test, ref[(method, r.seed)], hb) for r in group if (method, r.seed) in ref
        ]
        eq = [
            delta_m(r.test, ref[("equal", r.seed)], hb) for r in group if ("equal", r.seed) in ref
        ]
        rows.append(
            [
                MODES[mode],
                METHODS[method].label,
                *cells,
                _cell(same, 2) if same else "—",
                _cell(eq, 2) if eq else "—",
                f"{100 * group[0].labels / (len(data.train) * len(tasks)):.0f} %",
                group[0].steps,
                f"{statistics.mean(r.seconds for r in group):.1f}",
            ]
        )
    return markdown_table(headers, rows)


def _section(data: MTLData, runs: Sequence[Run], budget: Budget, seeds: int) -> str:
    k, n = len(data.tasks), len(data.train)
    per_batch = "⌊K/2⌋ or ⌈K/2⌉ (probability 1/2 each)" if k % 2 else "K/2"
    return "\n\n".join(
        [
            f"## {data.name}: {n} training / {len(data.test)} test samples, K = {k}",
            f"Adam lr {budget.lr:g}, batch {budget.batch_size}, {budget.epochs} epoch(s) = "
            f"{math.ceil(n / budget.batch_size) * budget.epochs} optimizer steps for every run "
            f"but the same-epochs subset; seeds {list(range(seeds))}. Each batch labels "
            f"{per_batch} tasks.",
            render(data, runs),
        ]
    )


def main(argv: list[str] | None = None) -> str:
    """Run the comparison and write ``partial_labels[-quick].md``; returns the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MultiDigits, 1 seed, 1 epoch")
    parser.add_argument(
        "--dataset", action="append", choices=sorted(BUDGETS), help="repeatable (default: all)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train", type=int, default=None, help="training samples used (all)")
    parser.add_argument("--eval", type=int, default=None, help="test samples used (all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder (default {RESULTS})")
    args = parser.parse_args(argv)
    names = args.dataset or (["multidigits"] if args.quick else list(BUDGETS))
    seeds = 1 if args.quick else args.seeds
    n_train = args.train if args.train is not None else (2000 if args.quick else None)
    n_eval = args.eval if args.eval is not None else (1000 if args.quick else None)
    torch.set_num_threads(1)  # small models: one thread is fastest and fair to a shared machine

    total = time.perf_counter()
    sections = []
    for name in names:
        budget = BUDGETS[name]
        if args.quick:
            budget = Budget(1, budget.batch_size, budget.lr)
        runs: list[Run] = []
        for seed in range(seeds):
            data = load(name, seed).head(n_train, n_eval)
            for mode, method in VARIANTS:
                runs.append(
                    run(data, mode, method, seed, budget.epochs, budget.batch_size, budget.lr)
                )
            print(f"{name} seed {seed} done ({time.perf_counter() - total:.0f} s)", flush=True)
        sections.append(_section(data, runs, budget, seeds))
    text = "\n\n".join(
        [
            f"# Partial labels: test metrics, mean ± std over {seeds} seed(s)",
            machine_line(),
            f"`python -m benchmarks.partial_labels{' --quick' if args.quick else ''}`; the "
            "benchmarks' MLP (`benchmarks/models.py`), the data of `benchmarks/data.py`; one "
            "thread; `s / run` is the training time only.",
            _SETUP,
            *sections,
            f"Total wall time {time.perf_counter() - total:.0f} s.",
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"partial_labels{'-quick' if args.quick else ''}.md"
    path.write_text(text + "\n")
    print(f"written to {path}")
    return text


_SETUP = """What each row did (same seed: same initial weights, same label draw):

* the training set is cut once (seeded) into batches; each batch labels one random half of the
  tasks, fixed for the whole run; every epoch visits the same batches in a new order, so no
  removed label is ever seen;
* **partial**: every batch, `opt.backward` with `None` for the unlabelled tasks;
* **fully labelled subset**: the practice partial labels replace: a random subset of samples
  with all their labels, as many labels as the partial runs kept (⌈kept labels / K⌉ samples);
  *same steps*: trained for as many optimizer steps as the partial runs (more passes over fewer
  samples, `end_epoch()` after each pass); *same epochs*: as many passes as the partial runs
  (half the steps);
* **zero-fill**: the partial runs' batches with `0 * loss` for an unlabelled task (a present
  task with a zero gradient: with plain Adam its head keeps moving on its momentum, AdaTask's
  moments of it decay, MGDA's convex hull then contains the zero vector);
  `AdaTask(missing="zero")` is AdaTask's own version: a zero row for the shared parameters,
  the missing task's head left alone (`grad = None`);
* **full labels**: every label of every batch.

Δm (`benchmarks/metrics.py`; lower is better) is computed per seed against the same seed's
full-label run (of the same method, and of equal weighting) and then averaged."""


if __name__ == "__main__":
    main()
