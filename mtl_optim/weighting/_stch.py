"""STCH: smooth Tchebycheff scalarization of the (normalised, log) task losses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._linalg import LOG_EPS, safe_log
from .._validation import check_int, check_nonnegative, positive
from ._base import Weighting
from ._epoch_means import EpochMeans, pop_state


class STCH(Weighting):
    r"""Smooth Tchebycheff scalarization (Lin, Zhang, Yang, Zhang & Zhang, "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024, arXiv 2402.19078; the MTL form of
    the official ``STCH_MTL`` code).

    The paper smooths the Tchebycheff scalarization :math:`\max_i \lambda_i (f_i - z^*_i)` into

    .. math::
        g_\mu(f) = \mu \log \sum_{i=1}^K \exp\Bigl(\frac{\lambda_i (f_i - z^*_i)}{\mu}\Bigr).

    The official MTL code applies it to the log losses, normalised by the mean losses
    :math:`\bar L` of a warm-up epoch (so :math:`f_i - z^*_i = \log(L_i / \bar L_i)`, i.e. the
    ideal point is :math:`\log \bar L`), with :math:`\lambda = 1` and a factor :math:`K`. Its
    gradient is

    .. math::
        \nabla\bigl(K g_\mu\bigr) = \sum_i w_i \nabla \log L_i, \qquad
        w = K\, \lambda \odot \operatorname{softmax}\Bigl(\frac{\lambda \odot
            (\log L - \log \bar L)}{\mu}\Bigr),

    so the objectives are :math:`o_i = w_i (\log L_i - \log \bar L_i)` with :math:`w` constant
    for autograd (:math:`\sum_i \nabla o_i = \nabla K g_\mu`, and an aggregator receives the
    rows :math:`w_i \nabla \log L_i`). :attr:`weights` are :math:`w` (with :math:`\lambda = 1`:
    :math:`K` times a softmax, summing to :math:`K`). As :math:`\mu \to 0` all weight goes to the
    task furthest above its warm-up loss (the Tchebycheff max); as :math:`\mu \to \infty` the
    weights tend to :math:`\lambda`.

    Warm-up (official): during the epochs before and including ``warmup_epoch`` (0-indexed,
    default 4) the objectives are :math:`\log L_i` (weights 1, the scale-invariant baseline);
    the mean losses of epoch ``warmup_epoch`` become :math:`\bar L` when it ends
    (``opt.end_epoch()``), and STCH runs from the next epoch on.

    Deviations: the official code computes :math:`\log(L / \bar L + 10^{-20})`; we use ``log(max(L,
    eps)) - log(max(L̄, eps))`` with ``eps`` = 1e-8 (see docs/methods/weightings.md, "Log losses")
    and raise ``ValueError`` on a negative loss. Epoch means follow the accumulator shared with DWA
    and IGB (every call, float64, an empty epoch is not counted).

    Partial labels are not supported (``supports_missing`` is False, and ``opt.backward`` with
    a ``None`` loss raises ``ValueError``): the smoothed maximum is taken over all K normalised
    losses, and dropping the absent ones would change which task is the worst, and so every
    weight, with the set of tasks in the batch.

    State (:meth:`state_dict`): :math:`\bar L` (:attr:`nadir`, the official name) and the
    epoch accumulator.

    Args:
        mu: the smoothing :math:`\mu` (official default 1).
        warmup_epoch: the 0-indexed epoch whose mean losses normalise the losses.
        preference: :math:`\lambda` (positive, K values), default all 1.
        eps: the floor under the losses before the logarithm.
    """

    separable = True

    def __init__(
        self,
        mu: float = 1.0,
        warmup_epoch: int = 4,
        *,
        preference: Sequence[float] | None = None,
        eps: float = LOG_EPS,
    ) -> None:
        if not (math.isfinite(mu) and mu > 0):
            raise ValueError(f"mu must be finite and positive, got {mu!r}")
        self.mu = mu
        self.warmup_epoch = check_int("warmup_epoch", warmup_epoch, 0)
        if preference is not None:
            preference = tuple(float(v) for v in preference)
            if not preference or not all(math.isfinite(v) and v > 0 for v in preference):
                raise ValueError(f"preference must be positive finite values, got {preference!r}")
        self.preference = preference
        self.eps = positive("eps", eps)
        self.nadir: Tensor | None = None
        self._epoch = EpochMeans()

    @property
    def epochs(self) -> int:
        return self._epoch.epochs

    def current_weights(self, log_losses: Tensor) -> Tensor:
        """The float64 weights :math:`w` for float64 detached log losses (after the warm-up)."""
        assert self.nadir is not None
        k = log_losses.numel()
        nadir = self.nadir.to(log_losses.device)
        if nadir.numel() != k:
            raise ValueError(f"{self!r} has {nadir.numel()} warm-up losses, got {k} losses")
        lam = self._lambda(log_losses)
        u = lam * (log_losses - safe_log(nadir, self.eps)) / self.mu
        return k * lam * torch.softmax(u, dim=0)

    def _lambda(self, like: Tensor) -> Tensor:
        if self.preference is None:
            return torch.ones_like(like)
        if len(self.preference) != like.numel():
            raise ValueError(f"{self!r} has {len(self.preference)} preferences, got {like.numel()}")
        return torch.tensor(self.preference, dtype=like.dtype, device=like.device)

    def forward(self, losses: Tensor) -> Tensor:
        check_nonnegative(losses, type(self).__name__)
        logs = safe_log(losses, self.eps)
        if self.nadir is None:
            self._epoch.add(losses, self)
            self.weights = torch.ones_like(losses.detach())
            return logs
        w = self.current_weights(logs.detach().to(torch.float64))
        shift = safe_log(self.nadir.to(device=losses.device, dtype=losses.dtype), self.eps)
        self.weights = w.to(losses.dtype)
        return self.weights * (logs - shift)

    def end_epoch(self) -> None:
        epoch = self._epoch.epochs
        mean = self._epoch.close()
        if mean is not None and self.nadir is None and epoch == self.warmup_epoch:
            self.nadir = mean

    def state_dict(self) -> dict[str, Any]:
        nadir = None if self.nadir is None else self.nadir.clone()
        return {**super().state_dict(), "nadir": nadir, **self._epoch.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        mine = pop_state(state, ("nadir", *EpochMeans.KEYS), self)
        super().load_state_dict(state)
        nadir = mine["nadir"]
        self.nadir = None if nadir is None else torch.as_tensor(nadir, dtype=torch.float64).clone()
        self._epoch.load_state_dict(mine)

    def __repr__(self) -> str:
        pref = "" if self.preference is None else f", preference={list(self.preference)!r}"
        return (
            f"{type(self).__name__}(mu={self.mu!r}, warmup_epoch={self.warmup_epoch!r}"
            f"{pref}, eps={self.eps!r})"
        )
