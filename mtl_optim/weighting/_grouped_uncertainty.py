"""GALW: grouped adaptive loss weighting, one learnable log-variance per group of tasks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._validation import check_int, check_num_tasks, check_partition, positive
from ._epoch_means import EpochMeans, pop_state
from ._log_variance import _UncertaintyBase
from ._present import num_tasks

#: Floor under the first-epoch mean losses in the convergence ratio of ``GroupedUncertainty``.
RATIO_EPS = 1e-12


class GroupedUncertainty(_UncertaintyBase):
    r"""Grouped adaptive loss weighting, GALW (Tang et al., "Grouped Adaptive Loss Weighting for
    Person Search", ACM MM 2022; built from the abstract, no code seen).

    The tasks are partitioned into groups; every group :math:`g` has one learnable log-variance
    :math:`s_g` that all its tasks share. Task :math:`i` in group :math:`g(i)` gets the
    :class:`Uncertainty` term with the shared parameter:

    .. math::
        o_i = \frac{e^{-s_{g(i)}}}{k_i} L_i + \tfrac12 s_{g(i)}, \qquad
        w_i = \frac{e^{-s_{g(i)}}}{k_i}, \qquad
        \frac{\partial \sum_j o_j}{\partial s_g} =
        \sum_{i \in g} \Bigl(\tfrac12 - \frac{e^{-s_g}}{k_i} L_i\Bigr).

    Decision: the :math:`\tfrac12 s` term is counted once per task (tied uncertainty
    parameters), not once per group, so with the default :math:`k_i = 2` the optimum of
    :math:`s_g` for fixed losses is the log of the group's *mean* loss and a group of one task is
    exactly :class:`Uncertainty`.

    Groups are either given (``groups``: a partition of ``range(K)``, fixed), or found by
    convergence rate (``groups=None`` with ``num_tasks`` and ``n_groups``; our design, as the
    paper's grouping rule is not public): at every ``opt.end_epoch()`` from the second completed
    epoch on, the tasks are ranked by :math:`\rho_i = \bar L_i(\text{last}) /
    \max(\bar L_i(0), \varepsilon)` (epoch-mean losses from the accumulator shared with DWA,
    ``_epoch_means.py``; epoch 0 the first completed one), ascending, ties by task index, and the
    ranking is cut into ``n_groups`` contiguous blocks: the task of rank :math:`r` joins group
    :math:`\lfloor r G / K \rfloor` (sizes differ by at most one). So group 0 always holds the
    fastest-converging tasks. Before the first ranking the same rule is applied to the task
    index order (contiguous blocks of task indices); every task cannot be its own group then
    because the ``n_groups`` parameters must exist before the optimizer is built. A regrouping
    only moves tasks: the values of :math:`s` (and their optimizer state) are kept, group
    :math:`g` keeping its meaning "the :math:`g`-th fastest block".

    Partial labels (``supports_missing``): the objectives are those of the present tasks; a
    group none of whose tasks is present stays out of the graph (its :math:`s_g` keeps ``.grad``
    ``None`` and does not move). The automatic grouping's epoch means count each task over the
    batches in which it was present (an absent epoch carries the previous mean forward), a
    task's first mean is that of the first epoch in which it appeared, and a task without one
    yet ranks after the others (by index).

    State (:meth:`state_dict`): :math:`s`, the assignment, the first epoch mean, and the
    running epoch sum, per-task counts and counter.

    Args:
        groups: the task indices of each group (a partition of ``range(K)``), or ``None``.
        num_tasks: :math:`K` when ``groups`` is ``None`` (else optional, must agree).
        n_groups: :math:`G` when ``groups`` is ``None`` (else optional, must agree).
        init, lr, factors, clip, dtype, device: as for :class:`Uncertainty` (``factors`` per
            task, ``clip`` on the group parameters).
        eps: the floor :math:`\varepsilon` under the first-epoch means in the ratio.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]] | None = None,
        *,
        num_tasks: int | None = None,
        n_groups: int | None = None,
        init: float = 0.0,
        lr: float | None = 0.025,
        factors: Sequence[float] | None = None,
        clip: tuple[float, float] | None = None,
        eps: float = RATIO_EPS,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.automatic = groups is None
        if groups is None:
            if num_tasks is None or n_groups is None:
                raise ValueError("groups=None needs num_tasks and n_groups")
            num_tasks = check_num_tasks(num_tasks)
            check_int("n_groups", n_groups, 1)
            if not 1 <= n_groups <= num_tasks:
                raise ValueError(f"n_groups must be in [1, num_tasks={num_tasks}], got {n_groups}")
            assignment = self._blocks(list(range(num_tasks)), n_groups)
        else:
            assignment = self._partition(groups)
            if num_tasks is not None and num_tasks != len(assignment):
                raise ValueError(f"num_tasks={num_tasks} but the groups cover {len(assignment)}")
            if n_groups is not None and n_groups != len(groups):
                raise ValueError(f"n_groups={n_groups} but {len(groups)} groups were given")
            num_tasks, n_groups = len(assignment), len(groups)
        self.n_groups = n_groups
        self.eps = positive("eps", eps)
        super().__init__(
            num_tasks,
            n_groups,
            init=init,
            lr=lr,
            factors=factors,
            clip=clip,
            dtype=dtype,
            device=device,
        )
        self.assignment = torch.tensor(assignment, dtype=torch.long, device=self.factors.device)
        self.first_mean: Tensor | None = None
        self._epoch = EpochMeans()

    @staticmethod
    def _partition(groups: Sequence[Sequence[int]]) -> list[int]:
        """Task -> group index, checking that ``groups`` partitions ``range(K)``."""
        blocks = check_partition("groups", groups)
        owner = {i: g for g, members in enumerate(blocks) for i in members}
        return [owner[i] for i in range(len(owner))]

    @staticmethod
    def _blocks(order: list[int], n_groups: int) -> list[int]:
        """Task ``order[r]`` (rank ``r``) joins group ``r * n_groups // K``."""
        k = len(order)
        assignment = [0] * k
        for rank, task in enumerate(order):
            assignment[task] = rank * n_groups // k
        return assignment

    @property
    def groups(self) -> list[list[int]]:
        """The current groups, as lists of task indices."""
        a = self.assignment.tolist()
        return [[i for i, g in enumerate(a) if g == group] for group in range(self.n_groups)]

    @property
    def epochs(self) -> int:
        return self._epoch.epochs

    def task_params(self, index: Tensor | None = None) -> list[Tensor]:
        groups = self.assignment.tolist()
        tasks = range(self.num_tasks) if index is None else index.tolist()
        return [self._log_vars[groups[i]] for i in tasks]

    def task_log_vars(self, index: Tensor | None = None) -> Tensor:
        if index is None:
            return torch.stack(list(self._log_vars))[self.assignment]
        return torch.stack(self.task_params(index))

    def forward(self, losses: Tensor) -> Tensor:
        w, s, index = self._uw_terms(losses)
        if self.automatic:
            if index is None:
                self._epoch.add(losses, self)
            else:
                self._epoch.add(losses, self, index, num_tasks(self, losses.numel()))
        self.weights = w.detach()
        return w * losses + 0.5 * s

    def end_epoch(self) -> None:
        if not self.automatic:
            return
        mean = self._epoch.close()
        if mean is None:
            return
        if self.first_mean is None:
            self.first_mean = mean  # NaN for a task not seen yet
            return
        if bool(torch.isnan(self.first_mean).any()):  # a task's first mean: its first epoch
            self.first_mean = torch.where(torch.isnan(self.first_mean), mean, self.first_mean)
        ratio = mean / self.first_mean.clamp(min=self.eps)
        ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, float("inf")), ratio)
        order = torch.sort(ratio, stable=True).indices.tolist()
        assignment = self._blocks(order, self.n_groups)
        self.assignment = torch.tensor(assignment, dtype=torch.long, device=self.factors.device)

    def state_dict(self) -> dict[str, Any]:
        first = None if self.first_mean is None else self.first_mean.clone()
        return {
            **super().state_dict(),
            "assignment": self.assignment.tolist(),
            "first_mean": first,
            **self._epoch.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        mine = pop_state(state, ("assignment", "first_mean", *EpochMeans.KEYS), self)
        assignment = [int(g) for g in mine["assignment"]]
        if len(assignment) != self.num_tasks or not all(0 <= g < self.n_groups for g in assignment):
            raise ValueError(f"{self!r}: invalid group assignment {assignment!r} in the state")
        super().load_state_dict(state)
        self.assignment = torch.tensor(assignment, dtype=torch.long, device=self.factors.device)
        first = mine["first_mean"]
        self.first_mean = None if first is None else torch.as_tensor(first, dtype=torch.float64)
        self._epoch.load_state_dict(mine)

    def __repr__(self) -> str:
        head = (
            f"num_tasks={self.num_tasks}, n_groups={self.n_groups}"
            if self.automatic
            else f"{self.groups!r}"
        )
        return f"{type(self).__name__}({head}, {self._options_repr()})"
