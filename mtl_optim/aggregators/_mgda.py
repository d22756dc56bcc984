from __future__ import annotations

import math
import warnings
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from .._validation import check_int, positive
from ._base import GramianWeightedAggregator
from ._mgda_small import min_norm_entries
from ._partial import present_tasks
from ._simplex import project_to_simplex
from ._small_k import SmallKFallback, small_cpu_entries

Normalization = Literal["none", "l2", "loss", "loss+"]
_NORMALIZATIONS = get_args(Normalization)


class MGDA(GramianWeightedAggregator):
    r"""MGDA: the minimum-norm point of the convex hull of the task gradients.

    Sener & Koltun, *Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018, arXiv
    `1810.04650 <https://arxiv.org/abs/1810.04650>`_ (see docs/methods/aggregators.md, "MGDA").

    The weights solve, with :math:`u_t = g_t / n_t` and :math:`\Delta` the probability simplex,

    .. math::
        \alpha^\star = \arg\min_{\alpha \in \Delta} \Big\lVert \sum_t \alpha_t u_t \Big\rVert^2
                     = \arg\min_{\alpha \in \Delta} \alpha^\top D \alpha,
        \qquad D = U U^\top,

    and the direction is :math:`\sum_t \alpha^\star_t g_t` on the **un-normalised** rows, so
    the normalisation only changes :math:`\alpha`. ``normalization="none"`` (default, as in the
    Nash-MTL port) takes :math:`n_t = 1`; ``"l2"`` (the port's ``"norm"``) takes
    :math:`n_t = \lVert g_t \rVert_2`; ``"loss"`` takes the current (detached) loss value
    :math:`n_t = L_t` and ``"loss+"`` :math:`n_t = L_t \lVert g_t\rVert_2` (the official CelebA
    setting). The loss values come from the optimizer (:attr:`needs_losses`; the raw losses
    before any weighting); calling :meth:`weights` directly with a loss normalisation needs
    :meth:`set_losses` first. When
    :math:`\alpha^\star` is not unique (rank-deficient ``J``) any minimiser may be returned.

    At the optimum every task decreases at least as fast as the combined norm, the KKT
    conditions of the problem: :math:`(D\alpha^\star)_t \ge \alpha^{\star\top} D \alpha^\star`
    for all :math:`t`, with equality where :math:`\alpha^\star_t > 0`.

    The solver works on the ``K×K`` Gramian only. It first runs the official
    ``find_min_norm_element``: the best pair by the closed-form 2-point rule (with its
    0.999 / 0.001 clamps, so for K = 2 a weight is never exactly 0 or 1), then projected gradient
    along the centred direction :math:`-(D\alpha - \overline{D\alpha})` with the smallest step that
    reaches a bound, a sort-based projection onto the simplex and an exact 2-point line search,
    stopping when the ℓ1 change of :math:`\alpha` is below ``tol``. Our decisions, where the
    official code loops forever or crashes: at most ``max_iter`` iterations, returning the best
    iterate seen; the start is the best pair whatever the costs (no 1e8 sentinel); a zero row under
    ``"l2"`` is divided by ``eps`` (it stays zero) with a warning. :math:`D` is divided by its
    largest diagonal entry first, which leaves :math:`\alpha^\star` unchanged and makes the absolute
    thresholds independent of the gradients' scale. A non-finite ``J`` gives NaN weights.

    **Deviation (``exact=True``, default).** The official stop rule fires far from the optimum
    whenever a weight is close to, but not at, 0: the step that reaches the bound is then tiny,
    and so is the change (KKT violations up to 8 % of the largest squared norm on random
    Gramians). And the K = 2
    clamps can be far off: for :math:`g_2 = 10^6 g_1` they return
    :math:`0.999 g_1 + 0.001 g_2 \approx 10^3 g_1` instead of :math:`g_1`. So the official
    result warm-starts Wolfe's exact min-norm-point algorithm (Wolfe, 1976), on the Gramian
    too, which meets the KKT conditions to rounding. ``exact=False`` returns the official
    result.

    The weights sum to 1 (the official convention; the Nash-MTL port multiplies them by K).

    **Small K on the CPU.** For ``K ≤ 8`` a CPU Gramian is read into Python floats and the same
    algorithm runs in plain float arithmetic (equal to rounding, ``exact=False`` only for K = 2;
    several times faster than tensor operations on such small matrices); see
    :func:`~mtl_optim.aggregators._small_k.small_cpu_entries`.

    **Partial labels.** With only m of the K tasks present the rows are theirs and the weights
    are MGDA's on them (summing to 1 over the present tasks); a loss normalisation takes the
    present tasks' losses (the m values handed over, or the K values read at the present
    tasks). There is no state.

    Args:
        normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"``.
        max_iter: the most iterations of each solver phase (official ``MAX_ITER``).
        tol: stop when :math:`\lVert\alpha_{k+1} - \alpha_k\rVert_1` is below it
            (official ``STOP_CRIT``).
        eps: the norm used in place of a zero norm under ``"l2"``.
        exact: finish with Wolfe's algorithm (see above); ``False`` stops at the official
            solver's result.
    """

    def __init__(
        self,
        normalization: Normalization = "none",
        *,
        max_iter: int = 250,
        tol: float = 1e-5,
        eps: float = 1e-12,
        exact: bool = True,
    ) -> None:
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}"
            )
        check_int("max_iter", max_iter, 0)
        positive("tol", tol)
        positive("eps", eps)
        self.normalization = normalization
        self.max_iter = max_iter
        self.tol = tol
        self.eps = eps
        self.exact = exact
        self.needs_losses = normalization in ("loss", "loss+")
        self._losses: np.ndarray | None = None

    def set_losses(self, losses: Tensor) -> None:
        self._losses = losses.detach().to("cpu", torch.float64).numpy()

    def weights_from_gramian(self, gram_t: Tensor) -> Tensor:
        k = gram_t.shape[0]
        if k <= 1:
            return torch.ones(k, dtype=torch.float64, device=gram_t.device)
        # exact=False stops the official iterations at a tolerance, where a rounding
        # difference can end them one step earlier or later: K > 2 stays on the NumPy path
        entries = small_cpu_entries(gram_t) if self.exact or k == 2 else None
        if entries is not None and all(math.isfinite(e) for row in entries for e in row):
            # plain floats for a small CPU Gramian (same algorithm, see small_cpu_entries)
            if self.normalization != "none":
                n = self._norms(np.array([entries[i][i] for i in range(k)])).tolist()
                entries = [[e / (a * b) for e, b in zip(row, n)] for row, a in zip(entries, n)]
            try:
                weights = min_norm_entries(entries, self.max_iter, self.tol, self.exact)
                return torch.tensor(weights, dtype=torch.float64)
            except SmallKFallback:  # a degenerate system: the NumPy solver decides
                gram = np.array(entries)  # the same numbers as the normalisation below
        else:
            gram = gram_t.to("cpu", torch.float64).numpy()  # host sync: the solver is NumPy
            if self.normalization != "none":
                norms = self._norms(np.diag(gram))
                gram = gram / np.outer(norms, norms)
        alpha = _min_norm_weights(gram, self.max_iter, self.tol, self.exact)
        return torch.from_numpy(alpha).to(gram_t.device)

    def _norms(self, diag: np.ndarray) -> np.ndarray:
        """The normalisers :math:`n_t` from the Gramian's diagonal (ones for ``"none"``)."""
        norms = np.ones(diag.shape[0])
        if self.normalization in ("l2", "loss+"):
            norms = np.sqrt(np.maximum(diag, 0.0))
        if self.normalization in ("loss", "loss+"):
            losses = self._losses
            index, num_tasks = present_tasks(self, diag.shape[0])
            if index is not None and losses is not None and losses.shape == (num_tasks,):
                losses = losses[index.numpy()]  # the K losses, read at the present tasks
            if losses is None or losses.shape != (diag.shape[0],):
                raise ValueError(
                    f"MGDA(normalization={self.normalization!r}) needs this batch's K loss "
                    "values: use it through MTLOptimizer, or call set_losses(losses) first"
                )
            norms = norms * losses
        if (norms <= 0).any():
            warnings.warn(
                f"MGDA(normalization={self.normalization!r}): a normaliser (gradient norm or "
                "loss) is zero or negative; it is replaced by eps",
                RuntimeWarning,
                stacklevel=3,
            )
            norms = np.where(norms <= 0, self.eps, norms)
        return norms

    def __repr__(self) -> str:
        return (
            f"MGDA(normalization={self.normalization!r}, max_iter={self.max_iter}, "
            f"tol={self.tol}, exact={self.exact})"
        )


def _min_norm_weights(
    gram: np.ndarray, max_iter: int = 250, tol: float = 1e-5, exact: bool = True
) -> np.ndarray:
    r""":math:`\arg\min_{\alpha\in\Delta}\alpha^\top D\alpha` for a ``(K, K)`` Gramian ``D``."""
    k = gram.shape[0]
    if k == 1:
        return np.ones(1)
    if not np.isfinite(gram).all():
        return np.full(k, np.nan)
    scale = np.max(np.diag(gram))
    d = gram / scale if scale > 0 else gram
    alpha = _official(d, max_iter, tol)
    return _polish(d, alpha, max_iter) if exact else alpha


def _official(d: np.ndarray, max_iter: int, tol: float) -> np.ndarray:
    """The official solver: best pair, then projected gradient with a 2-point line search."""
    k = d.shape[0]
    rows, cols = np.triu_indices(k, 1)
    gammas, costs = _two_point(d[rows, rows], d[rows, cols], d[cols, cols])
    best = int(np.argmin(costs))
    alpha = np.zeros(k)
    alpha[rows[best]] = gammas[best]
    alpha[cols[best]] = 1.0 - gammas[best]
    if k == 2:
        return alpha

    best_alpha, best_cost = alpha, alpha @ d @ alpha
    for _ in range(max_iter):
        d_alpha = d @ alpha
        direction = d_alpha.mean() - d_alpha  # -Dα, centred so that Σα is kept
        candidate = project_to_simplex(alpha + _step_length(alpha, direction) * direction)
        d_cand = d @ candidate
        aa, ac, cc = alpha @ d_alpha, alpha @ d_cand, candidate @ d_cand
        gamma = float(_two_point(aa, ac, cc)[0])
        new = gamma * alpha + (1.0 - gamma) * candidate
        if np.abs(new - alpha).sum() < tol:
            break
        alpha = new
        cost = gamma * gamma * aa + 2 * gamma * (1 - gamma) * ac + (1 - gamma) ** 2 * cc
        if cost < best_cost:
            best_alpha, best_cost = alpha, cost
    return best_alpha


def _polish(d: np.ndarray, alpha: np.ndarray, max_iter: int) -> np.ndarray:
    """Wolfe's min-norm-point algorithm on the Gramian, warm-started from ``alpha``.

    A *corral* is a support set whose affine minimiser has positive weights. Minor cycles move
    towards the affine minimiser of the support and drop the first weight that reaches 0;
    a major cycle adds the vertex ``argmin_t (Dα)_t`` while the Frank–Wolfe gap
    ``αᵀDα - min_t (Dα)_t`` is positive. The objective strictly decreases, so it is finite;
    ``max_iter`` guards against rounding.
    """
    lam = alpha.copy()
    support = lam > 0
    last = np.inf
    for _ in range(max_iter):
        idx = np.flatnonzero(support)
        beta = _affine_minimiser(d[np.ix_(idx, idx)])
        if (beta <= 0).any():
            current, neg = lam[idx], np.flatnonzero(beta <= 0)
            ratios = current[neg] / (current[neg] - beta[neg])
            lam[idx] = current + ratios.min() * (beta - current)
            lam[idx[neg[np.argmin(ratios)]]] = 0.0
            lam = np.maximum(lam, 0.0)
            support = lam > 0
            continue
        lam[:] = 0.0
        lam[idx] = beta
        d_lam = d @ lam
        cost, vertex = lam @ d_lam, int(np.argmin(d_lam))
        # d has a unit largest diagonal, so the gap is relative to the largest squared norm
        if cost - d_lam[vertex] <= 1e-12 or support[vertex] or cost >= last:
            break
        last = cost
        support[vertex] = True
    return lam


def _affine_minimiser(d: np.ndarray) -> np.ndarray:
    """Weights summing to 1 of the min-norm point of the points' affine hull (KKT system)."""
    k = d.shape[0]
    kkt = np.ones((k + 1, k + 1))
    kkt[:k, :k] = d
    kkt[k, k] = 0.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    beta = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:k]
    return beta / beta.sum()


def _two_point(d11, d12, d22):
    r"""Vectorised official 2-point rule: :math:`\min_\gamma\lVert\gamma u_1+(1-\gamma)u_2\rVert^2`.

    Returns ``(gamma, cost)``; the clamped branches report the vertex cost, as officially.
    """
    d11, d12, d22 = np.asarray(d11), np.asarray(d12), np.asarray(d22)
    with np.errstate(divide="ignore", invalid="ignore"):
        interior = (d22 - d12) / (d11 + d22 - 2 * d12)
    first, second = d12 >= d11, d12 >= d22
    gamma = np.where(first, 0.999, np.where(second, 0.001, interior))
    cost = np.where(first, d11, np.where(second, d22, d22 + gamma * (d12 - d22)))
    return gamma, cost


def _step_length(alpha: np.ndarray, direction: np.ndarray) -> float:
    """The smallest step > 1e-7 at which a coordinate of ``alpha + t·direction`` hits 0 or 1."""
    with np.errstate(divide="ignore", invalid="ignore"):
        to_bound = np.where(
            direction < 0,
            -alpha / direction,
            np.where(direction > 0, (1.0 - alpha) / direction, np.inf),
        )
    to_bound = to_bound[(to_bound > 1e-7) & np.isfinite(to_bound)]
    return float(to_bound.min()) if to_bound.size else 1.0


# The same solver on Python floats, for small CPU Gramians (see ``small_cpu_entries``): every
# function mirrors its NumPy twin above, operation for operation where the order is defined
# (products with D are summed left to right). Cases the twins decide through rounding-sensitive
# linear algebra (a near-singular KKT system, a zero denominator) raise SmallKFallback, and the
# NumPy solver runs instead.
