r"""ExcessMTL: task weights driven by estimated excess risks."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor

from .._validation import positive
from ._base import WeightedAggregator
from ._partial import mass_restrict, on, present_tasks, scatter


class ExcessMTL(WeightedAggregator):
    r"""ExcessMTL: exponentiated-gradient weights on the tasks' estimated excess risks.

    He et al., *Robust Multi-Task Learning with Excess Risks*, ICML 2024,
    arXiv `2402.02009 <https://arxiv.org/abs/2402.02009>`_; official code yifei-he/ExcessMTL
    (a LibMTL weighting). The excess risk of task :math:`i` is estimated from a second-order
    expansion as :math:`g_i^\top H_i^{-1} g_i` (up to a constant, which the normalisation below
    cancels), with AdaGrad's diagonal Hessian approximation: at call :math:`t`, with
    :math:`g_{t,i}` the rows of ``J``,

    .. math::
        S_{t,i} = S_{t-1,i} + g_{t,i}^{\odot 2}, \qquad
        e_{t,i} = \sum_j \frac{g_{t,ij}^2}{\sqrt{S_{t,ij} + \epsilon}}
        \qquad (S_0 = 0,\ \epsilon = 10^{-7}).

    The first call only records the reference :math:`e_{1,i}` and returns the initial weights
    :math:`w = \mathbf 1`; every later call updates them by exponentiated gradient with step
    :math:`\eta` (``robust_step_size``) on the normalised estimates and renormalises them to
    sum to K,

    .. math::
        w_i \leftarrow w_i \exp(\eta\, e_{t,i}/e_{1,i}), \qquad
        w \leftarrow K\, w / \textstyle\sum_j w_j ,

    before they are applied: the direction is :math:`J^\top w`. Each call of :meth:`weights`
    (so of :meth:`forward` and :meth:`transform`) advances the state by one step.

    **Deviations.** A task whose reference estimate is zero (a zero gradient at the first call)
    takes its first positive estimate as the reference and keeps its weight's exponent at 0
    until then; the official code divides by zero. The official code weights the losses, so the
    task heads' gradients are weighted too; here, as for every aggregator, the weights apply to
    the shared parameters only. The estimates are accumulated in ``J``'s dtype promoted to at
    least float32.

    **State.** :math:`S` (``K×d``, on ``J``'s device: one more copy of ``J``), the references
    :math:`e_1` and the weights, all in :meth:`state_dict`; ``K`` and ``d`` are fixed by the
    first call. No host sync.

    **Partial labels.** With only m of the K tasks present (the rows are theirs), only the
    present tasks' statistics move: their rows of :math:`S` accumulate, their estimates are
    formed, a present task seen for the first time takes its estimate as its reference (its
    exponent is 0 at that call, as for a zero reference above), and their weights, rescaled to
    sum to m, take the exponentiated-gradient step and are renormalised to sum to m, which are
    the m weights returned. They are written back rescaled to their former total, so the
    missing tasks' entries are unchanged and the K weights keep summing to K. The state is
    sized by K even when the first call already misses a task (the unseen tasks' rows are 0).

    Args:
        robust_step_size: the step :math:`\eta > 0` of the weight update (official default
            1e-2).
        eps: the :math:`\epsilon` under the square root (official 1e-7).
    """

    def __init__(self, robust_step_size: float = 1e-2, *, eps: float = 1e-7) -> None:
        if not (robust_step_size > 0 and math.isfinite(robust_step_size)):
            raise ValueError(
                f"robust_step_size must be a finite positive number, got {robust_step_size!r}"
            )
        positive("eps", eps)
        self.robust_step_size = float(robust_step_size)
        self.eps = float(eps)
        self._sq_sum: Tensor | None = None
        self._initial: Tensor | None = None
        self._w: Tensor | None = None

    def weights(self, jacobian: Tensor) -> Tensor:
        k, d = jacobian.shape
        dtype = torch.promote_types(jacobian.dtype, torch.float32)
        g = jacobian.detach().to(dtype)
        sq = g * g
        index, num_tasks = present_tasks(self, k)
        if index is not None:
            return self._present_weights(jacobian, sq, index, num_tasks)
        if self._sq_sum is None:
            sq_sum = sq
        elif self._sq_sum.shape != (k, d):
            raise ValueError(
                f"ExcessMTL was first called with J of shape {tuple(self._sq_sum.shape)}, "
                f"now {(k, d)}"
            )
        else:
            sq_sum = self._sq_sum.to(g.device) + sq
        risk = (sq / (sq_sum + self.eps).sqrt()).sum(dim=1).to(torch.float64)
        if self._initial is None:
            initial = risk
            w = torch.ones(k, dtype=torch.float64, device=g.device)
        else:
            initial = self._initial.to(g.device)
            ratio = torch.where(initial > 0, risk / initial, 0.0)
            w = cast(Tensor, self._w).to(g.device) * torch.exp(self.robust_step_size * ratio)
            w = w / w.sum() * k
            initial = torch.where(initial > 0, initial, risk)
        self._sq_sum, self._initial, self._w = sq_sum, initial, w
        return w.to(jacobian.dtype) if jacobian.is_floating_point() else w

    def _present_weights(self, jacobian: Tensor, sq: Tensor, index: Tensor, k: int) -> Tensor:
        """:meth:`weights` on the rows of the present tasks ``index`` among ``k``."""
        m, d = sq.shape
        dev = sq.device
        if self._sq_sum is None:  # nothing seen yet: unseen tasks have S = 0 and no reference
            full_sq = torch.zeros(k, d, dtype=sq.dtype, device=dev)
            full_initial = torch.zeros(k, dtype=torch.float64, device=dev)
            full_w = torch.ones(k, dtype=torch.float64, device=dev)
        elif self._sq_sum.shape != (k, d):
            raise ValueError(
                f"ExcessMTL was first called with J of shape {tuple(self._sq_sum.shape)}, "
                f"now {(k, d)}"
            )
        else:
            full_sq = self._sq_sum.to(dev)
            full_initial = cast(Tensor, self._initial).to(dev)
            full_w = cast(Tensor, self._w).to(dev)
        idx = on(index, dev)
        sq_sum = full_sq.index_select(0, idx) + sq
        risk = (sq / (sq_sum + self.eps).sqrt()).sum(dim=1).to(torch.float64)
        initial = full_initial.index_select(0, idx)
        w, mass = mass_restrict(full_w, index, float(m))
        ratio = torch.where(initial > 0, risk / initial, 0.0)
        w = w * torch.exp(self.robust_step_size * ratio)
        w = w / w.sum() * m
        initial = torch.where(initial > 0, initial, risk)
        self._sq_sum = scatter(full_sq, index, sq_sum)
        self._initial = scatter(full_initial, index, initial)
        self._w = scatter(full_w, index, w * (mass / m))
        return w.to(jacobian.dtype) if jacobian.is_floating_point() else w

    def state_dict(self) -> dict[str, Any]:
        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone()

        return {"sq_sum": copy(self._sq_sum), "initial": copy(self._initial), "w": copy(self._w)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"sq_sum", "initial", "w"}:
            raise ValueError(
                f"ExcessMTL state must have the keys 'sq_sum', 'initial' and 'w', got "
                f"{sorted(state)}"
            )
        values = [state[key] for key in ("sq_sum", "initial", "w")]
        if len({v is None for v in values}) != 1:
            raise ValueError("ExcessMTL state: 'sq_sum', 'initial' and 'w' must all be set or None")
        sq_sum, initial, w = (None if v is None else v.detach().clone() for v in values)
        self._sq_sum = sq_sum
        self._initial = None if initial is None else initial.to(torch.float64)
        self._w = None if w is None else w.to(torch.float64)

    def __repr__(self) -> str:
        return f"ExcessMTL(robust_step_size={self.robust_step_size}, eps={self.eps})"
