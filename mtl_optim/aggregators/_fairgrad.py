r"""FairGrad: α-fair allocation of the loss decreases among the tasks.

Ban & Ji, *Fair Resource Allocation in Multi-Task Learning*, ICML 2024,
arXiv `2402.15638 <https://arxiv.org/abs/2402.15638>`_; official code OptMN-Lab/fairgrad.

The update :math:`d = J^\top w` maximises the α-fair utility of the tasks' decrease rates
:math:`g_i^\top d`; its first-order condition is, with :math:`M = JJ^\top`,

.. math::
    (M w)_i = w_i^{-1/\alpha} \qquad (w_i > 0,\ i = 1, \dots, K).

:math:`\alpha = 1` is proportional fairness (Nash-MTL's condition :math:`(Mw)_i = 1/w_i`),
:math:`\alpha \to \infty` approaches max-min fairness. With :math:`p = 1/\alpha` the condition is
the stationarity condition of the strictly convex

.. math::
    f(w) = \tfrac12 w^\top M w - \sum_i h(w_i), \qquad
    h(t) = \begin{cases} \log t & p = 1 \\ t^{1-p}/(1-p) & p \ne 1 \end{cases},
    \qquad \nabla^2 f = M + \operatorname{diag}(p\, w^{-p-1}),

which we minimise with damped Newton steps in torch (the official code calls SciPy's
``least_squares`` on the residual).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._linalg import TINY
from .._validation import check_int, positive
from ._base import GramianWeightedAggregator
from ._partial import on, present_tasks, scatter

_EPS = torch.finfo(torch.float64).eps
_ARMIJO = 1e-4  # sufficient-decrease constant of the backtracking line search
_N_BACKTRACK = 12  # candidate steps t0 * 2^-j, j = 0..11, evaluated in one batch
_FULL_STEP = 0.25  # Newton decrement below which the full step is taken
_TO_BOUNDARY = 0.99  # fraction-to-the-boundary factor that keeps w > 0
_ACCEPT = 1e-4  # a final residual r(w) above this means "not solved": fallback
_UNSOLVABLE = 0.5  # a relative residual above this means "no solution" (see the docstring)
_DIVERGED = 1e12  # a normalised weight above this means the problem is (numerically) unbounded


class FairGrad(GramianWeightedAggregator):
    r"""FairGrad: the weights :math:`w > 0` with :math:`(JJ^\top w)_i = w_i^{-1/\alpha}`.

    Ban & Ji, ICML 2024, arXiv `2402.15638 <https://arxiv.org/abs/2402.15638>`_. The
    direction is :math:`J^\top w`, times K with ``scale_by_k=True`` (the official
    ``overwrite_grad`` multiplies by the number of tasks "to match the sum loss"); the official
    step then clips the shared gradient to ``max_norm``, which the optimizer does here. For
    :math:`\alpha = 1` the weights are Nash-MTL's; for orthogonal rows
    :math:`w_i = \lVert g_i\rVert^{-2\alpha/(1+\alpha)}`. Scaling :math:`M \to cM` maps
    :math:`w \to c^{-\alpha/(1+\alpha)} w`.

    **Solver (ours).** Damped Newton on :math:`f` (module docstring), in float64 on the
    Gramian's device. :math:`M` is first divided by :math:`s = \max_i M_{ii}` and the problem
    solved for :math:`u` with :math:`w = s^{-\alpha/(1+\alpha)} u` (undone exactly). Each
    iteration takes the Newton step :math:`\Delta = -(\nabla^2 f)^{-1}\nabla f` (Cholesky) and
    the full step when the Newton decrement :math:`\lambda = \sqrt{-\nabla f^\top\Delta}` is below
    1/4, otherwise the largest of :math:`t_0 2^{-j}` (:math:`j < 12`,
    :math:`t_0 = \min(1, 0.99\,t_{\max})`, :math:`t_{\max}` the step to the boundary
    :math:`u > 0`) meeting the Armijo condition, all candidates evaluated in one batch, always
    capped at :math:`0.99\,t_{\max}` so that :math:`u` stays positive. It starts from the
    previous solution (warm start) or from the orthogonal-case solution
    :math:`u_i = \tilde M_{ii}^{-\alpha/(1+\alpha)}`, whichever has the lower :math:`f`, runs at
    most ``max_iter`` iterations and stops once the relative residual of the condition, beyond
    the rounding error of :math:`Mw`,

    .. math::
        r(w) = \max_i \frac{|(Mw)_i - w_i^{-1/\alpha}| - 4K\varepsilon\,(|M|w)_i}
        {w_i^{-1/\alpha}}

    is at most ``tol`` (:math:`\varepsilon` the float64 machine epsilon). Without the rounding
    term the relative residual cannot reach ``tol`` when :math:`(Mw)_i` cancels, e.g. for
    :math:`\alpha = 0.1` and ill-conditioned ``J``.

    **Fallback.** No solution exists when some :math:`v \ge 0, v \ne 0` has :math:`Mv = 0`
    (a zero row, or a vanishing non-negative combination of the rows such as exactly opposed
    rows: a Pareto-stationary point);
    :math:`f` then has no minimiser. As in :class:`~mtl_optim.aggregators.NashMTL`:

    * a zero row (squared norm at most the smallest normal float64) is taken out of the problem
      and keeps its previous weight, the others are solved for;
    * otherwise, the whole previous :math:`w` is returned if after the iterations
      :math:`r(w) > 10^{-4}`, or the plain relative residual
      :math:`\max_i |w_i^{1/\alpha}(Mw)_i - 1| > 1/2`, or a weight blew up, or anything is
      non-finite. The second test catches the unsolvable case, where :math:`r` can look small
      because :math:`Mw \to 0` cancels: there :math:`\sum_i v_i (Mw)_i = v^\top M w = 0`
      forces :math:`(Mw)_i \le 0` for some :math:`i`, a relative residual of at least 1,
      whatever :math:`w`.

    The previous :math:`w` is ones before the first solve; it is kept in :meth:`state_dict`,
    together with the number of tasks, which is fixed by the first call.

    **Host syncs.** One ``bool`` per ``check_every`` iterations for the early stop (a warm
    start converges in a few iterations, so this saves most of ``max_iter``); with
    ``check_every=None`` there is none and ``max_iter`` iterations always run.

    **Deviations from the official code.** The official solve starts every call from
    :math:`\mathbf 1/K` and stops at SciPy's default tolerances; ours is warm-started, solved to
    ``tol`` and has the fallback above (the official code returns whatever ``least_squares``
    reached). The Gramian is accumulated in float64.

    **Partial labels.** With only m of the K tasks present (the rows are theirs), the solve
    is the m-task problem on their Gramian, warm-started from (and falling back to) their
    entries of the previous solution; only those entries are updated. ``scale_by_k``
    multiplies by m. The stored solution has K entries even when the first call already
    misses a task (ones for the tasks not solved for yet).

    Args:
        alpha: the fairness parameter :math:`\alpha > 0` (official default 1.0).
        scale_by_k: multiply the weights by K (official).
        max_norm: the official clipping norm of the shared gradient (default 1.0), applied by
            the optimizer after the combination; ``None`` disables it. :meth:`weights` does
            not clip.
        max_iter: the most Newton iterations per call.
        tol: the residual :math:`r(w)` at which Newton stops.
        check_every: test the stop rule every this many iterations (one host sync each);
            ``None`` never tests.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        *,
        scale_by_k: bool = True,
        max_norm: float | None = 1.0,
        max_iter: int = 100,
        tol: float = 1e-12,
        check_every: int | None = 1,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite positive number, got {alpha!r}")
        check_int("max_iter", max_iter, 1)
        check_int("check_every", check_every, 1, optional=True)
        if max_norm is not None:
            positive("max_norm", max_norm)
        positive("tol", tol)
        self.alpha = float(alpha)
        self.scale_by_k = bool(scale_by_k)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.max_iter = max_iter
        self.tol = float(tol)
        self.check_every = check_every
        self._w: Tensor | None = None  # the previous unscaled solution, float64

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        k = gram.shape[0]
        gram = gram.to(torch.float64)
        index, num_tasks = present_tasks(self, k)
        prev = self._w
        if prev is None:
            prev = torch.ones(num_tasks, dtype=torch.float64, device=gram.device)
        elif prev.shape[0] != num_tasks:
            raise ValueError(
                f"FairGrad was first called with {prev.shape[0]} tasks, now {num_tasks}"
            )
        full = prev.to(gram.device)
        if index is not None:  # the present tasks' warm start; only their entries move
            prev = full.index_select(0, on(index, gram.device))
        w = _solve(gram, prev.to(gram.device), 1.0 / self.alpha, self)
        self._w = w if index is None else scatter(full, index, w)
        return w * k if self.scale_by_k else w

    def state_dict(self) -> dict[str, Any]:
        return {"w": None if self._w is None else self._w.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"w"}:
            raise ValueError(f"FairGrad state must have the key 'w', got {sorted(state)}")
        w = state["w"]
        self._w = None if w is None else torch.as_tensor(w, dtype=torch.float64).clone()

    def __repr__(self) -> str:
        return (
            f"FairGrad(alpha={self.alpha}, scale_by_k={self.scale_by_k}, "
            f"max_norm={self.max_norm}, max_iter={self.max_iter}, tol={self.tol}, "
            f"check_every={self.check_every})"
        )


def _objective(m: Tensor, u: Tensor, p: float) -> Tensor:
    """``f(u)`` along the last dimension (``u`` may be batched)."""
    barrier = torch.log(u) if p == 1.0 else u ** (1.0 - p) / (1.0 - p)
    return 0.5 * ((u @ m) * u).sum(-1) - barrier.sum(-1)


def _residuals(m: Tensor, u: Tensor, p: float) -> tuple[Tensor, Tensor]:
    r"""The relative residual :math:`\max_i |u_i^p (Mu)_i - 1|`, and the same beyond rounding.

    The second is :math:`\max_i (|(Mu)_i - u_i^{-p}| - 4K\varepsilon\,(|M|u)_i) / u_i^{-p}`:
    when :math:`(Mu)_i` cancels (large ``p``, nearly opposed rows) the first stays far above
    rounding even at the exact solution, and the bound :math:`4K\varepsilon(|M|u)_i` on the
    rounding error of :math:`Mu` discounts exactly that.
    """
    target = u ** (-p)
    mu = m @ u
    relative = (mu / target - 1.0).abs().amax()
    rounding = 4 * m.shape[0] * _EPS * (m.abs() @ u)
    beyond = (((mu - target).abs() - rounding) / target).amax()
    return relative, beyond


def _solve(gram: Tensor, prev: Tensor, p: float, opts: FairGrad) -> Tensor:
    """Damped Newton on ``f`` for the normalised Gramian (see :class:`FairGrad`)."""
    k = gram.shape[0]
    if k == 0:
        return prev
    dev = gram.device
    eye = torch.eye(k, dtype=torch.float64, device=dev)
    diag = gram.diagonal()
    active = diag > TINY  # False for zero rows and NaN
    s = torch.where(active, diag, torch.zeros_like(diag)).amax()
    s = torch.where(s > 0, s, torch.ones_like(s))
    both = active[:, None] & active[None, :]
    # An inactive (zero) row becomes the decoupled equation u_i = u_i^-p, solved by u_i = 1.
    m = torch.where(both, gram / s, eye)
    scale = s ** (-1.0 / (1.0 + p))  # w = scale * u

    ones = torch.ones(k, dtype=torch.float64, device=dev)
    cold = m.diagonal() ** (-1.0 / (1.0 + p))
    warm = prev / scale
    warm = torch.where(torch.isfinite(warm) & (warm > 0), warm, ones)
    u = torch.where(_objective(m, warm, p) < _objective(m, cold, p), warm, cold)

    ts = 0.5 ** torch.arange(_N_BACKTRACK, dtype=torch.float64, device=dev)
    inf = torch.full((), math.inf, dtype=torch.float64, device=dev)
    for it in range(opts.max_iter):
        if opts.check_every is not None and it % opts.check_every == 0:
            res = _residuals(m, u, p)[1]
            # Host sync (one `bool`): stop when converged, and also when hopeless.
            if bool((res <= opts.tol) | ~torch.isfinite(res) | (u.amax() > _DIVERGED)):
                break
        grad = m @ u - u ** (-p)
        chol, info = torch.linalg.cholesky_ex(m + torch.diag(p * u ** (-p - 1.0)))
        step = -torch.cholesky_solve(grad[:, None], chol)[:, 0]
        lam2 = -(grad @ step)
        # A non-PD Hessian (M numerically indefinite) or a non-descent step: fall back to the
        # Newton step of the barrier term alone, a descent direction.
        bad = (info != 0) | ~(lam2 > 0) | ~torch.isfinite(step).all()
        precond = u ** (p + 1.0) / p
        step = torch.where(bad, -precond * grad, step)
        lam2 = torch.where(bad, (precond * grad * grad).sum(), lam2)

        t_max = torch.where(step < 0, -u / step, inf).amin()
        t0 = torch.clamp(_TO_BOUNDARY * t_max, max=1.0)
        cand_t = t0 * ts
        cand = u + cand_t[:, None] * step
        ok = _objective(m, cand, p) <= _objective(m, u, p) - _ARMIJO * cand_t * lam2
        first = torch.argmax(ok.to(torch.int8))  # the first (largest) accepted step
        t_ls = torch.where(ok.any(), cand_t[first], torch.zeros_like(t0))
        t = torch.where(~bad & (lam2 < _FULL_STEP**2), t0, t_ls)
        u = u + t * step

    relative, beyond = _residuals(m, u, p)
    good = (beyond <= _ACCEPT) & (relative <= _UNSOLVABLE) & (u.amax() <= _DIVERGED)
    good = good & torch.isfinite(gram).all()
    return torch.where(active & good, scale * u, prev)
