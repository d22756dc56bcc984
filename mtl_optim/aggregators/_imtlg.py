r"""IMTL-G: the combined direction has equal projections onto every task's unit gradient."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._linalg import TINY
from .._validation import positive
from ._base import GramianWeightedAggregator
from ._small_k import SmallKFallback, small_cpu_entries, solve_small

#: A bordered system with a larger condition number sends a small CPU Gramian to the
#: pseudo-inverse: elimination and the SVD agree to rounding times the conditioning, and the
#: pseudo-inverse's cut-off decides the numerically singular systems.
_MAX_COND = 1e8


class IMTLG(GramianWeightedAggregator):
    r"""IMTL-G weights: :math:`d = J^\top\alpha` with :math:`d\cdot u_i` equal for all tasks.

    Liu et al., *Towards Impartial Multi-task Learning*, ICLR 2021 (see
    docs/methods/aggregators.md, "IMTL-G"). With the unit gradients :math:`u_i = g_i / \lVert
    g_i\rVert`, :math:`D` the rows :math:`g_1 - g_j` and :math:`U` the rows :math:`u_1 - u_j`
    (:math:`j = 2..K`), the paper's closed form is

    .. math::
        \alpha_{2..K} = g_1 U^\top (D U^\top)^{-1}, \qquad \alpha_1 = 1 - \sum_{j\ge2}\alpha_j,

    i.e. the unique :math:`\alpha` with :math:`\sum_i \alpha_i = 1` and
    :math:`d\cdot(u_1 - u_j) = 0`: the direction :math:`d = J^\top\alpha` has the same projection
    onto every :math:`u_i`. The weights sum to 1.

    **Symmetric reformulation (ours).** With :math:`M = JJ^\top`, :math:`n_i = \sqrt{M_{ii}}` and
    the cosine matrix :math:`C = N^{-1} M N^{-1}` (:math:`N = \operatorname{diag}(n)`), the
    conditions read :math:`M\alpha = t\,n`, i.e. :math:`C\beta = t\,\mathbf 1` with
    :math:`\beta = N\alpha`, and :math:`\sum_i\alpha_i = 1`. We solve this bordered
    :math:`(K+1)\times(K+1)` system in :math:`(\beta, t)`

    .. math::
        \begin{pmatrix} C & -\mathbf 1 \\ \hat w^\top & 0 \end{pmatrix}
        \begin{pmatrix} \beta \\ t \end{pmatrix}
        = \begin{pmatrix} 0 \\ 1/\lVert w\rVert \end{pmatrix},
        \qquad w_i = \frac{\max_j n_j}{n_i},\ \hat w = w / \lVert w\rVert,

    and return :math:`\alpha_i = w_i\beta_i` (so :math:`\sum_i\alpha_i = 1`). It works on the
    ``K×K`` Gramian only, treats the tasks symmetrically (no reference task, so it is
    permutation-equivariant), and depends on :math:`J` only through the angles and the ratios of
    the norms, so scaling ``J`` leaves :math:`\alpha` unchanged. When :math:`DU^\top` is
    invertible it is the paper's :math:`\alpha`; for full-rank :math:`J`,
    :math:`\alpha\propto M^{-1}n`, and for K = 2,
    :math:`\alpha = (n_2, n_1)/(n_1 + n_2)`.

    **Deviations.** (a) Singular systems: where the official port adds :math:`10^{-8} I` to
    :math:`DU^\top`, we take the minimum-norm least-squares solution (an SVD pseudo-inverse with
    relative cut-off ``rcond``), which is a valid solution whenever one exists, e.g. for
    parallel or exactly opposed gradients (:math:`g, -g` gives :math:`(\tfrac12,\tfrac12)` and
    :math:`d = 0`). If no affine combination has equal projections (possible for K ≥ 3, where
    then also :math:`DU^\top` is singular) the least-squares compromise is returned. (b) A zero
    row has no unit vector: it gets weight 0 and the others are solved for among themselves;
    if every row is zero the weights are uniform. (c) A non-finite ``J`` gives NaN weights.
    LibMTL's IMTL also applies IMTL-L (learnable loss scales); that is a loss weighting and is
    not part of this aggregator. K = 1 gives ``[1]``.

    **Small K on the CPU.** For ``K ≤ 8`` a CPU Gramian is read into Python floats and the same
    algorithm runs in plain float arithmetic (equal to rounding; several times faster than
    tensor operations on such small matrices); see
    :func:`~mtl_optim.aggregators._small_k.small_cpu_entries`.

    Args:
        rcond: relative singular-value cut-off of the pseudo-inverse.
    """

    def __init__(self, *, rcond: float = 1e-12) -> None:
        self.rcond = positive("rcond", rcond)

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        if gram.shape[0] <= 1:
            return torch.ones(gram.shape[0], dtype=torch.float64, device=gram.device)
        entries = small_cpu_entries(gram)
        if entries is not None:
            try:
                return torch.tensor(imtlg_entries(entries), dtype=torch.float64)
            except SmallKFallback:
                pass  # a non-finite or nearly singular system: the pseudo-inverse decides
        return imtlg_weights(gram, self.rcond)

    def __repr__(self) -> str:
        return f"IMTLG(rcond={self.rcond})"


def imtlg_weights(gram: Tensor, rcond: float = 1e-12) -> Tensor:
    """IMTL-G weights (float64) from a ``(K, K)`` Gramian; see :class:`IMTLG`. No host sync."""
    gram = gram.to(torch.float64)
    k = gram.shape[0]
    dev = gram.device
    diag = gram.diagonal()
    active = diag > TINY  # NaN rows are "inactive" here but poison the result below
    n = torch.where(active, diag, torch.ones_like(diag)).sqrt()
    both = active[:, None] & active[None, :]
    eye = torch.eye(k, dtype=torch.float64, device=dev)
    cos = torch.where(both, gram / n[:, None] / n[None, :], eye)
    # w_i = max n / n_i >= 1 for the active rows; 0 for the zero rows (they get no weight).
    n_max = torch.where(active, n, torch.zeros_like(n)).amax()
    w = torch.where(active, n_max / n, torch.zeros_like(n))
    w_norm = torch.linalg.vector_norm(w)
    w_norm = torch.where(w_norm > 0, w_norm, torch.ones_like(w_norm))

    system = torch.zeros(k + 1, k + 1, dtype=torch.float64, device=dev)
    system[:k, :k] = cos
    # Row i of an active task: (Cβ)_i - t = 0; of a zero row: β_i = 0 (C's row is e_i there).
    system[:k, k] = torch.where(active, -1.0, 0.0).to(torch.float64)
    system[k, :k] = w / w_norm
    rhs = torch.zeros(k + 1, dtype=torch.float64, device=dev)
    rhs[k] = 1.0 / w_norm
    # a non-finite Gramian gives NaN below; zeros here keep the SVD from failing on it
    system = torch.where(torch.isfinite(system), system, 0.0)
    sol = torch.linalg.pinv(system, rtol=rcond) @ rhs
    alpha = w * sol[:k]

    uniform = torch.full_like(alpha, 1.0 / k)
    alpha = torch.where(active.any(), alpha, uniform)
    poisoned = ~torch.isfinite(gram).all()
    return torch.where(poisoned, torch.full_like(alpha, float("nan")), alpha)


def imtlg_entries(gram: list[list[float]]) -> list[float]:
    """:func:`imtlg_weights` on Python floats for a small CPU Gramian (``K ≥ 2``): the same
    quantities, the bordered system solved by elimination instead of the pseudo-inverse (equal
    to rounding on a regular system); NaN for a non-finite Gramian. Raises
    :class:`SmallKFallback` for a condition number above ``_MAX_COND``, where
    :func:`imtlg_weights` runs instead."""
    k = len(gram)
    if not all(math.isfinite(e) for row in gram for e in row):
        return [math.nan] * k
    tiny = TINY
    active = [gram[i][i] > tiny for i in range(k)]
    if not any(active):
        return [1.0 / k] * k
    n = [math.sqrt(gram[i][i]) if active[i] else 1.0 for i in range(k)]
    n_max = max(n[i] for i in range(k) if active[i])
    w = [n_max / n[i] if active[i] else 0.0 for i in range(k)]
    squares = 0.0
    for value in w:
        squares += value * value
    w_norm = math.sqrt(squares)
    system = []
    for i in range(k):
        if active[i]:
            row = [gram[i][j] / n[i] / n[j] if active[j] else 0.0 for j in range(k)]
            row.append(-1.0)
        else:
            row = [1.0 if j == i else 0.0 for j in range(k)]
            row.append(0.0)
        system.append(row)
    system.append([value / w_norm for value in w] + [0.0])
    sol = solve_small(system, [0.0] * k + [1.0 / w_norm], max_cond=_MAX_COND)
    return [a * b for a, b in zip(w, sol)]
