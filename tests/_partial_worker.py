"""Training runs for ``test_partial_labels.py``: partial labels on two ranks, and the same
loop in one process with each task's loss averaged over the ranks where it is present."""

from __future__ import annotations

import torch
from conftest import batches, make_model
from helpers import run_rank

import mtl_optim
from mtl_optim import aggregators

K = 3
STEPS = 8
WORLD = 2


def configs():
    """name -> optimizer factory (every one given shared= so a first batch may miss a task)"""
    return {
        "mgda": lambda p, shared: mtl_optim.MTLOptimizer(
            p, base=torch.optim.SGD, lr=0.05, aggregator=aggregators.MGDA(), shared=shared
        ),
        "upgrad": lambda p, shared: mtl_optim.MTLOptimizer(
            p, base=torch.optim.SGD, lr=0.05, aggregator=aggregators.UPGrad(), shared=shared
        ),
        "adatask": lambda p, shared: mtl_optim.AdaTask(
            p, base=torch.optim.Adam, lr=1e-2, shared=shared
        ),
        "sum": lambda p, shared: mtl_optim.MTLOptimizer(
            p, base=torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.1, shared=shared
        ),
    }


def missing(step: int, rank: int) -> set[int]:
    """The tasks without labels on ``rank`` at ``step``: ranks differ, and task 1 is missing
    on both ranks at step 2 (a task absent from the whole batch)."""
    if step == 2:
        return {1}
    if rank == 0:
        return {step % K} if step % 2 else set()
    return {(step + 1) % K, (step + 2) % K} if step % 3 == 0 else {(step + 1) % K}


def train(name: str, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """``world == 1``: one process that sees every rank's half and averages each task's loss
    over the halves where it is present; else this rank's half with ``None`` for its missing
    tasks."""
    model = make_model(K, seed=0)
    opt = configs()[name](model.parameters(), list(model.trunk.parameters()))
    for step, (x, ys) in enumerate(batches(K, STEPS, seed=1)):
        n = x.shape[0] // WORLD
        halves = [slice(r * n, (r + 1) * n) for r in range(WORLD)]
        opt.zero_grad()
        if world > 1:
            part = halves[rank]
            losses = model.losses(x[part], [y[part] for y in ys])
            losses = [None if i in missing(step, rank) else loss for i, loss in enumerate(losses)]
        else:
            per_rank = [model.losses(x[h], [y[h] for y in ys]) for h in halves]
            losses = []
            for i in range(K):
                have = [per_rank[r][i] for r in range(WORLD) if i not in missing(step, r)]
                losses.append(sum(have) / len(have) if have else None)
        opt.backward(losses)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def missing_everywhere(step: int) -> set[int]:
    """FSDP2: every rank misses the same tasks."""
    return {step % K} if step % 2 else set()


def train_sharded(name: str, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """FSDP2-sharded training (``world > 1``) with the same tasks missing on every rank, or
    one process on the whole batch with those tasks missing."""
    from _fsdp_worker import D_OUT, WIDTH, full, shard

    model = make_model(K, seed=0, width=WIDTH, d_out=D_OUT)
    if world > 1:
        shard(model)
    shared = list(model.trunk.parameters())  # after fully_shard: the DTensor parameters
    opt = configs()[name](model.parameters(), shared)
    for step, (x, ys) in enumerate(batches(K, STEPS, seed=1, d_out=D_OUT)):
        if world > 1:
            n = x.shape[0] // world
            part = slice(rank * n, (rank + 1) * n)
            x, ys = x[part], [y[part] for y in ys]
        opt.zero_grad()
        losses = model.losses(x, ys)
        opt.backward([None if i in missing_everywhere(step) else v for i, v in enumerate(losses)])
        opt.step()
    return full(model)


def sharded_refusal(rank: int) -> tuple[str, bool]:
    """FSDP2 with different tasks missing on the ranks: the message, and whether nothing moved."""
    from _fsdp_worker import D_OUT, WIDTH, full, shard

    model = shard(make_model(K, seed=0, width=WIDTH, d_out=D_OUT))
    opt = configs()["mgda"](model.parameters(), list(model.trunk.parameters()))
    x, ys = batches(K, 1, seed=1, d_out=D_OUT)[0]
    before = full(model)
    losses = model.losses(x, ys)
    losses[rank] = None
    try:
        opt.backward(losses)
        message = ""
    except ValueError as error:
        message = str(error)
    untouched = all(torch.equal(a, b) for a, b in zip(before, full(model))) and all(
        p.grad is None for p in model.parameters()
    )
    return message, untouched


def worker(rank: int, world: int, init_method: str, out_dir: str, names: list[str]) -> None:
    def collect() -> dict:
        results: dict = {name: train(name, rank, world) for name in names}
        for name in ("mgda", "adatask"):
            results[f"fsdp-{name}"] = train_sharded(name, rank, world)
        results["fsdp-refusal"] = sharded_refusal(rank)
        return results

    run_rank(rank, world, init_method, out_dir, collect)
