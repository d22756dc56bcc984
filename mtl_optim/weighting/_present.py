"""Partial labels in the weightings: the present tasks of the current call."""

from __future__ import annotations

from torch import Tensor

from .._method import present_tasks
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
    return present_tasks(weighting, n)[0]
