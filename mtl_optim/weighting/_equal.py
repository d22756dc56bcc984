from __future__ import annotations

import torch
from torch import Tensor

from ._base import Weighting


class Equal(Weighting):
    r"""Equal weighting: the objectives are the losses, :math:`w_i = 1`.

    Partial labels (``supports_missing``): the objectives are the present tasks' losses, so the
    update is :math:`\sum_{i \in P} \nabla L_i` (no rescaling by :math:`K/m`).
    """

    separable = True
    supports_missing = True

    def forward(self, losses: Tensor) -> Tensor:
        self.weights = torch.ones_like(losses.detach())
        return losses
