from __future__ import annotations

import torch
from torch import Tensor

from ._base import GramianWeightedAggregator


class Mean(GramianWeightedAggregator):
    r"""Average :math:`\frac{1}{K}\sum_i g_i` of the per-task gradients."""

    def weights(self, jacobian: Tensor) -> Tensor:
        k = jacobian.shape[0]
        return torch.full((k,), 1.0 / k, dtype=jacobian.dtype, device=jacobian.device)

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        return torch.full(
            (gram.shape[0],), 1.0 / gram.shape[0], dtype=torch.float64, device=gram.device
        )

    def forward(self, jacobian: Tensor) -> Tensor:
        return jacobian.mean(dim=0)
