r"""CAGrad: conflict-averse gradient descent (spec §5)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .._validation import check_int, positive
from ._base import GramianWeightedAggregator
from ._simplex import project_to_simplex

_RESCALES = (0, 1, 2)
_EPS = 1e-8  # the official constants of φ, sqrt(wᵀMw + ·) and λ's denominator
_COARSE_GAP = 1e-6  # FISTA hands over to Newton at this Frank-Wolfe gap


class CAGrad(GramianWeightedAggregator):
    r"""CAGrad: the average gradient corrected towards the worst-served task.

    Liu et al., *Conflict-Averse Gradient Descent for Multi-task Learning*, NeurIPS 2021,
    arXiv `2110.14048 <https://arxiv.org/abs/2110.14048>`_ (spec §5). With :math:`M = JJ^\top`,
    the mean gradient :math:`\bar g = J^\top\mathbf 1/K` (:math:`\lVert\bar g\rVert^2 =
    \operatorname{mean}(M)`) and :math:`\phi = c\lVert\bar g\rVert + 10^{-8}`,

    .. math::
        w^\star = \arg\min_{w\in\Delta}\; w^\top M\mathbf 1/K
                  + \phi\sqrt{w^\top M w + 10^{-8}},\qquad
        g_w = J^\top w^\star,\qquad \lambda = \frac{\phi}{\lVert g_w\rVert + 10^{-8}},

    and the direction is :math:`(\bar g + \lambda g_w)/r`, with :math:`r = 1 + c^2` for
    ``rescale=1`` (default), :math:`r = 1 + c` for ``rescale=2`` (official code) and
    :math:`r = 1` for ``rescale=0``; ``scale_by_k=True`` (default, as the Nash-MTL port, "to
    match the sum loss") multiplies it by K. It is a combination of the rows, so this is a row
    weighting with weights :math:`(\mathbf 1/K + \lambda w^\star)\,K^{[\text{scale\_by\_k}]}/r`
    and :meth:`transform` returns the weighted rows.

    **Solver (ours).** The official port runs SciPy's SLSQP from the uniform point. We solve the
    same convex problem on the ``K×K`` Gramian with accelerated projected gradient (FISTA with
    backtracking, function-value restart and a sort-based simplex projection), starting from
    the uniform point, then a few damped Newton steps on the face of the support found (halved
    until feasible and not increasing the objective), stopping when the Frank–Wolfe gap
    :math:`w^\top\nabla f - \min_i(\nabla f)_i` (zero exactly at the KKT points) is below
    ``tol``, or after ``max_iter`` iterations, returning the best iterate. The problem is first
    divided by :math:`s = \max_i M_{ii}` (the objective scales by :math:`s`, with the constant
    :math:`10^{-8}` inside the square root becoming :math:`10^{-8}/s`), which leaves
    :math:`w^\star` unchanged and makes ``tol`` relative. The solve runs in float64 NumPy on the
    CPU: **one host sync** per call (moving the Gramian), as in the official code.

    ``c = 0`` returns the (scaled) mean gradient exactly, without a solve (the formula would add
    a :math:`10^{-8}`-sized term through :math:`\phi`). All-zero gradients give the zero
    direction; a non-finite ``J`` gives NaN weights.

    Args:
        c: the radius :math:`c \ge 0` of the ball around :math:`\bar g`.
        rescale: 0, 1 or 2 (see above).
        scale_by_k: multiply the direction by K.
        max_iter: the most solver iterations.
        tol: the Frank–Wolfe gap at which the solver stops (on the normalised problem).
    """

    def __init__(
        self,
        c: float = 0.4,
        rescale: int = 1,
        *,
        scale_by_k: bool = True,
        max_iter: int = 1000,
        tol: float = 1e-12,
    ) -> None:
        if not (c >= 0 and math.isfinite(c)):
            raise ValueError(f"c must be a finite non-negative number, got {c!r}")
        if rescale not in _RESCALES:
            raise ValueError(f"rescale must be one of {_RESCALES}, got {rescale!r}")
        check_int("max_iter", max_iter, 0)
        positive("tol", tol)
        self.c = float(c)
        self.rescale = rescale
        self.scale_by_k = bool(scale_by_k)
        self.max_iter = max_iter
        self.tol = tol

    def weights_from_gramian(self, gram_t: Tensor) -> Tensor:
        k = gram_t.shape[0]
        factor = (k if self.scale_by_k else 1.0) / self._divisor()
        if self.c == 0 or k == 0:
            out = torch.full((k,), factor / max(k, 1), dtype=torch.float64)
        else:
            gram = gram_t.cpu().numpy()  # host sync: the solver runs on the CPU in numpy
            w_star = cagrad_simplex(gram, self.c, self.max_iter, self.tol)
            gw_norm = math.sqrt(max(float(w_star @ gram @ w_star), 0.0))
            phi = self.c * math.sqrt(max(float(gram.mean()), 0.0)) + _EPS
            lam = phi / (gw_norm + _EPS)
            out = torch.from_numpy((1.0 / k + lam * w_star) * factor)
        return out.to(device=gram_t.device, dtype=torch.float64)

    def _divisor(self) -> float:
        return {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]

    def __repr__(self) -> str:
        return (
            f"CAGrad(c={self.c}, rescale={self.rescale}, scale_by_k={self.scale_by_k}, "
            f"max_iter={self.max_iter}, tol={self.tol})"
        )


def cagrad_objective(gram: np.ndarray, c: float, w: np.ndarray) -> float:
    """The official objective ``wᵀM1/K + φ sqrt(wᵀMw + 1e-8)`` (unnormalised)."""
    phi = c * math.sqrt(max(float(gram.mean()), 0.0)) + _EPS
    return float(w @ gram.mean(axis=1) + phi * math.sqrt(max(w @ gram @ w, 0.0) + _EPS))


def cagrad_simplex(gram: np.ndarray, c: float, max_iter: int = 1000, tol: float = 1e-12):
    """``w*`` of :class:`CAGrad` for a ``(K, K)`` Gramian, by FISTA on the normalised problem."""
    k = gram.shape[0]
    if not np.isfinite(gram).all():
        return np.full(k, np.nan)
    uniform = np.full(k, 1.0 / k)
    scale = float(np.max(np.diag(gram)))
    if k == 1 or scale <= 0:
        return np.ones(k) if k == 1 else uniform
    m = gram / scale
    b = m.mean(axis=1)
    phi = c * math.sqrt(max(float(m.mean()), 0.0)) + _EPS / math.sqrt(scale)
    eps = _EPS / scale

    def f(w: np.ndarray) -> float:
        return float(w @ b + phi * math.sqrt(max(w @ m @ w, 0.0) + eps))

    def grad(w: np.ndarray) -> np.ndarray:
        mw = m @ w
        return b + phi * mw / math.sqrt(max(w @ mw, 0.0) + eps)

    # FISTA converges sublinearly: take it to a coarse gap, which finds the optimal face, and
    # let Newton on that face finish quadratically; only if that falls short go on with FISTA.
    coarse = max(tol, _COARSE_GAP)
    w = _fista(uniform, f, grad, coarse, max_iter)
    w = _newton_polish(w, m, b, phi, eps, f, grad, tol)
    if _gap(w, grad(w)) > tol and coarse > tol:
        w = _newton_polish(_fista(w, f, grad, tol, max_iter), m, b, phi, eps, f, grad, tol)
    return w


def _gap(w: np.ndarray, g: np.ndarray) -> float:
    """The Frank–Wolfe gap ``wᵀ∇f − min ∇f``: zero exactly at the KKT points."""
    return float(w @ g - g.min())


def _fista(x, f, grad, tol: float, max_iter: int) -> np.ndarray:
    """Accelerated projected gradient on the simplex from ``x``; the best iterate."""
    fx = f(x)
    best, f_best = x, fx
    y, t, lip = x, 1.0, 1.0
    for _ in range(max_iter):
        gx = grad(x)
        if _gap(x, gx) <= tol:
            break
        gy, fy = grad(y), f(y)
        for _ in range(60):  # backtracking on the local Lipschitz constant
            x_new = project_to_simplex(y - gy / lip)
            diff = x_new - y
            f_new = f(x_new)
            if f_new <= fy + gy @ diff + 0.5 * lip * (diff @ diff) + 1e-15 * abs(fy):
                break
            lip *= 2.0
        if f_new > fx:  # restart the momentum from the last iterate
            y, t = x, 1.0
            continue
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, fx, t = x_new, f_new, t_new
        if fx < f_best:
            best, f_best = x, fx
        lip *= 0.9  # let the step grow again
    return best


def _newton_polish(w, m, b, phi, eps, f, grad, tol, n_iter: int = 50):
    """Newton steps on the face of ``w``'s support (Σw = 1 kept), kept only while feasible."""
    support = np.flatnonzero(w > 0)
    if support.size < 2:
        return w
    fw = f(w)
    for _ in range(n_iter):
        g = grad(w)
        if _gap(w, g) <= tol:
            break
        mw = m @ w
        q = math.sqrt(max(w @ mw, 0.0) + eps)
        hess = phi * (m / q - np.outer(mw, mw) / q**3)
        s = support.size
        kkt = np.zeros((s + 1, s + 1))
        kkt[:s, :s] = hess[np.ix_(support, support)]
        kkt[:s, s] = kkt[s, :s] = 1.0
        rhs = np.zeros(s + 1)
        rhs[:s] = -g[support]
        step = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:s]
        for _ in range(40):  # backtracking: a full step can overshoot near the kink at 0
            cand = w.copy()
            cand[support] += step
            ok = np.isfinite(cand).all() and (cand[support] > 0).all()
            f_cand = f(cand) if ok else np.inf
            if f_cand <= fw:
                break
            step = 0.5 * step
        if not f_cand <= fw:
            break
        w, fw = cand, f_cand
    return w
