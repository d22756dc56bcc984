r"""Alternating gradient steps over random task groups."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._method import Seeded
from .._validation import check_int
from ..engine import as_losses
from ..optimizer import MTLOptimizer

__all__ = ["RandomTaskGrouping"]


class _GroupSchedule(Seeded):
    """Rounds of random partitions of the K tasks, handed out one group at a time."""

    def __init__(self, n_groups: int | None, group_size: int | None, seed: int | None) -> None:
        super().__init__(seed)
        self.n_groups = n_groups
        self.group_size = group_size
        self.pending: list[tuple[int, ...]] = []

    def groups_for(self, k: int) -> int:
        size = cast(int, self.group_size)  # given whenever n_groups is not
        b = self.n_groups if self.n_groups is not None else math.ceil(k / size)
        if b > k:
            raise ValueError(f"n_groups={b} is more than the {k} tasks: groups must be non-empty")
        return b

    def next(self, k: int) -> tuple[int, ...]:
        if not self.pending:
            order = torch.randperm(k, generator=self.generator)
            self.pending = [
                tuple(sorted(c.tolist())) for c in order.tensor_split(self.groups_for(k))
            ]
        return self.pending.pop(0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending": [list(g) for g in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.pending = [tuple(g) for g in state.pop("pending")]
        super().load_state_dict(state)


class RandomTaskGrouping(MTLOptimizer):
    r"""Alternating independent gradient steps over random task groups.

    Training runs in rounds. Each round draws a uniformly random permutation of the K tasks
    and cuts it into ``n_groups`` groups of sizes that differ by at most one (or groups of at
    most ``group_size`` tasks: :math:`B = \lceil K / m \rceil`); each step then trains on the
    next group :math:`S` of the round, so every task is stepped on exactly once per round:

    * the shared parameters receive :math:`\sum_{i \in S} \nabla_{\theta_s} L_i`, or the
      ``aggregator``'s combination of the rows :math:`\{g_i\}_{i \in S}` alone;
    * the parameters of the tasks in :math:`S` receive :math:`\nabla \sum_{i \in S} L_i`;
    * the parameters reached only by tasks outside :math:`S` (their heads) keep
      ``.grad = None``, so the base optimizer leaves them and their state untouched.

    This is a random task grouping baseline (see docs/methods/grouping.md, "Random task groups"),
    run as an optimizer mode
    **(ours; the paper's RG protocol is unverified)**. Design decisions:

    * It is an :class:`~mtl_optim.MTLOptimizer` subclass rather than a wrapper or a selector:
      the number of losses an ``MTLOptimizer`` sees is fixed after its first ``backward``, so
      a wrapper could only zero the other tasks' losses — which hands an aggregator zero rows
      (MGDA's min-norm point becomes 0) and gives the other heads a zero gradient that
      momentum, weight decay and Adam's moments still turn into an update. As a subclass it
      differentiates only :math:`\sum_{i \in S} L_i` without an aggregator (one reverse
      pass) and hands the aggregator the drawn rows only, with the same loop as any
      ``MTLOptimizer``: ``zero_grad()``, ``backward(losses)``, ``step()``.
    * Heads of tasks outside the group get **no update** (rather than their own gradient):
      each step is then exactly an ordinary step on the model restricted to the group, the
      "independent step" of the mode, and a head's optimizer state advances only on steps
      that trained its task.
    * There is no ``weighting``: a loss weighting mixes all K losses, which defeats stepping
      on a subset. The aggregator sees a different number of rows from step to step, so it
      must be stateless (``Sum``, ``Mean``, ``MGDA``, ``PCGrad``, ``CAGrad``, ``IMTLG``, …),
      and the engine still computes all K rows of ``J`` for it (its buffer is K × d).

    The draws come from a private CPU ``torch.Generator`` (``seed``); the generator and the
    rest of the round are in ``state_dict()["mtl"]["grouping"]``, so a resumed run draws the
    same groups. The group is drawn at the first ``backward`` after ``zero_grad``/``step``
    (accumulating ``backward`` calls share it); :attr:`last_group` is the latest draw and
    :attr:`last_weights` is 1 (or the aggregator's row weight) on its tasks and 0 elsewhere.

    Args:
        params, base: as for :class:`~mtl_optim.MTLOptimizer`.
        n_groups: the number of groups per round (default 2 when ``group_size`` is not
            given); at most K.
        group_size: alternatively, the largest group size.
        seed: the generator's seed, or ``None`` for a random one.
        **kwargs: ``MTLOptimizer``'s keywords (``aggregator``, ``shared``, ``nonfinite``, ...;
            no ``weighting``, ``route="jacobian"`` only) and the base optimizer's
            hyperparameters.
    """

    #: Partial labels (``None`` losses) are refused: each step already trains a drawn subset
    #: of the tasks, and a missing task would silently shrink the group.
    supports_missing = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: type[Optimizer] = torch.optim.Adam,
        *,
        n_groups: int | None = None,
        group_size: int | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("weighting") is not None:
            raise TypeError(
                "RandomTaskGrouping takes no weighting: a loss weighting mixes all K losses, "
                "while each step here trains on one group of tasks"
            )
        if kwargs.get("route", "jacobian") != "jacobian":
            raise ValueError(
                "RandomTaskGrouping needs route='jacobian': the Gramian route weights all K tasks"
            )
        check_int("n_groups", n_groups, 1, optional=True)
        check_int("group_size", group_size, 1, optional=True)
        if n_groups is not None and group_size is not None:
            raise ValueError("give n_groups or group_size, not both")
        if n_groups is None and group_size is None:
            n_groups = 2
        super().__init__(params, base, **kwargs)
        self._schedule = _GroupSchedule(n_groups, group_size, seed)
        self.last_group: tuple[int, ...] | None = None
        self._group: tuple[int, ...] | None = None  # the group of the current window
        self._group_values: Tensor | None = None  # its loss values, for needs_losses aggregators

    def __repr__(self) -> str:
        s = self._schedule
        size = f"n_groups={s.n_groups}" if s.n_groups is not None else f"group_size={s.group_size}"
        parts = [size, f"seed={s.seed}", f"base={self.base_class.__name__}"]
        if self.aggregator is not None:
            parts.append(f"aggregator={self.aggregator!r}")
        return f"{type(self).__name__}({', '.join(parts)})\n{self._base!r}"

    def backward(self, losses: Sequence[Tensor | None] | Tensor, **kwargs: Any) -> None:
        """Train on the window's group: draw it (first call of the window), then differentiate
        as described above. Keywords (``features``, ...) are ``MTLOptimizer.backward``'s."""
        if not isinstance(losses, Tensor) and any(loss is None for loss in losses):
            raise ValueError(
                "RandomTaskGrouping does not support missing tasks (None in losses): each step "
                "already trains a drawn group of tasks; pass every task's loss"
            )
        checked = as_losses(losses, self.num_tasks)
        k = len(checked)
        if self._group is None:
            self._group = self.last_group = self._schedule.next(k)
        super().backward(checked, **kwargs)
        if self.aggregator is None:
            self.guard.set_weights(
                self._scatter(torch.ones(len(self._group), device=checked[0].device), k)
            )

    def _scatter(self, values: Tensor, k: int) -> Tensor:
        """``values`` on the group's tasks, 0 elsewhere: a ``(K,)`` tensor."""
        full = torch.zeros(k, dtype=values.dtype, device=values.device)
        full[list(self._group or ())] = values
        return full

    def task_objectives(self, losses: list[Tensor], values: Tensor) -> tuple[None, Tensor]:
        group = list(self._group or ())
        self.guard.set_weights(None)
        self._group_values = values[group]
        return None, torch.stack([losses[i] for i in group]).sum()

    def combine(self, jacobian: Tensor) -> Tensor:
        rows = torch.tensor(self._group, device=jacobian.device)
        if self.aggregator is not None and self.aggregator.needs_losses:
            self.aggregator.set_losses(cast(Tensor, self._group_values))  # it was handed all K
        direction = super().combine(jacobian.index_select(0, rows))
        if self.last_weights is not None:
            self.guard.set_weights(self._scatter(self.last_weights, jacobian.shape[0]))
        return direction

    def window_reset(self) -> None:
        self._group = None

    def extra_state(self) -> dict[str, Any]:
        return {"grouping": self._schedule.state_dict()}

    def load_extra_state(self, mtl: dict[str, Any]) -> None:
        if "grouping" not in mtl:
            raise ValueError("not a RandomTaskGrouping state_dict: 'grouping' is missing")
        self._schedule.load_state_dict(mtl["grouping"])
