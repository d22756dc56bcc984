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

    Partial labels: ``add(values, owner, present, all_tasks)`` with the ``(m,)`` losses of the
    present tasks adds them to those tasks' sums and counts only (a ``(K,)`` per-task count), so
    task :math:`i`'s epoch mean is the mean over the batches in which it was present. A task
    absent for a whole epoch keeps its previous mean (``close`` carries it forward, so an
    epoch-to-epoch ratio of that task is 1); a task that has never been seen has the mean NaN.
    :attr:`last_counts` tells the caller of ``close`` which tasks the closed epoch saw.

    When the open epoch's batch count reaches the owner's ``end_epoch_warning_after`` (see
    :class:`~mtl_optim.weighting.Weighting`), ``add`` warns that ``opt.end_epoch()`` is
    missing, once per object. The count is part of :meth:`state_dict` (a resumed run does not
    warn again for a count it already passed); the once-flag is not (a new process may warn
    once more).
    """

    KEYS = ("sum", "count", "epochs", "task_count", "last")
    #: Entries a state saved before partial labels existed lacks (loaded as ``None``).
    OPTIONAL_KEYS = ("task_count", "last")

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._count = 0  # batches (add calls) in the open epoch
        self._task_count: Tensor | None = None  # (K,) int64: batches in which each task appeared
        self._last: Tensor | None = None  # the last closed epoch's means (carried forward)
        self.last_counts: Tensor | None = None  # per-task counts of the last closed epoch
        self.epochs = 0  # completed (non-empty) epochs
        self._warned = False

    def add(
        self,
        values: Tensor,
        owner: object,
        present: Tensor | None = None,
        all_tasks: int | None = None,
    ) -> None:
        values = values.detach().to(torch.float64)
        if present is None:
            k = values.numel()
        else:
            if all_tasks is None or present.numel() != values.numel():
                raise ValueError(
                    f"{owner!r}: {values.numel()} losses for {present.numel()} present tasks "
                    f"(of {all_tasks})"
                )
            k = all_tasks
        if self._sum is not None and self._sum.numel() != k:
            raise ValueError(f"{owner!r} was run with {self._sum.numel()} tasks, got {k}")
        if present is None:
            self._sum = values.clone() if self._sum is None else self._sum + values.to(self._sum)
            ones = torch.ones(k, dtype=torch.int64)
            self._task_count = ones if self._task_count is None else self._task_count + ones
        else:
            index = present.to(device=values.device, dtype=torch.int64)
            total = torch.zeros(k, dtype=torch.float64, device=values.device)
            if self._sum is not None:
                total.copy_(self._sum)
            total[index] += values
            self._sum = total
            counts = torch.zeros(k, dtype=torch.int64)
            if self._task_count is not None:
                counts.copy_(self._task_count)
            counts[present.to(torch.int64)] += 1
            self._task_count = counts
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
        """End the epoch; its mean losses (on the CPU), or ``None`` if it saw none.

        A task absent for the whole epoch gets its previous mean (NaN if it was never seen).
        """
        if self._count == 0 or self._sum is None:
            return None
        counts = self._task_count
        if counts is None:  # a state saved before per-task counts: every task every batch
            counts = torch.full((self._sum.numel(),), self._count, dtype=torch.int64)
        if bool((counts == self._count).all()):
            mean = (self._sum / self._count).cpu()  # every task in every batch
        else:
            seen = counts > 0
            mean = (self._sum.cpu() / counts.clamp(min=1).to(torch.float64)).where(
                seen, self._carried(self._sum.numel())
            )
        self._sum, self._count, self._task_count = None, 0, None
        self.last_counts = counts
        self._last = mean
        self.epochs += 1
        return mean

    def _carried(self, k: int) -> Tensor:
        """The means carried forward for absent tasks: the last epoch's, NaN if none."""
        if self._last is None or self._last.numel() != k:
            return torch.full((k,), float("nan"), dtype=torch.float64)
        return self._last

    def seed_last(self, mean: Tensor | None) -> None:
        """Set the means carried forward (an owner restoring a state saved without them)."""
        if self._last is None and mean is not None:
            self._last = torch.as_tensor(mean, dtype=torch.float64).clone()

    def state_dict(self) -> dict[str, Any]:
        return {
            "sum": None if self._sum is None else self._sum.clone(),
            "count": self._count,
            "epochs": self.epochs,
            "task_count": None if self._task_count is None else self._task_count.clone(),
            "last": None if self._last is None else self._last.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        total = state["sum"]
        self._sum = None if total is None else torch.as_tensor(total, dtype=torch.float64).clone()
        self._count, self.epochs = int(state["count"]), int(state["epochs"])
        counts = state.get("task_count")
        if counts is None and self._sum is not None:  # saved before per-task counts
            counts = torch.full((self._sum.numel(),), self._count, dtype=torch.int64)
        self._task_count = None if counts is None else torch.as_tensor(counts).long().clone()
        last = state.get("last")
        self._last = None if last is None else torch.as_tensor(last, dtype=torch.float64).clone()


def warn_user(message: str) -> None:
    """A ``UserWarning`` attributed to the first caller outside this package and torch (the
    user's ``opt.backward``/``opt.step`` line, past ``torch.no_grad``'s wrapper)."""
    level, frame = 2, cast(FrameType | None, sys._getframe(1))  # level 2: our caller
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_INTERNAL):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)


_INTERNAL = ("mtl_optim.", "torch.")


def pop_state(
    state: dict[str, Any],
    keys: tuple[str, ...],
    owner: object,
    optional: tuple[str, ...] = EpochMeans.OPTIONAL_KEYS,
) -> dict[str, Any]:
    """Take ``keys`` out of a weighting's state dict, with a clear error for a missing one.

    Keys in ``optional`` (entries added with partial labels) may be missing (from a state saved
    by an earlier version); they are then ``None``.
    """
    try:
        return {key: state.pop(key, None) if key in optional else state.pop(key) for key in keys}
    except KeyError as err:
        raise ValueError(f"{owner!r}: the state has no {err.args[0]!r} entry") from None
