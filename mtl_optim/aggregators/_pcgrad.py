from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from .._method import Seeded
from ._base import Aggregator
from ._partial import present_tasks, random_keys

Reduction = Literal["sum", "mean"]
_REDUCTIONS = get_args(Reduction)


class PCGrad(Seeded, Aggregator):
    r"""PCGrad: project each task gradient off the gradients it conflicts with.

    Yu et al., *Gradient Surgery for Multi-Task Learning*, NeurIPS 2020, arXiv `2001.06782
    <https://arxiv.org/abs/2001.06782>`_ (see docs/methods/aggregators.md, "PCGrad").

    For every task :math:`i`, start from :math:`\hat g_i = g_i` and visit the other tasks
    :math:`j` in a random order, drawn independently for each :math:`i`; whenever
    :math:`\hat g_i \cdot g_j < 0`,

    .. math::
        \hat g_i \leftarrow \hat g_i - \frac{\hat g_i \cdot g_j}{\lVert g_j \rVert^2}\, g_j ,

    always projecting onto the **original** :math:`g_j`. The direction is
    :math:`\sum_i \hat g_i` (``reduction="sum"``, the paper's and official default) or
    :math:`\frac1K \sum_i \hat g_i` (``"mean"``), applied to every coordinate alike. A zero
    :math:`g_j` has a zero dot product and never triggers a projection.

    :meth:`transform` returns the rows :math:`\hat g_i` (divided by K under ``"mean"``, so that
    the rows always sum to the direction); AdaTask feeds row :math:`i` to task :math:`i`'s
    moments. Every :math:`\hat g_i = g_i - \sum_j c_{ij} g_j` is a combination of the rows,
    so the projections run on the ``K×K`` Gramian :math:`G = J J^\top`
    (:math:`\hat g_i \cdot g_j = ((I - C) G)_{ij}`) and ``J`` is touched by two matrix
    products only. Without conflicts :math:`C = 0` and the rows are ``J`` exactly.

    The visiting orders come from a CPU ``torch.Generator`` seeded with ``seed`` (a random seed
    when ``None``); its state is in :meth:`state_dict`, so a resumed run draws the same orders.
    (The official TF code discards its shuffle, so its order is fixed.)

    **Partial labels.** With only m of the K tasks present, the rows are the present tasks'
    and each row visits the other present tasks in the order they have in an order drawn for
    all K tasks (the keys of a ``K×K`` draw, restricted): the generator advances as in a call
    with every task, and the divisor of ``"mean"`` is m.

    Args:
        reduction: ``"sum"`` (default) or ``"mean"``.
        seed: seed of the generator of the visiting orders.
    """

    def __init__(self, reduction: Reduction = "sum", *, seed: int | None = None) -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        super().__init__(seed)

    def forward(self, jacobian: Tensor) -> Tensor:
        # Σ_i ĝ_i = Σ_i (g_i - Σ_j C_ij g_j) = 1ᵀJ - (Cᵀ1)ᵀJ: two passes over J, where forming
        # the K edited rows and summing them took three and a K×d temporary; without conflict
        # (C = 0) the direction is still exactly the sum of the rows
        k = jacobian.shape[0]
        pulled = self.coefficients(self._gram(jacobian)).sum(dim=0)
        direction = jacobian.sum(dim=0) - pulled.to(jacobian.dtype) @ jacobian
        return direction / k if self.reduction == "mean" else direction

    def transform(self, jacobian: Tensor) -> Tensor:
        k = jacobian.shape[0]
        coef = self.coefficients(self._gram(jacobian))
        edited = jacobian - coef.to(jacobian.dtype) @ jacobian
        return edited / k if self.reduction == "mean" else edited

    @staticmethod
    def _gram(jacobian: Tensor) -> Tensor:
        work = jacobian.detach()
        if work.dtype not in (torch.float32, torch.float64):
            work = work.float()
        return work @ work.T

    def coefficients(self, gram: Tensor) -> Tensor:
        r"""The ``(K, K)`` matrix :math:`C` with :math:`\hat g_i = g_i - \sum_j C_{ij} g_j`,
        from the Gramian :math:`G = J J^\top` alone (draws the visiting orders: advances the
        generator). Used on its own where ``J`` is split by columns across processes."""
        k = gram.shape[0]
        sq_norms = gram.diagonal()
        safe = torch.where(sq_norms > 0, sq_norms, torch.ones_like(sq_norms))

        # order[i] lists the tasks j != i in a uniformly random order: argsort of iid uniforms,
        # with i itself pushed to the end and cut off.
        # On an accelerator the keys are drawn there (no host-to-device copy).
        dev = gram.device
        index, total = present_tasks(self, k)
        keys = random_keys(self, index, total, dev)
        order = keys.argsort(dim=1)[:, : k - 1]

        rows = torch.arange(k, device=gram.device)
        coef = torch.zeros_like(gram)  # ĝ_i = g_i - Σ_j coef[i, j] g_j
        for step in range(k - 1):
            other = order[:, step]
            # ĝ_i · g_j = G_ij - Σ_l coef[i, l] G_lj, for all i at once
            dots = gram[rows, other] - (coef * gram[other]).sum(dim=1)
            coef[rows, other] += torch.where(dots < 0, dots / safe[other], 0.0)
        return coef

    def __repr__(self) -> str:
        return f"PCGrad(reduction={self.reduction!r}, seed={self.seed})"
