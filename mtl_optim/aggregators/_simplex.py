"""Euclidean projection onto the probability simplex, shared by the simplex solvers."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex by sorting."""
    desc = np.sort(v)[::-1]
    cumsum = np.cumsum(desc) - 1.0
    ranks = np.arange(1, v.size + 1)
    rho = np.nonzero(desc - cumsum / ranks > 0)[0][-1]
    return np.maximum(v - cumsum[rho] / (rho + 1), 0.0)


def simplex_projection(v: Tensor) -> Tensor:
    r"""Euclidean projection of ``v`` onto the probability simplex along its last dimension.

    The sort-based algorithm of :func:`project_to_simplex`
    (the largest :math:`\rho` with :math:`u_\rho > (\sum_{j\le\rho} u_j - 1)/\rho` for the
    sorted :math:`u`, then :math:`\max(v - \theta, 0)`), in torch on ``v``'s device with no
    host sync. A non-finite ``v`` gives a non-finite result.
    """
    desc = v.sort(dim=-1, descending=True).values
    cumsum = desc.cumsum(dim=-1) - 1.0
    ranks = torch.arange(1, v.shape[-1] + 1, dtype=v.dtype, device=v.device)
    # The condition holds for a prefix of the ranks, always including the first.
    rho = (desc - cumsum / ranks > 0).sum(dim=-1, keepdim=True).clamp(min=1)
    theta = cumsum.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp(min=0.0)
