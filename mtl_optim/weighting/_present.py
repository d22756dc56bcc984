"""Partial labels in the weightings: the present tasks of the current call."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import Weighting


def num_tasks(weighting: Weighting, n: int) -> int:
    """K: ``n`` (the number of losses) when every task is present, else ``all_tasks``."""
    if weighting.present is None:
        return n
    if weighting.all_tasks is None:
        raise ValueError(f"{weighting!r}: present is set but all_tasks is not")
    return int(weighting.all_tasks)


def present_index(weighting: Weighting, n: int) -> Tensor | None:
    """The ``(m,)`` CPU int64 indices of the present tasks, checked against the ``n`` losses;
    ``None`` when every task is present."""
    present = weighting.present
    if present is None:
        return None
    index = torch.as_tensor(present, dtype=torch.int64).cpu()
    k = num_tasks(weighting, n)
    if index.dim() != 1 or index.numel() != n:
        raise ValueError(f"{weighting!r}: {n} losses for present tasks {index.tolist()}")
    if n and (int(index.min()) < 0 or int(index.max()) >= k or bool((index.diff() <= 0).any())):
        raise ValueError(f"{weighting!r}: present must be increasing indices in [0, {k})")
    return index
