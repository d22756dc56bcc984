r"""ConFIG: the conflict-free direction with equal cosines to all task gradients."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast, get_args

import torch
from torch import Tensor

from .._linalg import normalized_gramian
from .._validation import positive
from ._base import GramianWeightedAggregator
from ._partial import present_tasks

Length = Literal["projection", "min", "max", "arithmetic", "geometric", "harmonic"]
_LENGTHS = get_args(Length)


class ConFIG(GramianWeightedAggregator):
    r"""ConFIG: Conflict-Free Inverse Gradients.

    Liu, Chu & Thuerey, *ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks*, ICLR 2025, arXiv `2408.11104 <https://arxiv.org/abs/2408.11104>`_; official
    code tum-pbs/ConFIG (``ConFIG_update``). With the unit rows :math:`u_i = g_i/\lVert g_i\rVert`
    (a zero row stays zero), :math:`U` the matrix of them and the preference vector
    :math:`p` (ones by default, the official ``EqualWeight``),

    .. math::
        x = U^{+} p, \qquad \hat x = x / \lVert x\rVert, \qquad
        d = \ell\, \hat x, \qquad \ell = \sum_i g_i^\top \hat x \quad (\text{"projection"}),

    so for full-row-rank ``J`` every :math:`u_i^\top x = p_i`: the direction has the cosines
    :math:`p_i/\lVert x\rVert` with the tasks (equal ones by default) and conflicts with none,
    :math:`g_i^\top d = \lVert g_i\rVert\, \ell\, p_i / \lVert x\rVert > 0`. The official length
    models ``TrackMinimum`` / ``TrackMaximum`` / ``TrackArithmeticAverage`` /
    ``TrackGeometricAverage`` / ``TrackHarmonicAverage`` are ``length="min"``, ``"max"``,
    ``"arithmetic"``, ``"geometric"``, ``"harmonic"``: :math:`\ell = \tau \sum_i u_i^\top\hat x`
    with :math:`\tau` that statistic of the norms :math:`\lVert g_i\rVert`.

    **Weights from the Gramian.** :math:`U^+ = U^\top (UU^\top)^+`, so :math:`x = J^\top a` with
    :math:`a = D^{-1}(UU^\top)^+ p`, :math:`D = \operatorname{diag}(\lVert g_i\rVert)` and
    :math:`UU^\top = D^{-1} M D^{-1}` (:math:`M = JJ^\top`); :math:`\lVert x\rVert^2 =
    a^\top M a` and :math:`\sum_i g_i^\top x = \mathbf 1^\top M a`. So the direction is
    :math:`J^\top w` with

    .. math::
        w = \frac{\mathbf 1^\top M a}{a^\top M a}\, a \quad (\text{"projection"}), \qquad
        w = \tau\, \frac{\mathbf 1^\top D^{-1} M a}{a^\top M a}\, a \quad (\text{track models}),

    computed from the ``K×K`` Gramian in float64 (the official code takes the pseudo-inverse of
    the ``K×d`` matrix ``U`` by SVD, or ``torch.linalg.lstsq``, which gives the same
    minimum-norm solution, with ``use_least_square=True``). **One host sync** per call on an
    accelerator: ``torch.linalg.eigh``, behind the Hermitian pseudo-inverse, checks its
    convergence flag on the host (torch has no sync-free variant). The pseudo-inverse of the
    unit Gramian :math:`UU^\top` drops its eigenvalues below ``rcond**2`` times the largest,
    i.e. the singular values of :math:`U` below ``rcond`` times the largest: the official
    default cut-off is :math:`\max(K, d)\,\varepsilon` of ``J``'s dtype, which our float64
    Gramian cannot resolve below about 1e-7, hence the default ``rcond=1e-6``. For
    rank-deficient ``J``, :math:`x` is the least-squares solution and the cosines are only
    equal in the least-squares sense; the direction may then conflict with a task. When
    :math:`p` is orthogonal to the range of :math:`UU^\top` (to ``rcond``, relative), e.g.
    for exactly opposed rows (a Pareto-stationary point), :math:`x = 0` and no direction has
    the required cosines: the zero direction is returned (the official code normalises
    whatever rounding leaves of :math:`x`). All-zero rows give the zero direction too.

    The official two-task shortcut (``ConFIG_update_double``, taken by ``ConFIGOperator`` when
    K = 2) computes the same direction by orthogonal components; the momentum variant
    (M-ConFIG) is not provided. The direction is invariant to a permutation of the rows (with
    ``pref_vector`` permuted alike) and to a positive scaling of ``pref_vector``.

    **Partial labels.** With only m of the K tasks present the rows are theirs and the
    direction is ConFIG's on them; a given ``pref_vector`` (K entries) is read at the present
    tasks. There is no state.

    Args:
        pref_vector: the target cosines :math:`p` (positive, one per task), or ``None`` for
            ones. Its length must match the number of tasks at every call.
        length: ``"projection"`` (official default) or a track model (see above).
        rcond: the relative singular-value cut-off of the pseudo-inverse.
    """

    def __init__(
        self,
        pref_vector: Sequence[float] | Tensor | None = None,
        *,
        length: Length = "projection",
        rcond: float = 1e-6,
    ) -> None:
        if pref_vector is not None:
            pref = torch.as_tensor(pref_vector, dtype=torch.float64).detach().clone()
            if pref.dim() != 1 or pref.numel() == 0 or not bool((pref > 0).all()):
                raise ValueError(
                    f"pref_vector must be a non-empty 1-D sequence of positive numbers, got "
                    f"{pref_vector!r}"
                )
            pref_vector = pref
        if length not in _LENGTHS:
            raise ValueError(f"length must be one of {_LENGTHS}, got {length!r}")
        positive("rcond", rcond)
        if not rcond < 1:
            raise ValueError(f"rcond must be below 1, got {rcond!r}")
        self.pref_vector: Tensor | None = pref_vector
        self._pref_on_device = pref_vector  # the last device's copy, moved once
        self.length = length
        self.rcond = float(rcond)

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        k = gram.shape[0]
        gram = gram.to(torch.float64)
        dev = gram.device
        index, num_tasks = present_tasks(self, k)
        if self.pref_vector is None:
            pref = torch.ones(k, dtype=torch.float64, device=dev)
        elif self.pref_vector.numel() != num_tasks:
            raise ValueError(
                f"pref_vector has {self.pref_vector.numel()} entries, "
                + (f"J {k} rows" if index is None else f"there are {num_tasks} tasks")
            )
        elif index is not None:  # partial labels: the present tasks' target cosines
            pref = self.pref_vector[index].to(dev)
        else:
            pref = cast(Tensor, self._pref_on_device)  # set with pref_vector
            if pref.device != dev:
                pref = self._pref_on_device = self.pref_vector.to(dev)
        unit_gram, norms, active = normalized_gramian(gram)
        coef = torch.linalg.pinv(unit_gram, rtol=self.rcond**2, hermitian=True) @ pref
        # p (numerically) orthogonal to the range of UUᵀ: no direction has these cosines
        reachable = (unit_gram @ coef).norm() > self.rcond * pref.norm()
        a = torch.where(active & reachable, coef / norms, 0.0)
        ma = gram @ a
        sq_norm = a @ ma  # ‖x‖²
        if self.length == "projection":
            length = ma.sum()
        else:
            length = _tracked(norms, active, self.length) * (ma / norms).sum()
        factor = torch.where(sq_norm > 0, length / sq_norm, 0.0)
        return factor * a

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"ConFIG(pref_vector={pref}, length={self.length!r}, rcond={self.rcond})"


def _tracked(norms: Tensor, active: Tensor, statistic: str) -> Tensor:
    """The official track models' statistic of the row norms (a zero row has norm 0)."""
    n = torch.where(active, norms, 0.0)
    if statistic == "min":
        return n.amin()
    if statistic == "max":
        return n.amax()
    if statistic == "arithmetic":
        return n.mean()
    if statistic == "geometric":
        return n.log().mean().exp()
    return n.numel() / (1.0 / n).sum()  # harmonic
