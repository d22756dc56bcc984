r"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .._validation import check_int, positive
from ._base import GramianWeightedAggregator
from ._simplex import project_to_simplex

_RESCALES = (0, 1, 2)
_EPS = float(np.finfo(np.float64).eps)
_COARSE_GAP = 1e-6  # FISTA hands over to Newton at this Frank-Wolfe gap
_STALL = 50  # FISTA iterations without progress beyond rounding before it gives up


class CAGrad(GramianWeightedAggregator):
    r"""CAGrad: the average gradient corrected towards the worst-served task.

    Liu et al., *Conflict-Averse Gradient Descent for Multi-task Learning*, NeurIPS 2021,
    arXiv `2110.14048 <https://arxiv.org/abs/2110.14048>`_. With the mean gradient
    :math:`\bar g = J^\top\mathbf 1/K` and the radius :math:`r = c\lVert\bar g\rVert`, CAGrad's
    direction is the one that serves the worst task best within a ball around :math:`\bar g`:

    .. math::
        d^\star \in \arg\max_{\lVert d-\bar g\rVert\le r}\ \min_i\ g_i^\top d .

    Its dual, on :math:`M = JJ^\top` only (:math:`\lVert\bar g\rVert^2 = \operatorname{mean}(M)`),
    is

    .. math::
        w^\star = \arg\min_{w\in\Delta}\; w^\top M\mathbf 1/K + r\sqrt{w^\top M w},\qquad
        g_w = J^\top w^\star,\qquad d^\star = \bar g + \frac{r}{\lVert g_w\rVert}\, g_w ,

    and the optimal worst-task improvement equals the dual's minimum. The direction returned is
    :math:`K^{[\text{scale\_by\_k}]}\, d^\star / s`, with :math:`s = 1 + c^2` for ``rescale=1``
    (default), :math:`s = 1 + c` for ``rescale=2`` (official code) and :math:`s = 1` for
    ``rescale=0`` (``scale_by_k=True``, the default, follows the Nash-MTL port, "to match the sum
    loss"). :math:`d^\star` is a combination :math:`J^\top v` of the rows, so this is a row
    weighting with weights :math:`v\,K^{[\text{scale\_by\_k}]}/s` (:math:`v = \mathbf 1/K +
    r\,w^\star/\lVert g_w\rVert` in the closed form) and :meth:`transform` returns the weighted
    rows.

    **Gradients that cancel (our decision).** The closed form needs :math:`g_w \ne 0`. When
    :math:`0` is a convex combination of the task gradients (say two opposed gradients, or more
    tasks than dimensions) no direction improves every task, so the best worst-task improvement
    is at most 0; if moreover the ball reaches the cone :math:`C = \{d : Jd \ge 0\}` of directions
    that harm no task (always when :math:`c \ge 1`: :math:`d = 0` is then in the ball) the
    maximum is exactly 0, :math:`g_w = 0` at the dual optimum, and every point of the ball in
    :math:`C` is a maximiser. The paper's formula is then :math:`0/0`, and the official code's
    :math:`10^{-8}` guards turn it into a point on the sphere, which harms a task: with
    :math:`J = (0.0081, -0.0085)^\top` and :math:`c = 2` it returns the end of the segment
    :math:`\bar g \pm r` instead of :math:`d = 0`. We return the maximiser nearest to
    :math:`\bar g` — the projection of :math:`\bar g` onto :math:`C`, :math:`J^\top v` with
    :math:`v \ge \mathbf 1/K` from the non-negative QP of the dual-cone projection — which is
    :math:`0` for two opposed gradients and :math:`\bar g` itself when :math:`\bar g` harms no
    task. It is the limit of the maximisers as a vanishing penalty on
    :math:`\lVert d-\bar g\rVert` is added, and where the maximiser is unique it is the closed
    form. In practice both candidates are formed and the one with the larger worst-task
    improvement :math:`\min_i (Mv)_i` is kept, the projection when they tie to rounding
    (on the normalised Gramian, where the closed form loses half the digits as
    :math:`g_w \to 0`).

    **Scale.** The problem is solved exactly as stated, so the direction is positively
    homogeneous: scaling :math:`J` by :math:`a > 0` scales it by :math:`a` and leaves the
    weights unchanged. The official code adds :math:`10^{-8}` to :math:`r`, under the square
    root and to :math:`\lVert g_w\rVert`; for gradients of norm about :math:`10^{-4}` or less
    (late training, small losses) these constants change the solution, so we leave them out.

    **Solver (ours).** The official port runs SciPy's SLSQP from the uniform point. We divide
    :math:`M` by its largest diagonal entry (which leaves :math:`w^\star` unchanged and makes
    ``tol`` relative) and run accelerated projected gradient (FISTA with backtracking,
    function-value restart and a sort-based simplex projection) from the uniform point, then a
    few damped Newton steps on the face of the support found (halved until feasible and not
    increasing the objective), stopping when the Frank–Wolfe gap :math:`w^\top\nabla f -
    \min_i(\nabla f)_i` (zero exactly at the KKT points) is below ``tol``, after ``max_iter``
    iterations (returning the best iterate), or as soon as the dual objective certifies that
    the projection above is optimal to rounding. The solve runs in float64 NumPy on the CPU:
    **one host sync** per call (moving the Gramian), as in the official code.

    ``c = 0`` returns the (scaled) mean gradient exactly, without a solve. All-zero gradients
    give the zero direction; a non-finite ``J`` gives NaN weights.

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
            out = torch.from_numpy(cagrad_weights(gram, self.c, self.max_iter, self.tol) * factor)
        return out.to(device=gram_t.device, dtype=torch.float64)

    def _divisor(self) -> float:
        return {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]

    def __repr__(self) -> str:
        return (
            f"CAGrad(c={self.c}, rescale={self.rescale}, scale_by_k={self.scale_by_k}, "
            f"max_iter={self.max_iter}, tol={self.tol})"
        )


def cagrad_objective(gram: np.ndarray, c: float, w: np.ndarray) -> float:
    """The dual objective ``wᵀM1/K + c‖ḡ‖ sqrt(wᵀMw)`` (unnormalised, no smoothing)."""
    r = c * math.sqrt(max(float(gram.mean()), 0.0))
    return float(w @ gram.mean(axis=1) + r * math.sqrt(max(float(w @ gram @ w), 0.0)))


def cagrad_weights(
    gram: np.ndarray, c: float, max_iter: int = 1000, tol: float = 1e-12
) -> np.ndarray:
    """The weights ``v`` of :class:`CAGrad`'s unscaled direction ``d* = Jᵀv`` for a Gramian.

    Two candidates (see the class docstring): the closed form ``1/K + r w*/‖g_w‖`` and the
    projection of ``ḡ`` onto the cone ``{d : Jd ≥ 0}``, when that lies in the ball; the one
    with the larger worst-task improvement ``min_i (Mv)_i`` wins, the projection on a tie to
    rounding. Computed on ``M / max_i M_ii``, so ``v`` does not depend on ``J``'s scale.
    """
    k = gram.shape[0]
    if not np.isfinite(gram).all():
        return np.full(k, np.nan)
    uniform = np.full(k, 1.0 / k)
    scale = float(np.max(np.diag(gram)))
    if scale <= 0:  # all gradients are zero: any weights give d = 0
        return uniform
    m = gram / scale
    b = m @ uniform  # g_i·ḡ
    g0 = math.sqrt(max(float(uniform @ b), 0.0))  # ‖ḡ‖
    r = c * g0
    # The projection of ḡ onto the dual cone: v_p ≥ 1/K, and its feasibility in the ball.
    v_p = cone_projection_weights(m, uniform)
    x_p = v_p - uniform
    dist2 = float(x_p @ m @ x_p)
    rounding = 8 * k * _EPS * (float(np.abs(x_p) @ np.abs(m) @ np.abs(x_p)) + r * r)
    feasible = dist2 <= r * r + rounding
    t_p = float((m @ v_p).min())
    # The dual objective bounds every direction's worst-task improvement from above, so once
    # it is within the rounding of ‖g_w‖ (sqrt(K eps) on the normalised Gramian, times
    # ‖ḡ‖ + r) of the projection's improvement, the projection is optimal to rounding.
    certified = t_p + 4 * math.sqrt(k * _EPS) * (r + g0) if feasible else -math.inf
    w = cagrad_simplex(gram, c, max_iter, tol, stop=certified)
    q = float(w @ m @ w)
    if q <= 0 or cagrad_objective(m, c, w) <= certified:
        return v_p
    v_d = uniform + (r / math.sqrt(q)) * w
    t_d = float((m @ v_d).min())
    noise = 8 * k * _EPS * float((np.abs(m) @ (np.abs(v_d) + np.abs(v_p))).max())
    return v_p if feasible and t_p >= t_d - noise else v_d


def cone_projection_weights(gram: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``v ≥ u`` with ``Jᵀv`` the projection of ``Jᵀu`` onto the cone ``{d : Jd ≥ 0}``.

    The non-negative QP ``min_{x ≥ 0} ½xᵀMx + (Mu)ᵀx`` (``v = u + x``; the single right-hand
    side, NumPy form of the dual-cone projection of UPGrad and DualProj) by Lawson–Hanson's
    active-set method: a multiplier ``(Mv)_j`` below its rounding bound ``-4K eps (|M||v|)_j``
    brings ``j`` into the passive set, solved on that set, stepping back to drop the first
    coordinate that would turn negative. At most ``4K + 10`` outer iterations.
    """
    k = u.size
    q = gram @ u
    abs_gram = np.abs(gram)
    x = np.zeros(k)
    passive = np.zeros(k, dtype=bool)
    for _ in range(4 * k + 10):
        v = u + x
        slack = -(gram @ v) - 4 * k * _EPS * (abs_gram @ np.abs(v))
        slack[passive] = -np.inf
        enter = int(np.argmax(slack))
        if not slack[enter] > 0:
            break
        passive[enter] = True
        for _ in range(k + 1):  # inner loop: keep the passive solution positive
            idx = np.flatnonzero(passive)
            z = np.zeros(k)
            try:  # regular where the entry rule kept dependent rows out of the passive set
                z[idx] = np.linalg.solve(gram[np.ix_(idx, idx)], -q[idx])
            except np.linalg.LinAlgError:
                z[idx] = np.linalg.lstsq(gram[np.ix_(idx, idx)], -q[idx], rcond=None)[0]
            if (z[idx] > 0).all():
                x = z
                break
            shrink = passive & (z <= 0)
            gap = x[shrink] - z[shrink]  # >= 0
            alpha = float(np.where(gap > 0, x[shrink] / np.where(gap > 0, gap, 1.0), 0.0).min())
            if not alpha > 0:  # rounding: the entering index cannot grow; x is optimal
                return u + x
            x = x + alpha * (z - x)
            drop = passive & (x <= 4 * k * _EPS * np.abs(x).max(initial=0.0))
            x[drop] = 0.0
            passive &= ~drop
    return u + x


def cagrad_simplex(
    gram: np.ndarray,
    c: float,
    max_iter: int = 1000,
    tol: float = 1e-12,
    stop: float = -math.inf,
) -> np.ndarray:
    """``w*`` of :class:`CAGrad`'s dual for a ``(K, K)`` Gramian, by FISTA then Newton.

    The problem is normalised by ``s = max_i M_ii``; ``stop`` (in those normalised units)
    ends the search as soon as the objective reaches it."""
    k = gram.shape[0]
    if not np.isfinite(gram).all():
        return np.full(k, np.nan)
    uniform = np.full(k, 1.0 / k)
    scale = float(np.max(np.diag(gram)))
    if k == 1 or scale <= 0:
        return np.ones(k) if k == 1 else uniform
    m = gram / scale
    b = m.mean(axis=1)
    r = c * math.sqrt(max(float(m.mean()), 0.0))

    def f(w: np.ndarray) -> float:
        return float(w @ b + r * math.sqrt(max(w @ m @ w, 0.0)))

    def grad(w: np.ndarray) -> np.ndarray:
        mw = m @ w
        norm = math.sqrt(max(w @ mw, 0.0))
        # at g_w = 0 the norm's subgradient 0 (the kink, optimal only where it ties the cone)
        return b + r * mw / norm if norm > 0 else b

    # FISTA converges sublinearly: take it to a coarse gap, which finds the optimal face, and
    # let Newton on that face finish quadratically; only if that falls short go on with FISTA.
    coarse = max(tol, _COARSE_GAP)
    w = _fista(uniform, f, grad, coarse, max_iter, stop)
    if f(w) <= stop:
        return w
    w = _newton_polish(w, m, b, r, f, grad, tol)
    if _gap(w, grad(w)) > tol and coarse > tol:
        w = _newton_polish(_fista(w, f, grad, tol, max_iter, stop), m, b, r, f, grad, tol)
    return w


def _gap(w: np.ndarray, g: np.ndarray) -> float:
    """The Frank–Wolfe gap ``wᵀ∇f − min ∇f``: zero exactly at the KKT points."""
    return float(w @ g - g.min())


def _fista(x, f, grad, tol: float, max_iter: int, stop: float = -math.inf) -> np.ndarray:
    """Accelerated projected gradient on the simplex from ``x``; the best iterate.

    Also stops when the best objective has not moved beyond rounding for ``_STALL``
    iterations (at the kink ``g_w = 0`` the gap need not fall below ``tol``)."""
    fx = f(x)
    best, f_best = x, fx
    y, t, lip = x, 1.0, 1.0
    f_mark, since = f_best, 0
    for _ in range(max_iter):
        if f_best <= stop:
            break
        if f_best < f_mark - 16 * _EPS * (abs(f_mark) + 1.0):
            f_mark, since = f_best, 0
        elif (since := since + 1) > _STALL:
            break
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


def _newton_polish(w, m, b, r, f, grad, tol, n_iter: int = 50):
    """Newton steps on the face of ``w``'s support (Σw = 1 kept), kept only while feasible.

    Not at the kink ``g_w = 0`` (``wᵀMw`` at rounding level), where there is no Hessian."""
    support = np.flatnonzero(w > 0)
    if support.size < 2:
        return w
    fw = f(w)
    for _ in range(n_iter):
        g = grad(w)
        if _gap(w, g) <= tol:
            break
        mw = m @ w
        q2 = float(w @ mw)
        if not q2 > 64 * w.size * _EPS:
            break
        q = math.sqrt(q2)
        hess = r * (m / q - np.outer(mw, mw) / q**3)
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
