"""The main benchmark: mtl_optim's methods against single-task learning on real data, offline.

    python -m benchmarks                         # the default sweep (see --help for budgets)
    python -m benchmarks --quick                 # MultiDigits, 1 seed, 2 epochs, under a minute
    python -m benchmarks --dataset census --methods stl,equal,adatask,nash --seeds 5

Every method trains the same model from the same initial weights on the same batches, with
Adam and the same learning rate, epochs and batch size. It writes
``<out>/main-<dataset>[-mtan][-quick].md`` (the table), ``.json`` (every run's numbers) and
``<out>/plots/main-<dataset>[-mtan][-quick]-{curves,weights,dominance}.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ._timing import RESULTS
from .data import DATASETS, MissingPackageError, load
from .methods import DEFAULT_METHODS, METHODS, unavailable
from .report import results_json, results_markdown, write
from .train import Config, sweep


@dataclass(frozen=True)
class Budget:
    """Per data set: epochs, batch size, Adam's lr and how much data (``None``: all of it)."""

    epochs: int
    batch_size: int
    lr: float
    n_train: int | None = None
    n_eval: int | None = None


# Chosen by measurement on the shared 2-core machine, one thread: one epoch of the ten default
# methods (STL = K models), evaluation included, takes 70 s (idle machine) to 140 s (load
# average 5) on MultiMNIST, 4-8.5 s on Census and on Census-wide, 1.5-3 s on MultiDigits.
# With 3 seeds the default sweep of all four data sets takes about 14 minutes on an idle
# machine and 26 under load.
BUDGETS = {
    "multidigits": Budget(epochs=8, batch_size=64, lr=1e-3),
    "multimnist": Budget(epochs=3, batch_size=256, lr=1e-3),
    "census": Budget(epochs=4, batch_size=256, lr=1e-3),
    "census-wide": Budget(epochs=4, batch_size=256, lr=1e-3),
}
QUICK = {
    "multidigits": Budget(epochs=2, batch_size=64, lr=1e-3, n_train=4000, n_eval=1000),
    "multimnist": Budget(epochs=2, batch_size=64, lr=1e-3, n_train=4000, n_eval=1000),
    "census": Budget(epochs=2, batch_size=64, lr=1e-3, n_train=4000, n_eval=2000),
    "census-wide": Budget(epochs=2, batch_size=64, lr=1e-3, n_train=4000, n_eval=2000),
}
MODEL_NAMES = {
    ("multimnist", "hps"): "MultiLeNet (HPS)",
    ("multimnist", "mtan"): "MTAN on the LeNet trunk",
    ("multidigits", "mtan"): "MTAN on a 3×3-conv trunk",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="budgets (epochs, batch, lr; --quick: slices): "
        + "; ".join(
            f"{name} {b.epochs}, {b.batch_size}, {b.lr} (quick {q.epochs} epochs on {q.n_train})"
            for (name, b), q in zip(BUDGETS.items(), QUICK.values())
        ),
    )
    p.add_argument(
        "--dataset",
        choices=[*DATASETS, "all"],
        default="all",
        help="data set; 'all' runs them one after the other",
    )
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS), help=f"comma list of {', '.join(METHODS)}"
    )
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; quick 1)")
    p.add_argument("--epochs", type=int, default=None, help="override the data set's budget")
    p.add_argument("--batch-size", type=int, default=None, help="override the budget")
    p.add_argument("--lr", type=float, default=None, help="override the budget")
    p.add_argument("--arch", choices=["hps", "mtan"], default="hps", help="mtan: image sets only")
    p.add_argument(
        "--quick",
        action="store_true",
        help="MultiDigits (unless --dataset), 1 seed, small slices: under a minute on CPU",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _methods(spec: str) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    kept = []
    for name in names:
        reason = unavailable(name)
        if reason is None:
            kept.append(name)
        else:
            print(f"skipping {reason}", file=sys.stderr)
    return kept


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    # The models are tiny: one thread is fastest on the shared 2-core machine, where OpenMP
    # threads spin badly when another process holds a core.
    torch.set_num_threads(args.threads)
    if args.dataset != "all":
        names = [args.dataset]
    elif args.quick:
        names = ["multidigits"]
    else:  # MTAN is an image model
        names = [n for n in DATASETS if args.arch == "hps" or not n.startswith("census")]
    if args.arch == "mtan" and names[0].startswith("census"):
        raise SystemExit("--arch mtan needs image data (multidigits or multimnist)")
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    if n_seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {n_seeds}")
    seeds = list(range(n_seeds))
    methods = _methods(args.methods)
    for name in names:
        budget = (QUICK if args.quick else BUDGETS)[name]
        cfg = Config(
            epochs=budget.epochs if args.epochs is None else args.epochs,
            batch_size=budget.batch_size if args.batch_size is None else args.batch_size,
            lr=budget.lr if args.lr is None else args.lr,
            arch=args.arch,
            device=args.device,
        )
        try:
            data = load(name).head(budget.n_train, budget.n_eval).to(args.device)
        except MissingPackageError as e:
            raise SystemExit(str(e)) from e
        stem = f"main-{name}" + "-mtan" * (args.arch == "mtan") + "-quick" * args.quick
        print(f"{name}: {len(methods)} methods × {len(seeds)} seeds, {cfg}", file=sys.stderr)
        start = time.perf_counter()
        label = f"{name} [{names.index(name) + 1}/{len(names)}]"
        runs = sweep(data, methods, seeds, cfg, progress=not args.no_progress, label=label)
        wall = time.perf_counter() - start
        model = MODEL_NAMES.get((name, args.arch), "MLP (HPS)")
        table = results_markdown(data, runs, cfg, seeds, model, wall)
        print(table)
        written = [
            write(args.out / f"{stem}.md", table),
            write(args.out / f"{stem}.json", results_json(data, runs, cfg, seeds)),
        ]
        if not args.no_plots:
            from .plots import save_plots

            written += save_plots(data, runs, args.out / "plots", stem)
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)


if __name__ == "__main__":
    main()
