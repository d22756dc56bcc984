"""Training runs used by ``test_distributed.py``: the same loop in one process or on a rank."""

from __future__ import annotations

import torch
from conftest import batches, make_model
from helpers import run_rank

import mtl_optim
from mtl_optim import aggregators, weighting

K = 3
STEPS = 20
EPOCH = 5  # steps per "epoch" for IGB's end_epoch


def configs():
    """name -> (optimizer factory, equal to one process on the whole batch?)"""
    return {
        "adatask": (lambda p: mtl_optim.AdaTask(p, base=torch.optim.Adam, lr=1e-2), True),
        "nash": (
            lambda p: mtl_optim.MTLOptimizer(
                p, base=torch.optim.SGD, lr=0.05, aggregator=aggregators.NashMTL()
            ),
            True,
        ),
        "pcgrad": (
            lambda p: mtl_optim.MTLOptimizer(
                p, base=torch.optim.SGD, lr=0.05, aggregator=aggregators.PCGrad(seed=0)
            ),
            True,
        ),
        "igb": (
            lambda p: mtl_optim.MTLOptimizer(
                p, base=torch.optim.Adam, lr=1e-2, weighting=weighting.IGB()
            ),
            True,
        ),
        "rlw": (
            lambda p: mtl_optim.MTLOptimizer(
                p, base=torch.optim.Adam, lr=1e-2, weighting=weighting.RLW(seed=0)
            ),
            True,
        ),
        # MGDA-UB / Nash-MTL on representation gradients: the Gramian is summed over ranks
        "mgda-ub": (
            lambda p: mtl_optim.MTLOptimizer(
                p, base=torch.optim.SGD, lr=0.05, aggregator=aggregators.MGDA()
            ),
            True,
        ),
        "nash-ub": (
            lambda p: mtl_optim.MTLOptimizer(
                p, base=torch.optim.SGD, lr=0.05, aggregator=aggregators.NashMTL()
            ),
            True,
        ),
        # seed=None differs per process: rank 0's generator state is broadcast at the start
        "rlw-unseeded": (
            lambda p: mtl_optim.MTLOptimizer(
                p, base=torch.optim.Adam, lr=1e-2, weighting=weighting.RLW()
            ),
            False,
        ),
        # the Gramian route averages per-rank Gramians: ranks agree, not equal to one process
        "mgda-gramian": (
            lambda p: mtl_optim.MTLOptimizer(
                p, base=torch.optim.SGD, lr=0.05, aggregator=aggregators.MGDA(), route="gramian"
            ),
            False,
        ),
    }


def train(name: str, rank: int = 0, world: int = 1, ddp_wrap: bool = False) -> list[torch.Tensor]:
    """Train config ``name`` for STEPS steps on this rank's share of every batch."""
    factory, _ = configs()[name]
    model = make_model(K, seed=0)
    net = model
    if ddp_wrap:
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = factory(model.parameters())
    for step, (x, ys) in enumerate(batches(K, STEPS, seed=1)):
        n = x.shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        x, ys = x[part], [y[part] for y in ys]
        opt.zero_grad()
        if ddp_wrap:
            with net.no_sync():  # the optimizer averages the gradients itself
                outs = net(x)
                losses = [((o - y) ** 2).mean() for o, y in zip(outs, ys)]
                opt.backward(losses)
        elif name.endswith("-ub"):
            z = model.trunk(x)
            losses = [((h(z) - y) ** 2).mean() for h, y in zip(model.heads, ys)]
            opt.backward(losses, features=z)
        else:
            opt.backward(model.losses(x, ys))
        opt.step()
        if (step + 1) % EPOCH == 0:
            opt.end_epoch()
    return [p.detach().clone() for p in model.parameters()]


def worker(rank: int, world: int, init_method: str, out_dir: str, names: list[str]) -> None:
    def collect() -> dict:
        results = {name: train(name, rank, world) for name in names}
        results["adatask-ddp-wrapped"] = train("adatask", rank, world, ddp_wrap=True)
        return results

    run_rank(rank, world, init_method, out_dir, collect)
