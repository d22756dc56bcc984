"""Weights from a small ``K×K`` Gramian on the CPU: Python floats vs the tensor path.

    python -m benchmarks.small_k_weights           # -> results/small_k_weights.md
    python -m benchmarks.small_k_weights --quick   # -> results/small_k_weights-quick.md

UPGrad, DualProj, MGDA and IMTL-G compute their weights from the ``K×K`` Gramian alone. For
``K ≤ mtl_optim.aggregators._small_k.SMALL_K`` a CPU Gramian is read into Python floats and
the same algorithm runs in plain float arithmetic ("new"); otherwise on torch/NumPy arrays
("old"). Here both run side by side on the same Gramian, interleaved, on one thread, timed with
``time.thread_time``; ``SMALL_K`` is switched per call, so K above the default shows where the
crossover lies. The Gramian: K Gaussian rows of length 64, the second made to conflict with the
first (so the dual-cone projections are active). The weights of both paths are compared first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from mtl_optim.aggregators import IMTLG, MGDA, DualProj, UPGrad, _small_k

from ._timing import markdown_table, report

METHODS: dict[str, Callable[[], object]] = {
    "UPGrad": UPGrad,
    "DualProj": DualProj,
    "MGDA": MGDA,
    "IMTL-G": IMTLG,
}


def gramian(k: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((k, 64))
    j[1] = -j[0] + 0.3 * j[1]
    return torch.from_numpy(j @ j.T)


def path(agg, gram: torch.Tensor, small_k: int) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        saved = _small_k.SMALL_K
        _small_k.SMALL_K = small_k
        try:
            return agg.weights_from_gramian(gram)
        finally:
            _small_k.SMALL_K = saved

    return call


def ratio(old: Callable, new: Callable, rounds: int, calls: int) -> tuple[float, float, float]:
    """``(old µs, new µs, median of the per-round ratios old/new)``, interleaved."""
    times: dict[str, list[float]] = {"old": [], "new": []}
    pair = [("old", old), ("new", new)]
    for r in range(rounds):
        for name, fn in pair if r % 2 == 0 else pair[::-1]:
            t0 = time.thread_time()
            for _ in range(calls):
                fn()
            times[name].append((time.thread_time() - t0) / calls)
    ratios = [o / n for o, n in zip(times["old"], times["new"]) if n > 0]
    return (
        statistics.median(times["old"]) * 1e6,
        statistics.median(times["new"]) * 1e6,
        statistics.median(ratios),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and K values")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ks = [2, 4, 8] if args.quick else [2, 3, 4, 6, 8, 12, 16]
    rounds, calls = (6, 20) if args.quick else (20, 50)
    rows = []
    for k in ks:
        gram = gramian(k)
        for name, make in METHODS.items():
            agg = make()
            old, new = path(agg, gram, 0), path(agg, gram, 10**6)
            want, got = old(), new()
            dev = ((got - want).abs().max() / want.abs().max()).item()
            assert dev < 1e-9, (name, k, dev)
            o, n, r = ratio(old, new, rounds, calls)
            rows.append((k, name, f"{o:.1f}", f"{n:.1f}", f"{r:.2f}", f"{dev:.1e}"))
            print(rows[-1], flush=True)
    table = markdown_table(
        ["K", "method", "old µs", "new µs", "old / new", "max |Δw| / max |w|"], rows
    )
    notes = (
        f"One thread, `time.thread_time`, {rounds} interleaved rounds of {calls} calls; the "
        "ratio is the median of the per-round ratios. `SMALL_K` (the largest K on the new "
        f"path by default) is {_small_k.SMALL_K}."
    )
    report(
        "small_k_weights",
        "Aggregator weights from a small CPU Gramian: Python floats (new) vs tensors (old)",
        table,
        notes,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
