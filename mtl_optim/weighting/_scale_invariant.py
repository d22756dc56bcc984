"""Scale-invariant ("SI") loss weighting: the objectives are the log losses."""

from __future__ import annotations

import torch
from torch import Tensor

from .._linalg import LOG_EPS, safe_log
from .._validation import check_nonnegative, positive
from ._base import Weighting


class ScaleInvariant(Weighting):
    r"""Scale-invariant loss balancing ("SI", the baseline of IGB, Dai et al., UAI 2023).

    .. math::
        o_i = \log \max(L_i, \varepsilon), \qquad
        \frac{\partial o_i}{\partial L_i} = \frac{1}{L_i},

    so :math:`\nabla \sum_i o_i = \sum_i \nabla L_i / L_i`: multiplying a task's loss by a
    constant does not change the update. The reported :attr:`weights` are 1 (the weights of the
    log objectives, as in IGB before its base losses exist).

    Decisions (see docs/methods/weightings.md, "Log losses"): the logarithm is floored at ``eps`` =
    1e-8 (losses of exactly 0 would give ``-inf``; below the floor the objective is constant, so the
    task gets no gradient), and a negative loss raises ``ValueError``.

    Partial labels (``supports_missing``): the objectives are the present tasks' log losses,
    :math:`\sum_{i \in P} \nabla L_i / L_i`.

    Args:
        eps: the floor under the losses before the logarithm.
    """

    separable = True
    supports_missing = True

    def __init__(self, eps: float = LOG_EPS) -> None:
        self.eps = positive("eps", eps)

    def forward(self, losses: Tensor) -> Tensor:
        check_nonnegative(losses, type(self).__name__)
        self.weights = torch.ones_like(losses.detach())
        return safe_log(losses, self.eps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps!r})"
