"""Helpers for partial labels: an aggregator called on the rows of the present tasks only.

While some task is missing from a batch, the optimizer sets ``present`` (the increasing
indices of the m present tasks among the K) and ``all_tasks`` (K) on the aggregator and calls
it on the ``(m, d)`` rows of the present tasks. The rule for state is "freeze and re-index":
state tied to a missing task is neither read nor changed, the present tasks' entries are read
as the state of an m-task problem and written back. Random draws are always made for all K
tasks and then restricted, so the random stream does not depend on which tasks are present.
See docs/methods/aggregators.md, "Partial labels".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._method import present_tasks

__all__ = ["mass_restrict", "on", "present_tasks", "random_keys", "restrict_pairs", "scatter"]


def on(index: Tensor, device: torch.device) -> Tensor:
    """The index on ``device`` (a copy only when it is elsewhere)."""
    return index if index.device == device else index.to(device)


def restrict_pairs(square: Tensor, index: Tensor | None) -> Tensor:
    """The principal submatrix ``square[P][:, P]`` (``square`` itself when ``index`` is None)."""
    if index is None:
        return square
    idx = on(index, square.device)
    return square.index_select(0, idx).index_select(1, idx)


def random_keys(agg: Any, index: Tensor | None, k: int, device: torch.device) -> Tensor:
    """The ``(m, m)`` uniform keys of the visiting orders (PCGrad, GradVac): a ``(K, K)``
    draw, restricted to the present tasks, diagonal set to 2 (so a task comes last in its own
    order and is cut off)."""
    keys = torch.rand(k, k, generator=agg.generator_on(device), device=device)
    keys = restrict_pairs(keys, index)
    keys.fill_diagonal_(2.0)
    return keys


def mass_restrict(weights: Tensor, index: Tensor, total: float) -> tuple[Tensor, Tensor]:
    """The present entries of weights that sum to ``total`` over all K tasks, rescaled to sum
    to ``total`` over the present ones; and their current sum (the mass to write back with).

    Present entries that sum to 0 are read as uniform (``total / m`` each)."""
    part = weights.index_select(0, on(index, weights.device))
    mass = part.sum()
    uniform = torch.full_like(part, total / max(part.numel(), 1))
    scaled = torch.where(mass > 0, part * total / torch.where(mass > 0, mass, 1.0), uniform)
    return scaled, mass


def scatter(full: Tensor, index: Tensor, part: Tensor) -> Tensor:
    """A copy of ``full`` with the entries (rows) at ``index`` replaced by ``part``."""
    out = full.clone()
    out[on(index, full.device)] = part.to(full)
    return out
