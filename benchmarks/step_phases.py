"""Where one training step of ``benchmarks/vs_torchjd.py`` spends its time, stage by stage.

    python -m benchmarks.step_phases mlp1024 4 AdaTask [--rounds 200]

Runs ours (``MTLOptimizer`` / ``AdaTask``, ``route="auto"``) and the LibMTL-style loop of the
same case interleaved on one thread (``time.thread_time``), and wraps the stages of
:class:`mtl_optim._pipeline.Pipeline` and the engine in timers: the heads' reverse pass, the
per-task gradients ``J``, the combination, the finite check, the write into ``.grad``, the route
decision and the base step. The wrappers add a few microseconds per call, so the stage times
are for comparing stages, not for ratios (those are ``vs_torchjd``'s). Printed, not saved.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from mtl_optim import _guard, _pipeline, engine, optimizer

from .vs_torchjd import METHODS, MODELS, Case, make_step

STAGES = [
    (_pipeline.Pipeline, "heads", "heads' reverse pass"),
    (engine.TaskGradients, "compute", "per-task gradients J"),
    (_pipeline.Pipeline, "combine", "combination"),
    (_guard.Guard, "check", "finite checks"),
    (engine.TaskGradients, "write_grads", "write into .grad"),
    (_pipeline.Pipeline, "auto_gramian", "route decision"),
    (optimizer.MTLOptimizer, "backward", "backward, in all"),
    (optimizer.MTLOptimizer, "step", "step (the base update)"),
]


def _timed(fn: Callable[..., Any], label: str, spent: collections.Counter) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - start

    return call


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("k", type=int)
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spent: collections.Counter = collections.Counter()
    saved = [(cls, name, getattr(cls, name)) for cls, name, _ in STAGES]
    for (cls, name, label), (_, _, fn) in zip(STAGES, saved):
        setattr(cls, name, _timed(fn, label, spent))
    try:
        case = Case(args.model, args.k, args.method)
        steps = {variant: make_step(case, variant) for variant in ("ours", "loop")}
        for step in steps.values():  # warm-up: lazy imports, Adam's state
            step()
            step()
        spent.clear()
        times: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(args.rounds):
            for name in list(steps)[r % 2 :] + list(steps)[: r % 2]:
                start = time.thread_time()
                steps[name]()
                times[name].append(time.thread_time() - start)
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(f"{args.model} K={args.k} {args.method}, {args.rounds} interleaved rounds, one thread")
    print(f"step, median ms: ours {medians['ours']:.2f}, LibMTL-style loop {medians['loop']:.2f}")
    print("ours, mean ms per step and stage:")
    for _, _, label in STAGES:
        if label in spent:
            print(f"  {label:26s} {spent[label] / args.rounds * 1e3:8.3f}")


if __name__ == "__main__":
    main()
