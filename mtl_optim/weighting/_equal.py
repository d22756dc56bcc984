from __future__ import annotations

import torch
from torch import Tensor

from ._base import Weighting


class Equal(Weighting):
    r"""Equal weighting: the objectives are the losses, :math:`w_i = 1`."""

    separable = True

    def forward(self, losses: Tensor) -> Tensor:
        self.weights = torch.ones_like(losses.detach())
        return losses
