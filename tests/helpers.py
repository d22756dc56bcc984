"""Seeded inputs and plain-Python references shared by the method tests (fixtures, the model
helpers and the matrix sampler live in conftest)."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A standard normal tensor of ``shape`` from its own seeded generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def permutation(k: int, seed: int) -> torch.Tensor:
    """A random permutation of ``range(k)`` from its own seeded generator."""
    return torch.randperm(k, generator=torch.Generator().manual_seed(seed))


def softmax_by_hand(xs: list[float]) -> list[float]:
    """The softmax in plain Python, for reference values."""
    e = [math.exp(v) for v in xs]
    return [v / sum(e) for v in e]


def positive_floats(k: int, lo: float = 0.1, hi: float = 10.0) -> st.SearchStrategy[list[float]]:
    """A Hypothesis strategy: lists of ``k`` floats in ``[lo, hi]`` (loss values, logits)."""
    return st.lists(st.floats(lo, hi), min_size=k, max_size=k)


def run_rank(rank: int, world: int, init_method: str, out_dir: str, collect) -> None:
    """On one spawned rank: join the gloo group, save ``collect()`` as ``out_dir/rank{r}.pt``
    and leave together with the other ranks (gloo aborts on a lone exit)."""
    import os

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world
    )
    try:
        torch.save(collect(), os.path.join(out_dir, f"rank{rank}.pt"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def spawn_two_ranks(worker, tmp, names: list[str]) -> list[dict]:
    """Run ``worker(rank, 2, init, tmp, names)`` on two processes joined by a TCP store on a
    free loopback port; return what each rank saved as ``tmp/rank{r}.pt``."""
    import socket
    from pathlib import Path

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, f"tcp://127.0.0.1:{port}", str(tmp), names), nprocs=2, join=True)
    return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(2)]
