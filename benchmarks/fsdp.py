"""Exact per-task methods across processes: DDP (replicated model) vs FSDP2 (``fully_shard``).

    python -m benchmarks.fsdp            # -> results/fsdp.md
    python -m benchmarks.fsdp --quick    # -> results/fsdp-quick.md (small model, one step)

CPU and gloo only: 1, 2 and 4 processes on one machine, one thread each, the same global batch
split evenly. The model is a stack of transformer encoder blocks (about 22 M shared parameters
in the full run) with K linear heads on the mean-pooled sequence. For every process count, K and
method (AdaTask, UPGrad, PCGrad) it measures, per rank:

* the step time (median of the timed steps, rank 0's clock, a barrier before each step);
* the memory: the peak growth of the resident set during the case (sampled every 2 ms, the
  largest over the ranks) and the exact bytes of what the optimizer keeps per rank
  (parameters, gradients, base optimizer state, AdaTask's per-task state and ``J``);
* the communication: every call of the ``torch.distributed`` collectives the optimizer and FSDP2
  make is counted with the bytes it is given (all-reduce, all-gather and reduce-scatter
  payloads at full size), and converted to what a bandwidth-optimal ring sends per rank:
  ``2(R-1)/R`` of the payload for an all-reduce, ``(R-1)/R`` for an all-gather or a
  reduce-scatter.

What to expect per step, with ``d`` parameters (``d_s`` shared), K tasks and R ranks:

* DDP (mtl_optim's exact data-parallel path): one all-reduce of the ``(K, d_s)`` per-task
  gradients (plus the task-specific gradients and the K loss values): ring traffic
  ``2(R-1)/R · K·d_s`` per rank; memory per rank ``K·d_s`` for ``J`` (AdaTask: plus
  ``2K·d_s`` moments).
* FSDP2: K reduce-scatters of the gradient (one per task's backward) plus one all-reduce of
  ``K×K`` numbers; the parameters are all-gathered for the forward pass and again for every
  backward pass that follows a reshard. With ``reshard_after_forward=False`` the forward
  pass's all-gather serves the first backward pass and each later one all-gathers again: ring
  traffic ``(R-1)/R · 2K·d`` per rank, as much as DDP's; with ``True`` one all-gather more
  per unit, ``(2K + 1)``; keeping the unsharded parameters through the K passes
  (``set_reshard_after_backward(False)``, then ``reshard()``) leaves one all-gather,
  ``(K + 1)``. Memory per rank: ``K·d_s/R`` for ``J`` (AdaTask: plus ``2K·d_s/R``).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import socket
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import FSDPModule

import mtl_optim
from mtl_optim import aggregators

from ._timing import markdown_table, report

COLLECTIVES = {  # name -> (position and keyword of the full-size tensor, ring factor(R))
    "all_reduce": (0, "tensor", lambda r: 2 * (r - 1) / r),
    "all_gather_single": (0, "output_tensor", lambda r: (r - 1) / r),
    "all_gather_into_tensor": (0, "output_tensor", lambda r: (r - 1) / r),
    "reduce_scatter_single": (1, "input", lambda r: (r - 1) / r),
    "reduce_scatter_tensor": (1, "input", lambda r: (r - 1) / r),
    "broadcast": (0, "tensor", lambda r: (r - 1) / r),
}


class Model(nn.Module):
    """Transformer encoder blocks (the shared trunk) and K linear heads on the mean token."""

    def __init__(self, k: int, width: int, layers: int, heads: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(k))

    def forward(self, x: torch.Tensor, ys: torch.Tensor) -> list[torch.Tensor]:
        """The K losses (FSDP2's hooks run around the root module's call)."""
        for block in self.blocks:
            x = block(x)
        z = x.mean(dim=1)
        return [((head(z).squeeze(-1) - y) ** 2).mean() for head, y in zip(self.heads, ys)]


def methods() -> dict[str, Any]:
    return {
        "AdaTask": lambda p: mtl_optim.AdaTask(p, base=torch.optim.Adam, lr=1e-4),
        "UPGrad": lambda p: mtl_optim.MTLOptimizer(
            p, base=torch.optim.Adam, lr=1e-4, aggregator=aggregators.UPGrad()
        ),
        "PCGrad": lambda p: mtl_optim.MTLOptimizer(
            p, base=torch.optim.Adam, lr=1e-4, aggregator=aggregators.PCGrad(seed=0)
        ),
    }


class Counter:
    """Counts the ``torch.distributed`` collectives called (by name) and their payload bytes."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.active = False
        for name, (position, keyword, _) in COLLECTIVES.items():
            original = getattr(torch.distributed, name)

            def counted(*args, _original=original, _name=name, _at=(position, keyword), **kw):
                if self.active:
                    tensor = args[_at[0]] if len(args) > _at[0] else kw.get(_at[1])
                    if isinstance(tensor, torch.Tensor):
                        self.calls[_name] += 1
                        self.bytes[_name] += tensor.numel() * tensor.element_size()
                return _original(*args, **kw)

            setattr(torch.distributed, name, counted)

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()

    def ring_bytes(self) -> float:
        return sum(COLLECTIVES[n][2](self.world) * b for n, b in self.bytes.items())


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread; ``peak`` is the largest value seen."""

    def __init__(self) -> None:
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss())


def state_bytes(model: nn.Module, opt: Any) -> int:
    """Bytes of this rank's parameters, gradients, optimizer state and ``J``."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    def size(t: Any) -> int:
        return local(t).numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    total = sum(size(p) + (size(p.grad) if p.grad is not None else 0) for p in model.parameters())
    total += sum(size(v) for st in opt.state.values() for v in st.values())
    for st in getattr(opt, "_task_state", {}).values():
        total += sum(size(v) for v in st.values())
    jacobian = opt._engine._jacobian
    return total + (size(jacobian) if jacobian is not None else 0)


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def run_case(case: dict, rank: int, world: int, counter: Counter, grid: dict) -> dict:
    k, mode = case["k"], case["mode"]
    trim()
    base = rss()
    peak = PeakRSS()
    torch.manual_seed(0)
    model = Model(k, grid["width"], grid["layers"])
    if mode.startswith("FSDP"):
        from torch.distributed.fsdp import fully_shard

        # "FSDP2 reshard": reshard after the forward pass too (all-gathers before each of the
        # K backward passes); "FSDP2 keep": keep the unsharded parameters through the K passes
        # and reshard once after them (one all-gather per step, more memory)
        reshard = mode == "FSDP2 reshard"
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
    opt = methods()[case["method"]](model.parameters())
    g = torch.Generator().manual_seed(1)
    batch, tokens = grid["batch"], grid["tokens"]
    x = torch.randn(batch, tokens, grid["width"], generator=g)
    ys = torch.randn(k, batch, generator=g)
    n = batch // world
    x, ys = x[rank * n : (rank + 1) * n], ys[:, rank * n : (rank + 1) * n]
    times = []
    for step in range(grid["warmup"] + grid["steps"]):
        timed = step >= grid["warmup"]
        torch.distributed.barrier()
        counter.active = timed
        t0 = time.perf_counter()
        opt.zero_grad()
        if mode == "FSDP2 keep":  # all-gather once: keep the parameters through the K passes
            model.set_reshard_after_backward(False)
            opt.backward(model(x, ys))
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        else:
            opt.backward(model(x, ys))
        opt.step()
        if timed:
            times.append(time.perf_counter() - t0)
        counter.active = False
    out = {
        "time": statistics.median(times),
        "peak": peak.stop() - base,
        "state": state_bytes(model, opt),
        "calls": {n: c / grid["steps"] for n, c in counter.calls.items()},
        "payload": sum(counter.bytes.values()) / grid["steps"],
        "ring": counter.ring_bytes() / grid["steps"],
        "shared": sum(p.numel() for p in opt.shared_params),
    }
    counter.reset()
    del model, opt
    trim()
    return out


def worker(rank: int, world: int, init: str, out: str, cases: list, grid: dict) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        counter = Counter(world)
        # warm-up: first use of the libraries (allocator arenas, FSDP, lazy imports) is not
        # charged to the first case
        small = {**grid, "width": 64, "layers": 1, "warmup": 1, "steps": 1}
        for mode in ("DDP", "FSDP2"):
            run_case({"mode": mode, "k": 2, "method": "AdaTask"}, rank, world, counter, small)
        results = []
        for case in cases:
            mine = run_case(case, rank, world, counter, grid)
            every: list[Any] = [None] * world
            torch.distributed.all_gather_object(every, mine)
            results.append(
                {
                    **mine,
                    "peak": max(r["peak"] for r in every),
                    "state": max(r["state"] for r in every),
                }
            )
            if rank == 0:
                done = case | {"time": round(mine["time"], 3)}
                print(f"  R={world} {done}", flush=True)
        if rank == 0:
            torch.save(results, out)
        torch.distributed.barrier()  # all ranks leave together: gloo aborts on a lone exit
    finally:
        torch.distributed.destroy_process_group()


def cases_for(world: int, ks: list[int]) -> list[dict]:
    out = [
        {"mode": mode, "k": k, "method": method}
        for k in ks
        for method in methods()
        for mode in ("DDP", "FSDP2")
    ]
    if world > 1 and 4 in ks:  # the other FSDP2 resharding choice, once per process count
        out.append({"mode": "FSDP2 reshard", "k": 4, "method": "AdaTask"})
        out.append({"mode": "FSDP2 keep", "k": 4, "method": "AdaTask"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        grid = dict(width=128, layers=2, batch=4, tokens=8, warmup=1, steps=1)
        worlds, ks = (1, 2), [2, 4]
    else:
        grid = dict(width=512, layers=7, batch=4, tokens=8, warmup=1, steps=2)
        worlds, ks = (1, 2, 4), [2, 4, 8]
    rows = []
    for world in worlds:
        cases = cases_for(world, ks)
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "fsdp.pt")
            with socket.socket() as sock:  # a free loopback port for the TCP store
                sock.bind(("127.0.0.1", 0))
                init = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
            mp.spawn(worker, args=(world, init, out, cases, grid), nprocs=world, join=True)
            results = torch.load(out, weights_only=False)
        for case, r in zip(cases, results):
            calls = ", ".join(
                f"{int(c) if c == int(c) else c} {n.replace('_single', '').replace('_', '-')}"
                for n, c in sorted(r["calls"].items())
            )
            rows.append(
                (
                    world,
                    case["mode"],
                    case["k"],
                    case["method"],
                    f"{r['time'] * 1e3:.0f}",
                    f"{r['peak'] / 2**20:.0f}",
                    f"{r['state'] / 2**20:.0f}",
                    calls or "none",
                    f"{r['payload'] / 2**20:.1f}",
                    f"{r['ring'] / 2**20:.1f}",
                )
            )
    table = markdown_table(
        [
            "processes",
            "mode",
            "K",
            "method",
            "step ms",
            "peak RSS growth MB/rank",
            "optimizer-held MB/rank",
            "collectives per step",
            "payload MB/step",
            "ring traffic MB/rank/step",
        ],
        rows,
    )
    shared = Model(1, grid["width"], grid["layers"]).blocks
    d_s = sum(p.numel() for p in shared.parameters())
    notes = (
        f"CPU only, gloo over loopback on one machine (2 cores shared with other jobs: times "
        f"are indicative; compare rows of one run). Model: {grid['layers']} transformer "
        f"encoder blocks of width {grid['width']} (d_s = {d_s / 1e6:.1f} M shared parameters, "
        f"float32) and K linear heads; global batch {grid['batch']} sequences of "
        f"{grid['tokens']} tokens, split evenly; Adam; one thread per process; "
        f"{grid['warmup']} warm-up step(s), then the median of {grid['steps']}. "
        "DDP = replicated model, mtl_optim averages the (K, d_s) per-task gradients itself "
        "(one all-reduce, exact); FSDP2 = each block and the root passed to fully_shard with "
        'reshard_after_forward=False ("FSDP2 reshard": True). '
        "Peak RSS growth: the largest rise of the resident set during the case over the ranks "
        "(includes activations and temporaries). Optimizer-held: parameters, gradients, base "
        "optimizer state, AdaTask's per-task moments and the J buffer on the largest rank. "
        "Collectives and bytes are counted at the torch.distributed calls (the scalar "
        "all-reduces inside clip_grad_norm_ on DTensors go through functional collectives "
        "and are not counted); ring traffic = 2(R-1)/R of an all-reduce's payload and (R-1)/R "
        "of an all-gather's or reduce-scatter's."
    )
    report("fsdp", "DDP vs FSDP2 for exact per-task methods (CPU, gloo)", table, notes, args.quick)
    # results/fsdp.md then gets a "Reading:" paragraph by hand: the measured numbers it quotes
    # change with every run.


if __name__ == "__main__":
    main()
