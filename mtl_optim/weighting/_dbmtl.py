"""DB-MTL: dual balancing of loss scales (log losses) and gradient magnitudes."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._linalg import LOG_EPS, safe_log
from .._validation import check_nonnegative, positive
from ._base import Weighting
from ._epoch_means import pop_state


class DBMTL(Weighting):
    r"""Dual-Balancing Multi-Task Learning (Lin, Ye, Xu, Shi, Zhang, Kwok et al.,
    "Dual-Balancing Multi-Task Learning", arXiv 2308.12029, 2023; the LibMTL ``DB_MTL``).

    **Loss-scale balancing**: the objectives are the log losses :math:`o_i = \log L_i`, so the
    optimizer's rows are :math:`J_i = \nabla \log L_i` (task-specific parameters get
    :math:`\nabla \sum_i \log L_i`). **Gradient-magnitude balancing** (:meth:`observe`): at the
    :math:`t`-th step (1-based) the rows are averaged exponentially,

    .. math::
        \beta_t = \frac{\beta}{t^{\sigma}}, \qquad
        \hat g_{t,i} = \beta_t\, \hat g_{t-1,i} + (1 - \beta_t)\, J_i, \qquad
        \hat g_{0} = 0,

    and rescaled to the largest norm,

    .. math::
        a_i = \frac{\max_j \lVert \hat g_{t,j} \rVert}{\lVert \hat g_{t,i} \rVert}, \qquad
        \text{rows } a_i \hat g_{t,i},

    which the aggregator combines (default: their sum, the paper's update). Every returned row
    has the norm :math:`\max_j \lVert \hat g_{t,j} \rVert`.

    **Reported weights.** :attr:`weights` (and so ``opt.last_weights``, times an aggregator's
    row weights) are the effective task weights :math:`a` — the factors applied to the
    averaged log-loss gradients — not the 1s of the log objectives. They depend on the
    gradients, so :meth:`forward` (before the gradients exist) sets :attr:`weights` to a fresh
    tensor of ones and :meth:`observe` fills that same tensor with :math:`a`; after
    ``opt.backward`` it holds this step's :math:`a`. It stays 1 where :meth:`observe` does not
    run (no shared parameters, or a batch skipped for non-finite values before the rows were
    formed). :attr:`scales` holds the same :math:`a` (float64).

    Defaults (LibMTL): :math:`\beta` = 0.9, :math:`\sigma` (``beta_sigma``) = 0.

    Deviations: the official code computes :math:`\log(L + 10^{-8})` and :math:`a_i =
    \max_j\lVert\hat g_j\rVert / (\lVert\hat g_i\rVert + 10^{-8})`; we use ``log(max(L, eps))`` (see
    docs/methods/weightings.md, "Log losses"; ``ValueError`` on a negative loss) and divide exactly
    (a zero row stays zero), so the result does not depend on the gradients' scale. The average
    advances once per optimizer step, not per ``backward``: :meth:`observe` computes :math:`\hat
    g_t` from the committed :math:`\hat g_{t-1}` and the (accumulated) rows, and :meth:`after_step`
    commits it, so several ``backward`` calls before a ``step`` and skipped non-finite steps do not
    advance :math:`t`. With ``features=`` the representation must keep its size across batches
    (LibMTL refuses representation gradients).

    Partial labels are not supported (``supports_missing`` is False, and ``opt.backward`` with
    a ``None`` loss raises ``ValueError``): the averaged gradients share one step count
    :math:`t` and its decay :math:`\beta_t`, and every row is rescaled to the largest averaged
    norm over all K tasks, so a task without a gradient has no honest row or average to use.

    State (:meth:`state_dict`): :math:`\hat g` (``(K, d)``) and :math:`t`.

    Args:
        beta: the averaging factor :math:`\beta \in [0, 1)`.
        beta_sigma: the decay exponent :math:`\sigma \ge 0` of :math:`\beta_t`.
        eps: the floor under the losses before the logarithm.
    """

    needs_jacobian = True
    separable = True
    rollback = False  # the EMA moves only in after_step, never for a skipped step

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = LOG_EPS) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        if not (math.isfinite(beta_sigma) and beta_sigma >= 0):
            raise ValueError(f"beta_sigma must be finite and >= 0, got {beta_sigma!r}")
        self.beta, self.beta_sigma = beta, beta_sigma
        self.eps = positive("eps", eps)
        self.steps = 0
        self.average: Tensor | None = None  # the committed EMA of the rows
        self.scales: Tensor | None = None
        self._pending: Tensor | None = None  # this window's EMA, committed by after_step

    def forward(self, losses: Tensor) -> Tensor:
        check_nonnegative(losses, type(self).__name__)
        self.weights = torch.ones_like(losses.detach())
        return safe_log(losses, self.eps)

    def observe(self, jacobian: Tensor) -> Tensor:
        rows = jacobian.detach()
        previous = self.average
        if previous is None:
            previous = torch.zeros_like(rows)
        elif previous.shape != rows.shape:
            raise ValueError(
                f"{self!r} averages rows of shape {tuple(previous.shape)}, got "
                f"{tuple(rows.shape)}; with features= the representation must keep its size"
            )
        beta = self.beta / (self.steps + 1) ** self.beta_sigma
        average = rows + beta * (previous.to(rows) - rows)
        self._pending = average
        norms = torch.linalg.vector_norm(average, dim=1, dtype=torch.float64)
        scales = torch.where(norms > 0, norms.max() / norms, torch.zeros_like(norms))
        self.scales = scales
        if self.weights is not None and self.weights.shape == scales.shape:
            self.weights.copy_(scales)  # in place: the tensor the optimizer already holds
        else:
            self.weights = scales.clone()
        return scales.to(average.dtype).unsqueeze(1) * average

    def after_step(self) -> None:
        if self._pending is not None:
            self.average, self._pending = self._pending, None
            self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        average = None if self.average is None else self.average.clone()
        return {**super().state_dict(), "average": average, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        mine = pop_state(state, ("average", "steps"), self)
        super().load_state_dict(state)
        average = mine["average"]
        self.average = None if average is None else average.clone()
        self.steps, self._pending = int(mine["steps"]), None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(beta={self.beta!r}, beta_sigma={self.beta_sigma!r}, "
            f"eps={self.eps!r})"
        )
