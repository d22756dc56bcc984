"""Epoch-mean task losses: the accumulator shared by the epoch-based weightings (DWA, IGB)."""

from __future__ import annotations

import sys
import warnings
from types import FrameType
from typing import Any, cast

import torch
from torch import Tensor


class EpochMeans:
    """Per-task mean of the detached losses seen in the current epoch (float64).

    ``add`` is called on every batch, ``close`` at ``opt.end_epoch()``; an epoch in which no loss
    was seen is not counted. Batches the optimizer skipped for non-finite values never arrive.

    When the open epoch's batch count reaches the owner's ``end_epoch_warning_after`` (see
    :class:`~mtl_optim.weighting.Weighting`), ``add`` warns that ``opt.end_epoch()`` is
    missing, once per object. The count is part of :meth:`state_dict` (a resumed run does not
    warn again for a count it already passed); the once-flag is not (a new process may warn
    once more).
    """

    KEYS = ("sum", "count", "epochs")

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._count = 0
        self.epochs = 0  # completed (non-empty) epochs
        self._warned = False

    def add(self, values: Tensor, owner: object) -> None:
        values = values.detach().to(torch.float64)
        if self._sum is not None and self._sum.numel() != values.numel():
            raise ValueError(
                f"{owner!r} was run with {self._sum.numel()} tasks, got {values.numel()}"
            )
        self._sum = values.clone() if self._sum is None else self._sum + values.to(self._sum)
        self._count += 1
        limit = getattr(owner, "end_epoch_warning_after", None)
        if limit is not None and self._count == limit and not self._warned:
            self._warned = True
            warn_user(
                f"{owner!r} has seen {self._count} batches without opt.end_epoch(): it is "
                "epoch-based and keeps its first-epoch weights until epochs end. Call "
                "opt.end_epoch() once at the end of every epoch (or, if your epochs really are "
                "this long, raise or disable the check: weighting.end_epoch_warning_after = "
                "None)."
            )

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


def warn_user(message: str) -> None:
    """A ``UserWarning`` attributed to the first caller outside this package and torch (the
    user's ``opt.backward``/``opt.step`` line, past ``torch.no_grad``'s wrapper)."""
    level, frame = 2, cast(FrameType | None, sys._getframe(1))  # level 2: our caller
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_INTERNAL):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)


_INTERNAL = ("mtl_optim.", "torch.")


def pop_state(state: dict[str, Any], keys: tuple[str, ...], owner: object) -> dict[str, Any]:
    """Take ``keys`` out of a weighting's state dict, with a clear error for a missing one."""
    try:
        return {key: state.pop(key) for key in keys}
    except KeyError as err:
        raise ValueError(f"{owner!r}: the state has no {err.args[0]!r} entry") from None
