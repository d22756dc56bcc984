"""Data-parallel step time on CPU: one process vs two (gloo), same global batch.

    python -m benchmarks.ddp            # -> results/ddp.md
    python -m benchmarks.ddp --quick    # -> results/ddp-quick.md

Each rank uses one thread and half of the global batch. For Nash-MTL both ways of sharing the
per-task information are timed: the Jacobian route (one all-reduce of the ``(K, d)`` per-task
gradients) and the Gramian route (an all-reduce of the ``K×K`` Gramian plus one of the combined
gradient). The table gives the median step time of rank 0 and the speed-up of two processes.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

import mtl_optim
from mtl_optim import aggregators

from ._timing import SharedMLP, make_batch, markdown_table, mse_losses, report

K = 4


def factories():
    return {
        "sum (no method)": lambda p: mtl_optim.MTLOptimizer(p, base=torch.optim.Adam, lr=1e-4),
        "AdaTask": lambda p: mtl_optim.AdaTask(p, base=torch.optim.Adam, lr=1e-4),
        "Nash-MTL, J all-reduce": lambda p: mtl_optim.MTLOptimizer(
            p, base=torch.optim.Adam, lr=1e-4, aggregator=aggregators.NashMTL()
        ),
        "Nash-MTL, Gramian route": lambda p: mtl_optim.MTLOptimizer(
            p, base=torch.optim.Adam, lr=1e-4, aggregator=aggregators.NashMTL(), route="gramian"
        ),
    }


def timed_steps(name: str, width: int, batch: int, steps: int, rank: int, world: int) -> float:
    torch.manual_seed(0)
    model = SharedMLP(64, width, 1, K)
    opt = factories()[name](model.parameters())
    x, ys = make_batch(batch, (64,), 1, K)
    n = batch // world
    x, ys = x[rank * n : (rank + 1) * n], [y[rank * n : (rank + 1) * n] for y in ys]
    times = []
    for i in range(steps + 3):
        if world > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        opt.backward(mse_losses(model, x, ys))
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(rank: int, world: int, init: str, out: str, grid, steps: int) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = {}
        for width, batch in grid:
            for name in factories():
                result[(name, width, batch)] = timed_steps(name, width, batch, steps, rank, world)
        if rank == 0:
            torch.save(result, out)
        torch.distributed.barrier()  # both ranks leave together: gloo aborts on a lone exit
    finally:
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = [(64, 64)] if args.quick else [(256, 256), (1024, 256), (1024, 1024)]
    steps = 5 if args.quick else 30
    single = {
        (name, w, b): timed_steps(name, w, b, steps, 0, 1) for w, b in grid for name in factories()
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.pt")
        with socket.socket() as sock:  # a free loopback port for the TCP store
            sock.bind(("127.0.0.1", 0))
            init = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
        mp.spawn(worker, args=(2, init, out, grid, steps), nprocs=2, join=True)
        double = torch.load(out)
    rows = []
    for (name, w, b), t1 in single.items():
        t2 = double[(name, w, b)]
        rows.append((name, w, b, f"{t1 * 1e3:.2f}", f"{t2 * 1e3:.2f}", f"{t1 / t2:.2f}×"))
    table = markdown_table(
        ["method", "width", "global batch", "1 process ms", "2 processes ms", "speed-up"], rows
    )
    notes = (
        f"K = {K}, Adam, input 64, two hidden layers of `width`; each rank one thread and half "
        "of the global batch; gloo over loopback on one machine; median of "
        f"{steps} steps after 3 warm-up steps, rank 0's clock, a barrier before each step."
    )
    report("ddp", "Data-parallel step time (CPU, gloo)", table, notes, quick=args.quick)


if __name__ == "__main__":
    main()
