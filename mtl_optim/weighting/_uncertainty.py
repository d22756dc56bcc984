"""Uncertainty weighting (Kendall et al.) and two variants: grouped (GALW) and constrained."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .._validation import check_int, check_num_tasks, check_partition, positive
from ._base import Weighting
from ._dwa import DWA
from ._epoch_means import EpochMeans, pop_state

#: Floor under the first-epoch mean losses in the convergence ratio of ``GroupedUncertainty``.
RATIO_EPS = 1e-12


class _UncertaintyBase(Weighting):
    r"""Learnable log-variances :math:`s` (one per task or per group) and the shared options.

    Subclasses define the task-to-parameter map in :meth:`task_log_vars`.
    """

    separable = True

    #: The class default (Nash-MTL / IGB ``method-params-lr``); instances override it from ``lr``.
    param_group_options: dict[str, Any] = {"lr": 0.025}

    def __init__(
        self,
        num_tasks: int,
        num_params: int,
        *,
        init: float,
        lr: float | None,
        factors: Sequence[float] | None,
        clip: tuple[float, float] | None,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        self.num_tasks = check_num_tasks(num_tasks)
        init = float(init)
        if init != init or init in (float("inf"), float("-inf")):
            raise ValueError(f"init must be finite, got {init!r}")
        self.init = init
        self.lr = None if lr is None else positive("lr", lr)
        self.param_group_options = {} if lr is None else {"lr": lr}
        if clip is not None:
            lo, hi = (float(c) for c in clip)
            if not lo < hi:
                raise ValueError(f"clip must be (lo, hi) with lo < hi, got {clip!r}")
            clip = (lo, hi)
        self.clip = clip
        if factors is None:
            self._factors: tuple[float, ...] | None = None
            k = [2.0] * num_tasks
        else:
            k = [positive("every factor", float(f)) for f in factors]
            if len(k) != num_tasks:
                raise ValueError(f"factors has {len(k)} entries, expected {num_tasks}")
            self._factors = tuple(k)
        self.factors = torch.tensor(k, dtype=dtype, device=device)
        self.log_vars = nn.Parameter(torch.full((num_params,), init, dtype=dtype, device=device))

    def parameters(self) -> list[Tensor]:
        return [self.log_vars]

    def _project(self) -> None:
        """Projected-gradient clipping: put :math:`s` back into ``clip`` (in place)."""
        if self.clip is not None:
            with torch.no_grad():
                self.log_vars.clamp_(*self.clip)

    def task_log_vars(self) -> Tensor:
        """The ``(K,)`` log-variance used by each task."""
        return self.log_vars

    def _check(self, losses: Tensor) -> None:
        if losses.numel() != self.num_tasks:
            raise ValueError(f"{self!r} was built for {self.num_tasks} tasks, got {losses.numel()}")
        if losses.device != self.log_vars.device:
            raise ValueError(
                f"{type(self).__name__}: the losses are on {losses.device}, the log-variances on "
                f"{self.log_vars.device}; pass device= to the constructor"
            )

    def _uw_terms(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(e^{-s}/k, s)`` per task, after the projection onto ``clip``."""
        self._check(losses)
        self._project()
        s = self.task_log_vars()
        return torch.exp(-s) / self.factors, s

    def _options_repr(self) -> str:
        parts = [f"init={self.init!r}", f"lr={self.lr!r}"]
        if self._factors is not None:
            parts.append(f"factors={list(self._factors)!r}")
        if self.clip is not None:
            parts.append(f"clip={self.clip!r}")
        return ", ".join(parts)


class Uncertainty(_UncertaintyBase):
    r"""Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018; see
    docs/methods/weightings.md, "Uncertainty weighting").

    With one learnable log-variance :math:`s_i = \log \sigma_i^2` per task and a factor
    :math:`k_i` (2 by default),

    .. math::
        o_i = \frac{e^{-s_i}}{k_i} L_i + \tfrac12 s_i, \qquad
        w_i = \frac{\partial o_i}{\partial L_i} = \frac{e^{-s_i}}{k_i}, \qquad
        \frac{\partial o_i}{\partial s_i} = -\frac{e^{-s_i}}{k_i} L_i + \tfrac12 .

    With :math:`k_i = 2` this is the paper's regression term :math:`L/(2\sigma^2) + \log\sigma`
    and the Nash-MTL / LibMTL form :math:`\tfrac12(e^{-s}L + s)` (the spec's default); the
    paper's classification term :math:`L/\sigma^2 + \log\sigma` is :math:`k_i = 1`, and URL's
    :math:`L/(k_i e^{s}) + s/2` with :math:`k = (1, 2, 2)` is ``factors=(1, 2, 2)``. For a fixed
    loss, :math:`o_i` is minimised at :math:`s_i = \log(2 L_i / k_i)` (:math:`\log L_i` by
    default), where :math:`w_i = 1/(2 L_i)`: the weights drift towards inverse losses.

    :attr:`weights` are the detached :math:`e^{-s_i}/k_i`. :math:`s` is an ``nn.Parameter``
    returned by :meth:`parameters`; ``MTLOptimizer`` trains it with the model's base optimizer
    in its own param group with :attr:`param_group_options` (``{"lr": lr}``), and checkpoints
    its value (the base state dict) and its optimizer state (the optimizer's).

    Decisions: ``init`` = 0 and ``lr`` = 0.025 (Nash-MTL / IGB ``uw``; LibMTL uses
    ``init=-0.5`` and the model's learning rate, i.e. ``lr=None``). ``clip=(lo, hi)`` (TAG
    clips :math:`s` to [0.01, 10]) is a projection: before each use :math:`s` is clamped in place
    into the interval, so a step that leaves the interval is undone at the next call and the
    parameter never gets stuck with the zero gradient of a clamp inside the graph. The objectives
    are computed in the promoted dtype of the losses and of :math:`s`.

    Args:
        num_tasks: :math:`K`; the parameters must exist before the optimizer is built.
        init: the initial :math:`s_i`.
        lr: the learning rate of :math:`s`'s param group; ``None``: the optimizer's ``lr``.
        factors: the :math:`k_i` (positive), default 2 for every task.
        clip: ``(lo, hi)`` bounds on :math:`s`, or ``None``.
        dtype, device: of :math:`s` (it must be on the losses' device).
    """

    def __init__(
        self,
        num_tasks: int,
        init: float = 0.0,
        lr: float | None = 0.025,
        *,
        factors: Sequence[float] | None = None,
        clip: tuple[float, float] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        num_tasks = check_num_tasks(num_tasks)
        super().__init__(
            num_tasks,
            num_tasks,
            init=init,
            lr=lr,
            factors=factors,
            clip=clip,
            dtype=dtype,
            device=device,
        )

    def forward(self, losses: Tensor) -> Tensor:
        w, s = self._uw_terms(losses)
        self.weights = w.detach()
        return w * losses + 0.5 * s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_tasks}, {self._options_repr()})"


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

    State (:meth:`state_dict`): :math:`s`, the assignment, the first epoch mean, and the
    running epoch sum, count and counter.

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
        self.assignment = torch.tensor(assignment, dtype=torch.long, device=self.log_vars.device)
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

    def task_log_vars(self) -> Tensor:
        return self.log_vars[self.assignment]

    def forward(self, losses: Tensor) -> Tensor:
        w, s = self._uw_terms(losses)
        if self.automatic:
            self._epoch.add(losses, self)
        self.weights = w.detach()
        return w * losses + 0.5 * s

    def end_epoch(self) -> None:
        if not self.automatic:
            return
        mean = self._epoch.close()
        if mean is None:
            return
        if self.first_mean is None:
            self.first_mean = mean
            return
        ratio = mean / self.first_mean.clamp(min=self.eps)
        order = torch.sort(ratio, stable=True).indices.tolist()
        assignment = self._blocks(order, self.n_groups)
        self.assignment = torch.tensor(assignment, dtype=torch.long, device=self.log_vars.device)

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
        self.assignment = torch.tensor(assignment, dtype=torch.long, device=self.log_vars.device)
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


def bounded_rescale(u: Tensor, lo: float, hi: float, total: float) -> Tensor:
    r"""``w = clamp(c u, lo, hi)`` with the scale :math:`c > 0` such that :math:`\sum w = `
    ``total``; ``u`` positive, :math:`K \cdot lo \le` ``total`` :math:`\le K \cdot hi`.

    :math:`f(c) = \sum_i \operatorname{clamp}(c u_i, lo, hi)` is continuous, nondecreasing and
    piecewise linear with breakpoints :math:`lo/u_i`, :math:`hi/u_i`; it is evaluated at the
    sorted breakpoints and solved exactly (linearly) on the interval where it crosses ``total``.
    """
    k = u.numel()
    if lo * k >= total or hi * k <= total:  # only the constant vector fits
        return torch.full_like(u, total / k)
    breaks = torch.cat([lo / u, hi / u]).sort().values
    f = torch.clamp(breaks[:, None] * u[None, :], lo, hi).sum(1)
    j = min(max(int(torch.searchsorted(f, torch.tensor([total], dtype=f.dtype))[0]), 1), k * 2 - 1)
    b0, b1, f0, f1 = breaks[j - 1], breaks[j], f[j - 1], f[j]
    c = b1 if f1 <= f0 else b0 + (total - f0) * (b1 - b0) / (f1 - f0)
    return torch.clamp(c * u, lo, hi)


class ConstrainedUncertainty(_UncertaintyBase):
    r"""Dynamic constrained uncertainty weighting (after the abstract of "dynamic constrained
    uncertainty weighting"; no code seen, so the definition below is ours).

    Three parts: the uncertainty weight :math:`e^{-s_i}/k_i` with learnable :math:`s`, the
    DWA weight :math:`d_i` (:class:`~mtl_optim.weighting.DWA`, from epoch-mean losses:
    :math:`d = K\operatorname{softmax}(r/T)`, :math:`r_i = \bar L_i(e-1)/\bar L_i(e-2)`,
    :math:`d = 1` for the first two epochs), and a constraint keeping the weights in
    ``bounds`` :math:`[lo, hi]` with sum :math:`K`:

    .. math::
        u_i = \frac{e^{-s_i}}{k_i} d_i, \qquad
        w_i = \operatorname{clamp}(c\, u_i, lo, hi), \quad c > 0 \text{ s.t. } \sum_i w_i = K,

    i.e. the weights are proportional to :math:`u` except where a bound is active (the scale
    :math:`c` is found exactly by :func:`bounded_rescale`). The objectives are

    .. math::
        o_i = w_i L_i + \frac{e^{-s_i}}{k_i} \operatorname{sg}(L_i) + \tfrac12 s_i,

    with :math:`w` a constant for autograd (``sg``: stop-gradient), so
    :math:`\partial o_i / \partial L_j = w_i \delta_{ij}`: the model is trained with the bounded
    weights :math:`w` (:attr:`weights`), and :math:`s` is trained by the uncertainty likelihood
    alone, :math:`\partial \sum_j o_j / \partial s_i = \tfrac12 - e^{-s_i} L_i / k_i`
    (optimum :math:`\log(2 L_i / k_i)`, the log loss by default).

    Decision (why decoupled): letting :math:`s` act on :math:`w_i L_i` through the
    renormalisation would make :math:`\sum w_i L_i` invariant to a common shift of :math:`s`,
    so the :math:`\tfrac12 s` terms would drive every :math:`s` to :math:`-\infty`; and a clamp
    inside the graph gives zero gradient at the bounds. Requires :math:`0 < lo \le 1 \le hi`
    (else no weights in the bounds sum to :math:`K`); with :math:`lo = 1` or :math:`hi = 1`
    the weights are all 1. The DWA epoch means follow :class:`DWA` (every call, float64,
    ``opt.end_epoch()`` closes an epoch, an empty epoch is not counted).

    State (:meth:`state_dict`): :math:`s` and the DWA state.

    Args:
        num_tasks: :math:`K`.
        temperature: the DWA temperature :math:`T` (default 2).
        bounds: ``(lo, hi)`` on the weights (default (0.1, 10)).
        init, lr, factors, clip, dtype, device: as for :class:`Uncertainty`.
    """

    def __init__(
        self,
        num_tasks: int,
        temperature: float = 2.0,
        bounds: tuple[float, float] = (0.1, 10.0),
        init: float = 0.0,
        lr: float | None = 0.025,
        *,
        factors: Sequence[float] | None = None,
        clip: tuple[float, float] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        num_tasks = check_num_tasks(num_tasks)
        lo, hi = (float(b) for b in bounds)
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"bounds must be (lo, hi) with 0 < lo <= 1 <= hi, got {bounds!r}")
        self.bounds = (lo, hi)
        self._dwa = DWA(temperature)
        self._dwa._owner = self  # its end_epoch warning names this weighting and its threshold
        self.temperature = self._dwa.temperature
        super().__init__(
            num_tasks,
            num_tasks,
            init=init,
            lr=lr,
            factors=factors,
            clip=clip,
            dtype=dtype,
            device=device,
        )

    @property
    def epochs(self) -> int:
        return self._dwa.epochs

    def forward(self, losses: Tensor) -> Tensor:
        uw, s = self._uw_terms(losses)
        self._dwa(losses.detach())  # records the epoch means; its weights are the DWA term
        dwa = cast(Tensor, self._dwa.weights)  # set by the call above
        u = uw.detach().to(torch.float64) * dwa.to(device=uw.device, dtype=torch.float64)
        w = bounded_rescale(u, *self.bounds, float(self.num_tasks))
        w = w.to(dtype=torch.promote_types(losses.dtype, uw.dtype))
        self.weights = w
        return w * losses + uw * losses.detach() + 0.5 * s

    def end_epoch(self) -> None:
        self._dwa.end_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "dwa": self._dwa.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        mine = pop_state(state, ("dwa",), self)
        super().load_state_dict(state)
        self._dwa.load_state_dict(mine["dwa"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_tasks}, temperature={self.temperature!r}, "
            f"bounds={self.bounds!r}, {self._options_repr()})"
        )
