"""IGB v1: heuristic improvable gap balancing."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._linalg import LOG_EPS, safe_log
from .._validation import check_nonnegative, positive
from ._base import Weighting
from ._epoch_means import EpochMeans, pop_state
from ._present import num_tasks, present_index


class IGB(Weighting):
    r"""Improvable Gap Balancing, heuristic version (Dai, Fei & Lu, "Improvable Gap Balancing
    for Multi-Task Learning", UAI 2023, arXiv 2307.15429).

    The base losses :math:`L_{\mathrm{base},i}` are the mean training losses of epoch
    ``base_epoch`` (0-indexed, default 1: the second epoch), set when that epoch ends. Then

    .. math::
        w = K \cdot \operatorname{softmax}\!\left(\frac{L_t}{L_{\mathrm{base}}}\right), \qquad
        o_i = w_i \log \max(L_{t,i}, \varepsilon),

    with the current batch losses :math:`L_t` detached in :math:`w` (no temperature; the weights
    sum to :math:`K`), so :math:`\partial o_i / \partial L_i = w_i / L_i` and the update
    :math:`\sum_i w_i \nabla L_i / L_i` is scale-invariant. A task with less progress (a larger
    ratio, the "improvable gap" proxy) gets a larger weight. Until the base losses exist
    :math:`w = 1`: the "SI" baseline :math:`\sum_i \log L_i`. Combined with an aggregator, the
    vector :math:`(w_i \log L_i)_i` is what it balances (e.g. IGB + Nash-MTL).

    Decisions: ``log(max(L, eps))`` with ``eps`` = 1e-8 and ``ValueError`` on a negative loss (see
    docs/methods/weightings.md, "Log losses"; the official code has no guard); the ratio divides by
    :math:`\max(L_{\mathrm{base}}, \varepsilon)`. The epoch means average the detached losses of
    every call (every ``opt.backward``) in float64, ``opt.end_epoch()`` closes an epoch, and an
    epoch in which the weighting saw no losses is not counted. The epoch means come from the
    accumulator shared with DWA (``_epoch_means.py``).

    Partial labels (``supports_missing``): a batch without task :math:`i`'s label leaves
    :math:`L_i` out of its epoch sum and count (the epoch mean of a task is the mean over the
    batches in which it was present), and :math:`L_{\mathrm{base},i}` is set at the end of the
    first epoch :math:`\ge` ``base_epoch`` in which task :math:`i` appeared (NaN in
    :attr:`base_losses` until then). Of the present tasks :math:`P`, those with a base loss,
    :math:`B`, share :math:`w_B = |B| \operatorname{softmax}_B(L_{t,B} / L_{\mathrm{base},B})`
    and the others get :math:`w_i = 1`; the weights sum to :math:`m = |P|`.

    State (:meth:`state_dict`): the base losses, the running sum and per-task counts, the epoch
    counter.

    Args:
        base_epoch: the 0-indexed epoch whose mean losses become the base losses.
        eps: the floor under the losses (and base losses).
    """

    separable = True
    supports_missing = True

    def __init__(self, base_epoch: int = 1, eps: float = LOG_EPS) -> None:
        if isinstance(base_epoch, bool) or not isinstance(base_epoch, int) or base_epoch < 0:
            raise ValueError(f"base_epoch must be an int >= 0, got {base_epoch!r}")
        self.base_epoch = base_epoch
        self.eps = positive("eps", eps)
        self.base_losses: Tensor | None = None
        self._epoch = EpochMeans()

    @property
    def epochs(self) -> int:
        return self._epoch.epochs

    def current_weights(self, values: Tensor, present: Tensor | None = None) -> Tensor:
        """The float64 weights for the detached float64 current losses ``values`` (of the
        ``present`` task indices, if given)."""
        m = values.numel()
        if self.base_losses is None:
            return torch.ones(m, dtype=torch.float64, device=values.device)
        base = self.base_losses.to(values.device)
        k = m if present is None else num_tasks(self, m)
        if base.numel() != k:
            raise ValueError(f"{self!r} has {base.numel()} base losses, got {k} losses")
        known = ~torch.isnan(base)
        if present is None and bool(known.all()):
            return k * torch.softmax(values / base.clamp(min=self.eps), dim=0)
        if present is not None:
            base, known = base[present.to(base.device)], known[present.to(base.device)]
        w = torch.ones(m, dtype=torch.float64, device=values.device)
        n = int(known.sum())
        if n:
            w[known] = n * torch.softmax(values[known] / base[known].clamp(min=self.eps), dim=0)
        return w

    def forward(self, losses: Tensor) -> Tensor:
        check_nonnegative(losses, type(self).__name__)
        index = present_index(self, losses.numel())
        if index is None:
            self._epoch.add(losses, self)
        else:
            self._epoch.add(losses, self, index, num_tasks(self, losses.numel()))
        w = self.current_weights(losses.detach().to(torch.float64), index)
        w = w.to(dtype=losses.dtype, device=losses.device)
        self.weights = w
        return w * safe_log(losses, self.eps)

    def end_epoch(self) -> None:
        epoch = self._epoch.epochs
        mean = self._epoch.close()
        if mean is None or epoch < self.base_epoch:
            return
        counts = self._epoch.last_counts
        seen = torch.ones_like(mean, dtype=torch.bool) if counts is None else counts > 0
        if self.base_losses is None:
            if bool(seen.all()):
                self.base_losses = mean
            else:  # a task's base comes from the first epoch >= base_epoch that saw it
                self.base_losses = torch.where(seen, mean, torch.full_like(mean, float("nan")))
            return
        unset = torch.isnan(self.base_losses) & seen
        if bool(unset.any()):
            self.base_losses = torch.where(unset, mean, self.base_losses)

    def state_dict(self) -> dict[str, Any]:
        base = None if self.base_losses is None else self.base_losses.clone()
        return {**super().state_dict(), "base_losses": base, **self._epoch.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        mine = pop_state(state, ("base_losses", *EpochMeans.KEYS), self)
        super().load_state_dict(state)
        base = mine["base_losses"]
        self.base_losses = None if base is None else torch.as_tensor(base, dtype=torch.float64)
        self._epoch.load_state_dict(mine)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_epoch={self.base_epoch!r}, eps={self.eps!r})"
