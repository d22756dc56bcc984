r"""UPGrad: the mean of the task gradients' projections onto the dual cone of all of them."""

from __future__ import annotations

import torch
from torch import Tensor

from .._linalg import gramian
from ._dual_cone import DualConeAggregator, dual_cone_weights


class UPGrad(DualConeAggregator):
    r"""UPGrad: project every :math:`p_i g_i` onto the dual cone of the rows and sum.

    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, arXiv
    `2406.16232 <https://arxiv.org/abs/2406.16232>`_ (TorchJD's ``UPGrad``). With
    :math:`\pi_J` the projection onto the dual cone :math:`\{y : Jy \ge 0\}` and the
    preference vector :math:`p` (default :math:`\mathbf 1/K`),

    .. math::
        d = \sum_i \pi_J(p_i g_i) = J^\top \sum_i v^{(i)},\qquad
        v^{(i)} = \arg\min_{v \ge p_i e_i}\ \tfrac12\, v^\top G v ,

    where :math:`G` is the Gramian, Frobenius-normalised and regularised as TorchJD does
    (:math:`G = JJ^\top/\lVert J\rVert_F^2 + \epsilon_r I`, the zero matrix plus
    :math:`\epsilon_r I` when :math:`\lVert J\rVert_F^2 <` ``norm_eps``). The K weight vectors
    come from one batched call of the shared solver :func:`~._dual_cone.dual_cone_weights`
    (exact; TorchJD calls ``quadprog`` on the CPU once per row). The weights are
    :math:`w = \sum_i v^{(i)}`; :meth:`transform` returns the projections
    :math:`\pi_J(p_i g_i)` themselves, row :math:`i` for task :math:`i`.

    **Guarantees.** Each projection, and so :math:`d`, conflicts with no task:
    :math:`Jd \ge 0`, to rounding for ``reg_eps=0`` and up to
    :math:`-\epsilon_r\lVert J\rVert_F^2\, w_j` in row :math:`j` otherwise (the ridge is the
    price of a unique solution). Without conflict (all :math:`g_i \cdot g_j \ge 0`) nothing is
    projected and :math:`d = J^\top p`. The weights are permutation-equivariant and invariant
    to scaling ``J`` as long as :math:`\lVert J\rVert_F^2 \ge` ``norm_eps``. That threshold is
    absolute: smaller gradients are combined as :math:`J^\top p` without projection (TorchJD's
    behaviour); ``norm_eps=0`` projects at every scale. For K = 2, the default :math:`p` and
    ``reg_eps=0``, :math:`d` is half the PCGrad direction.

    **Host syncs.** None (see the solver).

    **Small K on the CPU.** For ``K ≤ 8`` a CPU Gramian is read into Python floats and the same
    algorithm runs in plain float arithmetic (equal to rounding; several times faster than
    tensor operations on such small matrices); see
    :func:`~mtl_optim.aggregators._small_k.small_cpu_entries`.

    **Partial labels.** With only m of the K tasks present the rows are theirs: the default
    preference is :math:`1/m` each and a given K-entry ``pref_vector`` is read at the present
    tasks (not renormalised). There is no state.

    Args:
        pref_vector: the K non-negative weights :math:`p` (``None``: :math:`1/K` each).
        norm_eps: the smallest :math:`\lVert J\rVert_F^2` that is projected (TorchJD default).
        reg_eps: the ridge :math:`\epsilon_r` added to the normalised Gramian (TorchJD default).
    """

    def projection_weights(self, gram: Tensor) -> Tensor:
        """The ``(K, K)`` float64 matrix whose row ``i`` holds :math:`v^{(i)}`."""
        rows = self.small_k_rows(gram, diagonal=True)
        if rows is not None:
            return torch.tensor(rows, dtype=torch.float64)
        u = torch.diag(self.preferences(gram))
        return dual_cone_weights(u, self.cone_gramian(gram))

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        rows = self.small_k_rows(gram, diagonal=True)
        if rows is not None:  # the column sums, in the order torch sums them for K <= 4
            total = [0.0] * len(rows)
            for row in rows:
                total = [a + b for a, b in zip(total, row)]
            return torch.tensor(total, dtype=torch.float64)
        return self.projection_weights(gram).sum(dim=0)

    def transform(self, jacobian: Tensor) -> Tensor:
        j = jacobian.detach()
        if not j.is_floating_point():
            j = j.double()
        rows = self.projection_weights(gramian(j))
        return rows.to(device=jacobian.device, dtype=j.dtype) @ j
