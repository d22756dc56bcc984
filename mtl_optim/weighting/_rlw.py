"""RLW: random loss weighting."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from .._method import Seeded
from .._validation import positive
from ._base import Weighting
from ._present import num_tasks, present_index

Distribution = Literal["normal", "dirichlet"]
_DISTRIBUTIONS = get_args(Distribution)


class RLW(Seeded, Weighting):
    r"""Random loss weighting (Lin et al., "Reasonable Effectiveness of Random Weighting: A
    Litmus Test for Multi-Task Learning", TMLR 2022, arXiv 2111.10603).

    Every call draws fresh weights and returns :math:`o_i = w_i L_i` (the weights are constants
    for autograd):

    * ``distribution="normal"`` (the paper's default):
      :math:`\tilde\lambda \sim \mathcal N(0, I_K)`,
      :math:`w = s \cdot \operatorname{softmax}(\tilde\lambda)`;
    * ``distribution="dirichlet"``: :math:`w = s \cdot p` with
      :math:`p \sim \operatorname{Dirichlet}(1, \dots, 1)`, i.e. uniform on the simplex, drawn as
      normalised Gamma(1) = Exp(1) variables :math:`p_i = e_i / \sum_j e_j`.

    The weights always sum to the ``scale`` :math:`s`.

    Decisions (see docs/methods/weightings.md, "RLW"): ``scale`` defaults to 1 as in LibMTL and the
    Nash-MTL port (IGB's port uses :math:`s = K`, which multiplies the effective learning rate by
    :math:`K`). The draws come from a private CPU ``torch.Generator`` in float64 (then cast to the
    losses' dtype and device), so they do not touch the global RNG; ``seed=None`` seeds it
    nondeterministically. Its state is in :meth:`state_dict`, so a resumed run draws the same
    weights as an uninterrupted one.

    Partial labels (``supports_missing``): every call still draws :math:`K` numbers (the
    generator advances as in an all-present call, so the stream does not depend on which tasks
    are present, and matches across processes), and the weights are formed over the present
    tasks :math:`P` only: :math:`w_P = s \cdot \operatorname{softmax}(\tilde\lambda_P)`, or
    :math:`w_P = s \cdot e_P / \sum_{j \in P} e_j`; they sum to :math:`s` over :math:`P`.

    Args:
        distribution: ``"normal"`` or ``"dirichlet"``.
        scale: the sum of the weights.
        seed: the generator's seed, or ``None``.
    """

    separable = True
    supports_missing = True

    def __init__(
        self, distribution: Distribution = "normal", scale: float = 1.0, seed: int | None = None
    ) -> None:
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
        self.distribution = distribution
        self.scale = positive("scale", scale)
        super().__init__(seed)

    def sample(self, k: int, present: Tensor | None = None) -> Tensor:
        """Draw the next ``(k,)`` float64 weights (summing to ``scale``) from the generator;
        with ``present`` (task indices), the ``(m,)`` weights of those tasks, formed from the
        same ``k`` draws restricted to them."""
        if self.distribution == "normal":
            z = torch.randn(k, generator=self.generator, dtype=torch.float64)
            if present is not None:
                z = z[present]
            return self.scale * torch.softmax(z, dim=0)
        e = torch.empty(k, dtype=torch.float64).exponential_(1.0, generator=self.generator)
        if present is not None:
            e = e[present]
        return self.scale * e / e.sum()

    def forward(self, losses: Tensor) -> Tensor:
        index = present_index(self, losses.numel())
        if index is None:
            w = self.sample(losses.numel())
        else:
            w = self.sample(num_tasks(self, losses.numel()), index)
        w = w.to(dtype=losses.dtype, device=losses.device)
        self.weights = w
        return w * losses

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(distribution={self.distribution!r}, scale={self.scale!r}, "
            f"seed={self.seed!r})"
        )
