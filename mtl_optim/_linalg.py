r"""Small numerical helpers shared by the methods: the Gramian, cosines, a guarded logarithm.

Methods import these from here, never from a sibling method file (see
docs/design.md, "Where helpers live").
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LOG_EPS", "TINY", "gramian", "normalized_gramian", "safe_log"]

#: A squared row norm at or below this counts as a zero row.
TINY = torch.finfo(torch.float64).tiny

#: Floor under the losses before a logarithm (see docs/methods/weightings.md, "Log losses").
LOG_EPS = 1e-8

_GRAM_CHUNK = 1 << 22  # elements of J upcast at a time by `gramian`


def gramian(jacobian: Tensor) -> Tensor:
    """``M = J Jᵀ`` (K×K, symmetric) accumulated in float64.

    A float32 Gramian can be off by ~1e-7·sqrt(d) of the squared norms, enough to turn nearly
    opposed gradients into a numerically unbounded problem for the solvers; so a non-float64
    ``J`` is upcast in column chunks of at most ``_GRAM_CHUNK`` elements, bounding the memory.
    """
    if jacobian.dtype == torch.float64:
        gram = jacobian @ jacobian.T
    else:
        k, d = jacobian.shape
        width = max(1, _GRAM_CHUNK // max(k, 1))
        gram = torch.zeros(k, k, dtype=torch.float64, device=jacobian.device)
        for start in range(0, d, width):
            chunk = jacobian[:, start : start + width].to(torch.float64)
            gram.addmm_(chunk, chunk.T)
    return 0.5 * (gram + gram.T)


def normalized_gramian(gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""The cosines :math:`C_{ij} = M_{ij} / (\lVert g_i\rVert \lVert g_j\rVert)` of the rows
    behind a Gramian :math:`M`, with the row norms and which rows are non-zero.

    A row whose squared norm is at most :data:`TINY` is a zero row: its cosine with every row
    (itself included) is 0 and its norm is reported as 1, so callers can divide by it. The
    division is done one norm at a time, so no product of two norms can overflow or underflow.

    Returns:
        ``(cosines, norms, active)``: ``(K, K)``, ``(K,)`` and a ``(K,)`` bool mask.
    """
    diag = gram.diagonal()
    active = diag > TINY
    norms = torch.where(active, diag, torch.ones_like(diag)).sqrt()
    both = active[:, None] & active[None, :]
    return torch.where(both, gram / norms[:, None] / norms[None, :], 0.0), norms, active


def safe_log(losses: Tensor, eps: float = LOG_EPS) -> Tensor:
    r""":math:`\log \max(L_i, \varepsilon)`; the gradient is :math:`1/L_i` where
    :math:`L_i > \varepsilon` and 0 where the floor is active."""
    return torch.log(torch.clamp(losses, min=eps))
