"""GLS: geometric loss strategy."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import positive
from ._base import Weighting
from ._scale_invariant import LOG_EPS, check_nonnegative, safe_log


class GLS(Weighting):
    r"""Geometric Loss Strategy (Chennupati et al., "MultiNet++: Multi-Stream Feature Aggregation
    and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019).

    The total loss is the geometric mean of the task losses,

    .. math::
        G = \Bigl(\prod_{j=1}^K L_j\Bigr)^{1/K}
          = \exp\Bigl(\frac1K \sum_j \log \max(L_j, \varepsilon)\Bigr),

    written as per-task objectives with constant weights,

    .. math::
        o_i = w_i L_i, \qquad w_i = \frac{\partial G}{\partial L_i} = \frac{G}{K L_i}
        \quad (\text{detached}),

    so :math:`\sum_i o_i = G` in value and :math:`\sum_i \nabla o_i = \nabla G` in gradient,
    while an aggregator receives the distinct per-task rows :math:`w_i \nabla L_i` (an even split
    :math:`o_i = G/K` would give it K identical rows). Since
    :math:`\nabla G = \frac GK \sum_j \nabla \log L_j`, the direction is that of the
    scale-invariant log weighting, scaled by :math:`G/K`.

    Decisions: ``log(max(L, eps))`` with ``eps`` = 1e-8 (a zero loss would make :math:`G = 0`
    and the weights undefined; a floored task gets weight and gradient 0) and ``ValueError`` on a
    negative loss (the geometric mean is undefined).

    Partial labels are not supported (``supports_missing`` is False, and ``opt.backward`` with
    a ``None`` loss raises ``ValueError``): the objective is the geometric mean of all K losses,
    and a mean over only the present tasks would be a different quantity whose scale jumps with
    the set of tasks in the batch.

    Args:
        eps: the floor under the losses before the logarithm.
    """

    separable = True

    def __init__(self, eps: float = LOG_EPS) -> None:
        self.eps = positive("eps", eps)

    def forward(self, losses: Tensor) -> Tensor:
        check_nonnegative(losses, type(self).__name__)
        values = losses.detach()
        g = torch.exp(safe_log(values, self.eps).mean())
        w = g / (values.numel() * values.clamp(min=self.eps))
        self.weights = torch.where(values >= self.eps, w, torch.zeros_like(w))
        return self.weights * losses

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps!r})"
