from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator


class Sum(GramianWeightedAggregator):
    r"""Unweighted sum :math:`\sum_i g_i = \nabla_{\theta_s} \sum_i L_i` (linear scalarisation)."""

    def weights(self, jacobian: Tensor) -> Tensor:
        return torch.ones(jacobian.shape[0], dtype=jacobian.dtype, device=jacobian.device)

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        return torch.ones(gram.shape[0], dtype=torch.float64, device=gram.device)

    def forward(self, jacobian: Tensor) -> Tensor:
        return jacobian.sum(dim=0)

    def transform(self, jacobian: Tensor) -> Tensor:
        return jacobian
