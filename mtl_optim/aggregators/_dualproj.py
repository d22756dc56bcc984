r"""DualProj: the (preference-weighted) mean gradient, projected onto the dual cone of the rows."""

from __future__ import annotations

import torch
from torch import Tensor

from ._dual_cone import DualConeAggregator, dual_cone_weights


class DualProj(DualConeAggregator):
    r"""DualProj: :math:`d = \pi_J(J^\top p)`, the weighted mean made non-conflicting.

    Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, arXiv
    `2406.16232 <https://arxiv.org/abs/2406.16232>`_ (TorchJD's ``DualProj``; the projection is
    Equation 11 of GEM, Lopez-Paz & Ranzato, NeurIPS 2017). With :math:`\pi_J` the projection
    onto the dual cone :math:`\{y : Jy \ge 0\}` and the preference vector :math:`p` (default
    :math:`\mathbf 1/K`),

    .. math::
        d = \pi_J(J^\top p) = J^\top v,\qquad v = \arg\min_{v \ge p}\ \tfrac12\, v^\top G v ,

    with the Gramian Frobenius-normalised and regularised as in :class:`UPGrad`
    (:math:`G = JJ^\top/\lVert J\rVert_F^2 + \epsilon_r I`; zero plus :math:`\epsilon_r I`
    below ``norm_eps``), solved by the shared exact solver
    :func:`~._dual_cone.dual_cone_weights`. The weights are :math:`v`.

    **Guarantees.** :math:`Jd \ge 0` (to rounding for ``reg_eps=0``, up to
    :math:`-\epsilon_r\lVert J\rVert_F^2 v_j` in row :math:`j` otherwise); :math:`d = J^\top p`
    whenever the weighted mean already conflicts with no task; the weights are
    permutation-equivariant and invariant to scaling ``J`` while
    :math:`\lVert J\rVert_F^2 \ge` ``norm_eps`` (an absolute threshold, TorchJD's behaviour;
    ``norm_eps=0`` projects at every scale). Unlike :class:`UPGrad` it projects one vector, so
    it has no per-task decomposition: :meth:`transform` returns the weighted rows
    :math:`v_i g_i`. No host syncs.

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

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        rows = self.small_k_rows(gram, diagonal=False)
        if rows is not None:
            return torch.tensor(rows[0], dtype=torch.float64)
        u = self.preferences(gram)
        return dual_cone_weights(u, self.cone_gramian(gram))
