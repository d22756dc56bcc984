r"""GradVac: raise each pair's gradient cosine to an adaptive (EMA) target."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._linalg import gramian
from .._method import Seeded
from .._validation import positive
from ._base import GramianWeightedAggregator
from ._partial import on, present_tasks, random_keys, restrict_pairs


class GradVac(Seeded, GramianWeightedAggregator):
    r"""Gradient Vaccine: PCGrad with an adaptive, per-pair target cosine.

    Wang et al., *Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models*, ICLR 2021, arXiv
    `2010.05874 <https://arxiv.org/abs/2010.05874>`_ (Algorithm 1; LibMTL's ``GradVac``).

    For every task :math:`i`, start from :math:`\hat g_i = g_i` and visit the other tasks
    :math:`j` in a random order, drawn independently for each :math:`i`. With
    :math:`\phi_{ij} = \cos(\hat g_i, g_j)` and the target :math:`\hat\phi_{ij}`, whenever
    :math:`\phi_{ij} < \hat\phi_{ij}`,

    .. math::
        \hat g_i \leftarrow \hat g_i + \frac{\lVert\hat g_i\rVert\,\big(\hat\phi_{ij}
            \sqrt{1-\phi_{ij}^2} - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}
            {\lVert g_j\rVert\sqrt{1-\hat\phi_{ij}^2}}\; g_j ,

    which makes :math:`\cos(\hat g_i, g_j) = \hat\phi_{ij}` exactly; then, whether or not it
    corrected, :math:`\hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi_{ij}` (the
    paper's Equation 3, with :math:`\hat\phi^{(0)} = 0`). The direction is
    :math:`\sum_i \hat g_i`. Each :math:`\hat g_i = \sum_k C_{ik} g_k` is a combination of the
    rows, so everything runs on the ``K×K`` Gramian: this is a weighted aggregator with weights
    :math:`w = \mathbf 1^\top C`, and :meth:`transform` returns the rows :math:`\hat g_i`
    (for AdaTask). The first call (all targets 0) is PCGrad.

    **State.** The targets :math:`\hat\phi` (a ``K×K`` float64 tensor, created at the first
    call; K is then fixed) and the generator of the visiting orders (seeded with ``seed``; a random
    seed when ``None``) are in :meth:`state_dict` under ``"targets"`` (``None`` before the first
    call) and ``"generator"``, so a resumed run is bit-identical. Every call (``weights``,
    ``forward`` or ``transform``) advances both. In distributed training give every rank the same
    ``seed`` (the orders must agree; see docs/design.md, "Distributed training").

    **Partial labels.** With only m of the K tasks present, the rows are the present tasks':
    the visiting orders are those of a ``K×K`` draw restricted to them (the generator advances
    as in a call with every task), the targets read are those of the pairs of present tasks,
    and only those targets move; a target of a pair with a missing task is left as it is. The
    targets are ``K×K`` even when the first call already misses a task.

    **Deviations.** (a) LibMTL updates :math:`\hat\phi_{ij}` only inside the correction branch,
    so its targets can only decrease from 0; we follow the paper (and TorchJD). ``beta=0.5``
    is LibMTL's and TorchJD's default. (b) The official ``+1e-8`` in the denominators is
    replaced by scale-free guards: a zero :math:`\hat g_i` or :math:`g_j` has cosine 0 and is
    never corrected, and :math:`1 - \hat\phi_{ij}^2` is floored at ``eps``; so scaling ``J``
    scales the direction and leaves the weights unchanged. (c) The paper and LibMTL can apply
    the method per parameter group (``"all_layer"``, ``"all_matrix"``) with one target per
    group; an aggregator sees only the flat ``(K, d)`` matrix, so we implement the
    ``"whole_model"`` granularity (LibMTL's default).

    **Host syncs.** None: the loop runs over the K - 1 visiting steps, the branches are
    ``torch.where`` and the orders are drawn on ``J``'s device (on the CPU from the seeded
    generator itself, as PCGrad; elsewhere from a device generator seeded by one draw of it).

    Args:
        beta: the EMA rate :math:`\beta \in [0, 1]` of the targets (0 keeps them at 0: PCGrad).
        eps: the floor of :math:`1 - \hat\phi_{ij}^2`.
        seed: seed of the generator of the visiting orders.
    """

    def __init__(self, beta: float = 0.5, *, eps: float = 1e-8, seed: int | None = None) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        self.beta = float(beta)
        self.eps = positive("eps", eps)
        self.targets: Tensor | None = None
        super().__init__(seed)

    def coefficients(self, gram: Tensor) -> Tensor:
        r"""The ``(K, K)`` float64 matrix :math:`C` with :math:`\hat g_i = \sum_k C_{ik} g_k`.

        Advances the targets and the generator.
        """
        gram = gram.to(torch.float64)
        k, dev = gram.shape[0], gram.device
        index, num_tasks = present_tasks(self, k)
        if self.targets is None:
            self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=dev)
        elif self.targets.shape[0] != num_tasks:
            raise ValueError(
                f"{self!r} was first called with {self.targets.shape[0]} tasks, now {num_tasks}"
            )
        stored = self.targets.to(dev)
        previous = restrict_pairs(stored, index)
        targets = previous.clone()

        # order[i] lists the tasks j != i in a uniformly random order, as in PCGrad
        keys = random_keys(self, index, num_tasks, dev)
        order = keys.argsort(dim=1)[:, : k - 1]

        rows = torch.arange(k, device=dev)
        norms = gram.diagonal().clamp(min=0.0).sqrt()
        coef = torch.eye(k, dtype=torch.float64, device=dev)
        dots = gram.clone()  # dots[i, l] = ĝ_i · g_l = (C G)_il
        for step in range(k - 1):
            other = order[:, step]
            norm_i = (coef * dots).sum(dim=1).clamp(min=0.0).sqrt()  # ‖ĝ_i‖² = (C G Cᵀ)_ii
            norm_j = norms[other]
            nonzero = (norm_i > 0) & (norm_j > 0)
            denom = torch.where(nonzero, norm_i * norm_j, 1.0)
            cos = torch.where(nonzero, dots[rows, other] / denom, 0.0).clamp(-1.0, 1.0)
            target = targets[rows, other]
            sin_target = (1.0 - target * target).clamp(min=self.eps).sqrt()
            sin_cos = (1.0 - cos * cos).clamp(min=0.0).sqrt()
            scale = norm_i / (torch.where(nonzero, norm_j, 1.0) * sin_target)
            w = scale * (target * sin_cos - cos * sin_target)
            w = torch.where(nonzero & (cos < target), w, 0.0)
            coef[rows, other] += w
            dots += w.unsqueeze(1) * gram[other]
            targets[rows, other] = (1.0 - self.beta) * target + self.beta * cos
        # a non-finite J (which MTLOptimizer skips anyway) must not poison the targets
        finite = torch.isfinite(gram).all()
        targets = torch.where(finite, targets, previous)
        if index is not None:  # write back the pairs of present tasks only
            idx = on(index, dev)
            targets = stored.index_put((idx[:, None], idx[None, :]), targets)
        self.targets = targets
        return torch.where(finite, coef, torch.nan)

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        return self.coefficients(gram).sum(dim=0)

    def transform(self, jacobian: Tensor) -> Tensor:
        j = jacobian.detach()
        if not j.is_floating_point():
            j = j.double()
        coef = self.coefficients(gramian(j))
        return coef.to(device=jacobian.device, dtype=j.dtype) @ j

    def state_dict(self) -> dict[str, Any]:
        targets = None if self.targets is None else self.targets.clone()
        return {**super().state_dict(), "targets": targets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "targets" not in state:
            raise ValueError(f"{self!r}: the state has no 'targets' entry")
        targets = state.pop("targets")
        super().load_state_dict(state)
        self.targets = None if targets is None else targets.to(torch.float64).clone()

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, eps={self.eps}, seed={self.seed})"
