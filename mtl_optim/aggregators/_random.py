r"""Random gradient weighting (RGW)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._method import Seeded
from ._base import GramianWeightedAggregator
from ._partial import present_tasks


class Random(Seeded, GramianWeightedAggregator):
    r"""Random weights :math:`w = \operatorname{softmax}(\tilde\lambda)`,
    :math:`\tilde\lambda \sim \mathcal N(0, I_K)`, drawn afresh at every call.

    Lin et al., *Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task
    Learning*, TMLR 2022, arXiv `2111.10603 <https://arxiv.org/abs/2111.10603>`_ (LibMTL's
    "RGW"). The weights are positive and sum to 1; the direction is :math:`J^\top w`.

    The draws come from a CPU ``torch.Generator`` seeded with ``seed`` (a random seed when
    ``None``), in float64 whatever ``J``'s dtype; the weights are then moved to ``J``'s device
    and dtype. The generator's state is in :meth:`state_dict`, so a resumed run draws the same
    weights. :meth:`forward` and :meth:`transform` each draw once.

    **Partial labels.** With only m of the K tasks present, K numbers are still drawn (so the
    generator advances as in a call with every task) and the softmax is taken over the present
    tasks' draws: the weights of the m rows sum to 1.

    Args:
        seed: seed of the generator.
    """

    def __init__(self, *, seed: int | None = None) -> None:
        super().__init__(seed)

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        index, k = present_tasks(self, gram.shape[0])
        logits = torch.randn(k, generator=self.generator, dtype=torch.float64)
        if index is not None:
            logits = logits[index]
        return torch.softmax(logits, dim=0).to(gram.device)

    def __repr__(self) -> str:
        return f"Random(seed={self.seed})"
