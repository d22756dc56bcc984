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

_GRAM_CHUNK = 1 << 22  # elements of J upcast at a time by `gramian` on an accelerator
_GRAM_CHUNK_CPU = 1 << 16  # on the CPU: a 512 KiB float64 block, which stays in cache


def gramian(jacobian: Tensor) -> Tensor:
    """``M = J Jᵀ`` (K×K, symmetric) accumulated in float64.

    A float32 Gramian can be off by ~1e-7·sqrt(d) of the squared norms, enough to turn nearly
    opposed gradients into a numerically unbounded problem for the solvers; so a non-float64
    ``J`` is upcast in column chunks, each copied into one reused float64 block whose Gramian
    is added to the sum. The products of float32 numbers are exact in float64, so only the
    float64 sums round. On the CPU the block holds ``_GRAM_CHUNK_CPU`` elements and stays in
    cache: against a fresh multi-megabyte float64 copy per chunk and ``addmm_`` (whose small
    ``K×K`` output took a slow kernel) this is 3-5x faster for ``d = 10⁶`` (measured in
    ``benchmarks/vs_torchjd.py``'s MLP cases).
    """
    if jacobian.dtype == torch.float64:
        gram = jacobian @ jacobian.T
    else:
        k, d = jacobian.shape
        chunk = _GRAM_CHUNK_CPU if jacobian.device.type == "cpu" else _GRAM_CHUNK
        width = max(1, min(d, chunk // max(k, 1)))
        gram = torch.zeros(k, k, dtype=torch.float64, device=jacobian.device)
        part = torch.empty_like(gram)
        block = torch.empty(k, width, dtype=torch.float64, device=jacobian.device)
        for start in range(0, d, width):
            cols = jacobian[:, start : start + width]
            upcast = block if cols.shape[1] == width else block[:, : cols.shape[1]]
            upcast.copy_(cols)
            gram += torch.mm(upcast, upcast.T, out=part)
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
