"""Uncertainty weighting (Kendall et al.); its variants live beside it (``_grouped_uncertainty.py``,
``_constrained_uncertainty.py``) over the log-variances of ``_log_variance.py``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._validation import check_num_tasks
from ._log_variance import _UncertaintyBase


class Uncertainty(_UncertaintyBase):
    r"""Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018; see
    docs/methods/weightings.md, "Uncertainty weighting").

    With one learnable log-variance :math:`s_i = \log \sigma_i^2` per task and a factor
    :math:`k_i` (2 by default),

    .. math::
        o_i = \frac{e^{-s_i}}{k_i} L_i + \tfrac12 s_i, \qquad
        w_i = \frac{\partial o_i}{\partial L_i} = \frac{e^{-s_i}}{k_i}, \qquad
        \frac{\partial o_i}{\partial s_i} = -\frac{e^{-s_i}}{k_i} L_i + \tfrac12 .

    With :math:`k_i = 2` this is the paper's regression term :math:`L/(2\sigma^2) + \log\sigma`
    and the Nash-MTL / LibMTL form :math:`\tfrac12(e^{-s}L + s)` (the spec's default); the
    paper's classification term :math:`L/\sigma^2 + \log\sigma` is :math:`k_i = 1`, and URL's
    :math:`L/(k_i e^{s}) + s/2` with :math:`k = (1, 2, 2)` is ``factors=(1, 2, 2)``. For a fixed
    loss, :math:`o_i` is minimised at :math:`s_i = \log(2 L_i / k_i)` (:math:`\log L_i` by
    default), where :math:`w_i = 1/(2 L_i)`: the weights drift towards inverse losses.

    :attr:`weights` are the detached :math:`e^{-s_i}/k_i`. Every :math:`s_i` is a 0-d
    ``nn.Parameter``, returned by :meth:`parameters` (:attr:`log_vars` holds their values as one
    ``(K,)`` tensor); ``MTLOptimizer`` trains them with the model's base optimizer in their own
    param group with :attr:`param_group_options` (``{"lr": lr}``), and checkpoints their values
    (the base state dict) and their optimizer state (the optimizer's).

    Partial labels (``supports_missing``): the objectives are those of the present tasks
    :math:`P`; :math:`s_i` of a missing task is not in their graph, so its ``.grad`` stays
    ``None`` and the base optimizer does not move it or its state.

    Decisions: ``init`` = 0 and ``lr`` = 0.025 (Nash-MTL / IGB ``uw``; LibMTL uses
    ``init=-0.5`` and the model's learning rate, i.e. ``lr=None``). ``clip=(lo, hi)`` (TAG
    clips :math:`s` to [0.01, 10]) is a projection: before each use :math:`s` is clamped in place
    into the interval, so a step that leaves the interval is undone at the next call and the
    parameter never gets stuck with the zero gradient of a clamp inside the graph. The objectives
    are computed in the promoted dtype of the losses and of :math:`s`.

    Args:
        num_tasks: :math:`K`; the parameters must exist before the optimizer is built.
        init: the initial :math:`s_i`.
        lr: the learning rate of :math:`s`'s param group; ``None``: the optimizer's ``lr``.
        factors: the :math:`k_i` (positive), default 2 for every task.
        clip: ``(lo, hi)`` bounds on :math:`s`, or ``None``.
        dtype, device: of :math:`s` (it must be on the losses' device).
    """

    def __init__(
        self,
        num_tasks: int,
        init: float = 0.0,
        lr: float | None = 0.025,
        *,
        factors: Sequence[float] | None = None,
        clip: tuple[float, float] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        num_tasks = check_num_tasks(num_tasks)
        super().__init__(
            num_tasks,
            num_tasks,
            init=init,
            lr=lr,
            factors=factors,
            clip=clip,
            dtype=dtype,
            device=device,
        )

    def forward(self, losses: Tensor) -> Tensor:
        w, s, _ = self._uw_terms(losses)
        self.weights = w.detach()
        return w * losses + 0.5 * s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_tasks}, {self._options_repr()})"
