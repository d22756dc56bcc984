"""All microbenchmarks in one run: step overhead per method, memory, aggregator solve times.

    python -m benchmarks.micro            # -> results/micro.md
    python -m benchmarks.micro --quick    # -> results/micro-quick.md

1. **Step overhead**: one training step (forward, ``opt.backward``, ``opt.step``; FAMO also
   re-evaluates the losses for ``opt.update_weighting``) of every method of the main job's
   registry (``benchmarks/methods.py``) plus Nash-MTL's Gramian route, as a ratio to a plain
   ``sum(losses).backward(); Adam.step()`` on the same model and batch, interleaved, for K in
   {2, 4, 8} and two model sizes.
2. **Memory**: growth of peak memory over the first three steps of each method from a fresh
   optimizer (state allocation included), next to the plain Adam step's.
3. **Aggregator solve times** on a ``(K, 1e5)`` matrix and Nash-MTL's Newton solver vs cvxpy
   (see ``benchmarks/aggregators.py`` for the full grid).
"""

from __future__ import annotations

import argparse
import copy

import torch

import mtl_optim

from . import methods as registry
from ._timing import SharedMLP, make_batch, markdown_table, mse_losses, report, time_fns
from .aggregators import nash_solvers, time_aggregators
from .train import PeakMemory


def optimizers(k: int) -> dict[str, tuple]:
    """label -> (factory(params), re-evaluate losses after step?)"""
    ctx = registry.Context(num_tasks=k, seed=0, lr=1e-4, steps_per_epoch=10)
    out = {}
    for name, method in registry.METHODS.items():
        if name == registry.STL or registry.unavailable(name, k):
            continue
        out[method.label] = (lambda p, m=method: m.build(p, ctx), method.reevaluate)
    out["Nash-MTL (Gramian route)"] = (
        lambda p: mtl_optim.MTLOptimizer(
            p,
            base=torch.optim.Adam,
            lr=1e-4,
            aggregator=mtl_optim.aggregators.NashMTL(),
            route="gramian",
        ),
        False,
    )
    return out


def step_fn(model, opt, x, ys, reevaluate: bool):
    def step() -> None:
        opt.zero_grad()
        opt.backward(mse_losses(model, x, ys))
        opt.step()
        if reevaluate:
            with torch.no_grad():
                opt.update_weighting(mse_losses(model, x, ys))

    return step


def plain_fn(model, opt, x, ys):
    def step() -> None:
        opt.zero_grad()
        sum(mse_losses(model, x, ys)).backward()
        opt.step()

    return step


def overhead(k: int, width: int, repeat: int) -> list[tuple]:
    torch.manual_seed(0)
    template = SharedMLP(64, width, 1, k)
    x, ys = make_batch(128, (64,), 1, k)
    n_params = sum(p.numel() for p in template.trunk.parameters())
    fns, memory = {}, {}
    plain = copy.deepcopy(template)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-4)
    with PeakMemory("cpu") as mem:
        for _ in range(3):
            plain_fn(plain, plain_opt, x, ys)()
    fns["Adam on sum(losses)"], memory["Adam on sum(losses)"] = (
        plain_fn(plain, plain_opt, x, ys),
        mem.mb,
    )
    for label, (factory, reevaluate) in optimizers(k).items():
        model = copy.deepcopy(template)
        opt = factory(model.parameters())
        fn = step_fn(model, opt, x, ys, reevaluate)
        with PeakMemory("cpu") as mem:
            for _ in range(3):
                fn()
        fns[label], memory[label] = fn, mem.mb
        for _ in range(10):  # past epoch-based warm-ups (IGB, DWA need two epochs)
            fn()
        opt.end_epoch()
        for _ in range(10):
            fn()
        opt.end_epoch()
    times = time_fns(fns, warmup=2, repeat=repeat)
    base = times["Adam on sum(losses)"][0]
    return [
        (
            label,
            k,
            f"{width} ({n_params / 1e6:.2f}M shared)",
            f"{med * 1e3:.2f}",
            f"{med / base:.2f}×",
            f"{memory[label]:.1f}",
        )
        for label, (med, _) in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        grid, repeat, agg_ks, d, nash_ks, steps = [(2, 64)], 3, [2, 5], 10_000, [2], 5
    else:
        grid = [(k, w) for w in (256, 1024) for k in (2, 4, 8)]
        repeat, agg_ks, d, nash_ks, steps = 10, [2, 5, 10, 20], 100_000, [2, 5, 10], 20
    rows = []
    for k, width in grid:
        rows += overhead(k, width, repeat)
    table = markdown_table(
        ["method", "K", "width", "ms/step", "vs Adam step", "peak MB, first 3 steps"], rows
    )
    aggregators_table = time_aggregators(agg_ks, [d], repeat=5 if not args.quick else 2)
    nash_table, _ = nash_solvers(nash_ks, steps)
    notes = (
        "Step: SharedMLP (input 64, two hidden layers of `width`, K linear heads), batch 128, "
        "Adam lr 1e-4 as the base of every method, one thread, all methods interleaved. "
        "Memory: growth of the process's peak resident set over a fresh optimizer's first three "
        "steps (Linux VmHWM; includes state allocation).\n\n"
        f"## Aggregator time per call (ms), float32 J of d = {d:.0e}\n\n{aggregators_table}\n\n"
        f"## Nash-MTL: Newton vs cvxpy on warm-started Gramian sequences\n\n{nash_table}"
    )
    report("micro", "Microbenchmarks: step overhead and memory per method", table, notes,
           quick=args.quick)  # fmt: skip


if __name__ == "__main__":
    main()
