r"""SDMGrad: stochastic direction-oriented multi-objective gradient descent."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from .._validation import check_int, positive
from ._base import GramianWeightedAggregator
from ._partial import mass_restrict, present_tasks, scatter
from ._simplex import simplex_projection


class SDMGrad(GramianWeightedAggregator):
    r"""SDMGrad: a min-norm combination pulled towards the average gradient.

    Xiao, Ban & Ji, *Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms*, NeurIPS 2023, arXiv `2305.18409 <https://arxiv.org/abs/2305.18409>`_; official
    code OptMN-Lab/sdmgrad. With :math:`\bar g = J^\top\mathbf 1/K` the average gradient and the
    regularisation :math:`\lambda` (``lamda``), the task weights :math:`w \in \Delta` minimise

    .. math::
        \tfrac12 \lVert J^\top w + \lambda \bar g\rVert^2 ,
        \qquad \nabla = \hat M w + \lambda \hat M \mathbf 1/K ,

    and the direction is :math:`(J^\top w + \lambda\bar g)/(1 + \lambda)`, times K with
    ``scale_by_k=True`` (the official ``overwrite_grad``), i.e. the row weights
    :math:`(w + \lambda\mathbf 1/K)\,K/(1+\lambda)`. :math:`\lambda = 0` gives MGDA's problem,
    :math:`\lambda \to \infty` the mean gradient.

    **Inner solver (official).** :math:`\hat M = M / s^2` with
    :math:`s = \operatorname{mean}_i \sqrt{M_{ii} + 10^{-4}}`; then ``niter`` steps of SGD with
    learning rate ``w_lr`` (10) and heavy-ball momentum ``w_momentum`` (0.5) on the gradient
    above, each followed by the Euclidean projection onto the simplex (sort-based). The
    momentum buffer starts afresh at every call (the official code builds a new
    ``torch.optim.SGD`` each time) but :math:`w` is kept from the previous call (warm start;
    :math:`\mathbf 1/K` at first). The steps are large: for typical Gramians every iterate is a
    vertex of the simplex, as in the official code. The constant :math:`10^{-4}` is absolute,
    so the weights are not invariant to the scale of ``J`` (official).

    **One batch.** The paper and the official code use three independent mini-batches: one for
    the direction (:math:`\zeta`) and two for an unbiased estimate :math:`\xi_1\xi_2^\top` of the
    Gramian. An aggregator receives one ``J``, so we use :math:`M = JJ^\top` for both. (The
    official NYUv2/Cityscapes code in fact does the same: its three gradient buffers are one
    tensor repeated, ``[torch.Tensor(...)] * 3``, so all three hold the last batch's gradients.)

    Everything runs in float64 on the Gramian's device with no host sync (the official code
    projects in NumPy on the CPU at every step). The official step then clips the shared
    gradient to ``max_norm``, which the optimizer does. :math:`w` and the number of tasks,
    fixed by the first call, are in :meth:`state_dict`. The objective-sampling variant
    SDMGrad-OS is not provided.

    **Partial labels.** With only m of the K tasks present (the rows are theirs), the solve is
    the m-task problem (with :math:`\bar g` the mean of the present gradients and ``scale_by_k``
    multiplying by m), warm-started from the present tasks' weights rescaled to sum to 1; the
    result is written back rescaled to their former total, so the missing tasks' weights are
    unchanged and the K weights stay on the simplex (present weights that are all 0 are read
    as uniform and stay 0). A first call that already misses a task starts the present tasks
    from :math:`1/m` and stores :math:`1/K` for the others.

    Args:
        lamda: the regularisation :math:`\lambda \ge 0` (official default 0.3).
        niter: the number of inner projected-SGD steps (official default 20).
        w_lr: the inner learning rate (official 10).
        w_momentum: the inner momentum, in [0, 1) (official 0.5).
        scale_by_k: multiply the weights by K (official).
        max_norm: the official clipping norm of the shared gradient (default 1.0), applied by
            the optimizer; ``None`` disables it.
    """

    def __init__(
        self,
        lamda: float = 0.3,
        niter: int = 20,
        *,
        w_lr: float = 10.0,
        w_momentum: float = 0.5,
        scale_by_k: bool = True,
        max_norm: float | None = 1.0,
    ) -> None:
        if not (lamda >= 0 and math.isfinite(lamda)):
            raise ValueError(f"lamda must be a finite non-negative number, got {lamda!r}")
        check_int("niter", niter, 0)
        positive("w_lr", w_lr)
        if not 0 <= w_momentum < 1:
            raise ValueError(f"w_momentum must be in [0, 1), got {w_momentum!r}")
        if max_norm is not None:
            positive("max_norm", max_norm)
        self.lamda = float(lamda)
        self.niter = niter
        self.w_lr = float(w_lr)
        self.w_momentum = float(w_momentum)
        self.scale_by_k = bool(scale_by_k)
        self.max_norm = None if max_norm is None else float(max_norm)
        self._w: Tensor | None = None  # simplex weights, float64

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        k = gram.shape[0]
        gram = gram.to(torch.float64)
        index, num_tasks = present_tasks(self, k)
        w = self._w
        if w is None:
            w = torch.full((num_tasks,), 1.0 / num_tasks, dtype=torch.float64, device=gram.device)
        elif w.shape[0] != num_tasks:
            raise ValueError(f"SDMGrad was first called with {w.shape[0]} tasks, now {num_tasks}")
        w = w.to(gram.device)
        full, mass = w, None
        if index is not None and self._w is None:  # a fresh m-task start, their share of K
            w = torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
            mass = torch.tensor(k / num_tasks, dtype=torch.float64, device=gram.device)
        elif index is not None:  # the present weights rescaled to the m-simplex
            w, mass = mass_restrict(full, index, 1.0)
        scale = torch.sqrt(gram.diagonal() + 1e-4).mean()
        m = gram / scale**2
        target = self.lamda * m.mean(dim=1)
        buf = torch.zeros_like(w)
        for it in range(self.niter):
            grad = m @ w + target
            buf = grad if it == 0 else self.w_momentum * buf + grad
            w = simplex_projection(w - self.w_lr * buf)
        self._w = w if index is None else scatter(full, index, cast(Tensor, mass) * w)
        factor = (k if self.scale_by_k else 1.0) / (1.0 + self.lamda)
        return (w + self.lamda / k) * factor

    def state_dict(self) -> dict[str, Any]:
        return {"w": None if self._w is None else self._w.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"w"}:
            raise ValueError(f"SDMGrad state must have the key 'w', got {sorted(state)}")
        w = state["w"]
        self._w = None if w is None else torch.as_tensor(w, dtype=torch.float64).clone()

    def __repr__(self) -> str:
        return (
            f"SDMGrad(lamda={self.lamda}, niter={self.niter}, w_lr={self.w_lr}, "
            f"w_momentum={self.w_momentum}, scale_by_k={self.scale_by_k}, "
            f"max_norm={self.max_norm})"
        )
