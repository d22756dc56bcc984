"""Epoch-mean task losses: the accumulator shared by the epoch-based weightings (DWA, IGB)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class EpochMeans:
    """Per-task mean of the detached losses seen in the current epoch (float64).

    ``add`` is called on every batch, ``close`` at ``opt.end_epoch()``; an epoch in which no loss
    was seen is not counted. Batches the optimizer skipped for non-finite values never arrive.
    """

    KEYS = ("sum", "count", "epochs")

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._count = 0
        self.epochs = 0  # completed (non-empty) epochs

    def add(self, values: Tensor, owner: object) -> None:
        values = values.detach().to(torch.float64)
        if self._sum is not None and self._sum.numel() != values.numel():
            raise ValueError(
                f"{owner!r} was run with {self._sum.numel()} tasks, got {values.numel()}"
            )
        self._sum = values.clone() if self._sum is None else self._sum + values.to(self._sum)
        self._count += 1

    def close(self) -> Tensor | None:
        """End the epoch; its mean losses (on the CPU), or ``None`` if it saw none."""
        if self._count == 0 or self._sum is None:
            return None
        mean = (self._sum / self._count).cpu()
        self._sum, self._count = None, 0
        self.epochs += 1
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {
            "sum": None if self._sum is None else self._sum.clone(),
            "count": self._count,
            "epochs": self.epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        total = state["sum"]
        self._sum = None if total is None else torch.as_tensor(total, dtype=torch.float64).clone()
        self._count, self.epochs = int(state["count"]), int(state["epochs"])


def pop_state(state: dict[str, Any], keys: tuple[str, ...], owner: object) -> dict[str, Any]:
    """Take ``keys`` out of a weighting's state dict, with a clear error for a missing one."""
    try:
        return {key: state.pop(key) for key in keys}
    except KeyError as err:
        raise ValueError(f"{owner!r}: the state has no {err.args[0]!r} entry") from None
