r"""Nash-MTL: the Nash bargaining solution of the tasks.

Navon et al., *Multi-Task Learning as a Bargaining Game*, ICML 2022,
arXiv `2202.01017 <https://arxiv.org/abs/2202.01017>`_.

With the per-task gradients :math:`g_i` (rows of :math:`J`) and the Gramian :math:`M = JJ^\top`,
the update direction is :math:`d = J^\top\alpha` where :math:`\alpha \in \mathbb{R}^K_{>0}` solves
the bargaining condition

.. math::
    (M\alpha)_i = \frac{1}{\alpha_i} \quad\Longleftrightarrow\quad \alpha_i\, g_i^\top d = 1
    \qquad (i = 1, \dots, K).

This is exactly the stationarity condition of the strictly convex function

.. math::
    f(\alpha) = \tfrac12\, \alpha^\top M \alpha - \sum_i \log \alpha_i, \qquad
    \nabla f = M\alpha - 1/\alpha, \qquad \nabla^2 f = M + \operatorname{diag}(1/\alpha^2),

so our default solver is a damped Newton method on :math:`f`, in torch, on the Gramian's device (see
docs/methods/aggregators.md, "Nash-MTL"). The official concave-convex procedure (cvxpy + ECOS) is
kept as ``solver="cvxpy"`` for reference and tests.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from .._linalg import TINY
from .._validation import check_int, positive
from ._base import GramianWeightedAggregator
from ._partial import on, present_tasks, scatter

Solver = Literal["newton", "cvxpy"]
_SOLVERS = get_args(Solver)

# Newton internals (float64 throughout).
_ARMIJO = 1e-4  # sufficient-decrease constant of the backtracking line search
_N_BACKTRACK = 12  # candidate steps t0 * 2^-j, j = 0..11, evaluated in one batch
_FULL_STEP = 0.25  # Newton decrement below which the full step is taken (self-concordance)
_TO_BOUNDARY = 0.99  # fraction-to-the-boundary factor that keeps alpha > 0
_ACCEPT = 1e-4  # a final max |alpha_i (M alpha)_i - 1| above this means "no solution": fallback
_DIVERGED = 1e12  # a normalised weight above this means the problem is (numerically) unbounded


class NashMTL(GramianWeightedAggregator):
    r"""Nash-MTL weights :math:`\alpha` with :math:`\alpha_i (M\alpha)_i = 1`, :math:`M = JJ^\top`.

    Navon et al., ICML 2022, arXiv `2202.01017 <https://arxiv.org/abs/2202.01017>`_.
    The combined direction is :math:`J^\top\alpha`. It is invariant to the loss scales: replacing
    :math:`L_i` by :math:`c_i L_i` (:math:`c_i > 0`) maps :math:`\alpha_i \mapsto \alpha_i / c_i`
    and leaves the direction unchanged; for orthogonal rows :math:`\alpha_i = 1/\lVert g_i\rVert`.

    **Newton solver** (``solver="newton"``, default; ours). Minimise
    :math:`f(\alpha) = \tfrac12\alpha^\top M\alpha - \sum_i\log\alpha_i`, whose stationary point
    is the bargaining solution. We first normalise :math:`M` by its diagonal,
    :math:`\hat M = D^{-1} M D^{-1}` with :math:`D = \operatorname{diag}(\lVert g_i\rVert)`, and
    solve for :math:`\beta = D\alpha` (so :math:`\alpha = D^{-1}\beta`, undone exactly): this is
    a per-task positive scaling that contains the scalar one (:math:`M \to cM` gives
    :math:`\alpha \to \alpha/\sqrt c`), makes :math:`\hat M` unit-diagonal, and makes the solver
    itself loss-scale equivariant. Each iteration takes the Newton step
    :math:`\Delta = -(\hat M + \operatorname{diag}(1/\beta^2))^{-1}\nabla f` (Cholesky) and

    * the full step when the Newton decrement :math:`\lambda = \sqrt{-\nabla f^\top\Delta}` is
      below 1/4 (:math:`f` is self-concordant, so the full step then stays positive and converges
      quadratically);
    * otherwise the largest of :math:`t_0 2^{-j}` (:math:`t_0 = \min(1, 0.99\,t_{\max})`,
      :math:`t_{\max}` the step to the boundary :math:`\beta > 0`) meeting the Armijo condition,
      all candidates evaluated in one batch, or the damped step :math:`1/(1+\lambda)`
      (guaranteed positive and decreasing) if it is larger.

    It starts from the previous :math:`\alpha` (warm start) or from :math:`\alpha_i =
    1/\lVert g_i\rVert` (the orthogonal-case solution), whichever has the lower :math:`f`, runs at
    most ``max_iter`` iterations and stops once :math:`\max_i|\alpha_i(M\alpha)_i - 1| \le`
    ``tol``. Everything runs in float64 on ``J``'s device (the Gramian is accumulated in
    float64 from a float32 ``J``, in column chunks); the result is cast to ``J``'s dtype.

    **Fallback (unbounded case).** :math:`f` is unbounded below, and no bargaining solution
    exists, when some :math:`v \ge 0, v \ne 0` has :math:`Mv = 0`: a zero gradient row, or
    exactly opposed / positively dependent gradients (a Pareto-stationary point). We keep the
    previous :math:`\alpha` (ones before the first solve), the official behaviour when its solver
    fails, and not a ridge, which would bias every solution and break the loss-scale invariance:

    * a zero row :math:`g_i = 0` (squared norm :math:`\le` the smallest normal float64) is taken
      out of the problem and keeps its previous :math:`\alpha_i`; the other weights are solved
      for (:math:`\alpha_i` does not change the direction since :math:`g_i = 0`);
    * otherwise, if after the iterations the residual :math:`\max_i|\alpha_i(M\alpha)_i - 1|`
      exceeds ``1e-4``, a weight blew up, or anything is non-finite (``J`` with NaN/Inf, or a
      Gramian that overflowed), the whole previous :math:`\alpha` is returned. In the exactly
      degenerate case this is clear-cut: :math:`\sum_i v_i (r_i + 1)/\alpha_i = v^\top M\alpha
      = 0` forces some residual :math:`r_i \le -1`.

    So the output is always finite (up to the range of ``J``'s dtype).

    **cvxpy solver** (``solver="cvxpy"``, reference; needs ``pip install 'mtl_optim[solvers]'``).
    The official concave-convex procedure, in a DPP form so that cvxpy compiles it once per
    ``K``: :math:`\tilde M = M/\lVert M\rVert_F`, at most ``optim_niter`` convex solves of

    .. math::
        \min_{\alpha\ge0}\ \mathbf 1^\top\tilde M\alpha + \frac{\nabla\phi(\alpha_p)^\top\alpha}
        {\lVert M\rVert_F}
        \quad\text{s.t.}\quad \log\alpha_i + \log(\tilde M\alpha)_i \ge
        -\log\lVert M\rVert_F,
        \qquad \nabla\phi(\alpha_p) = 1/\alpha_p + \tilde M(1/\tilde M\alpha_p),

    warm-started from the previous :math:`\alpha` (ones at first), with ECOS (``max_iters=100``)
    if installed, else CLARABEL, and the official early stops
    (:math:`\lVert\tilde M\alpha_p - 1/(\alpha_p+10^{-10})\rVert < 10^{-3}` or
    :math:`\lVert\alpha - \alpha_p\rVert < 10^{-6}`). On a solver failure (exception, no value,
    non-finite value) it keeps the last good iterate, which is the previous :math:`\alpha` when
    the first solve fails. As in the official code, nothing guards the linearisation point: a
    zero :math:`(\tilde M\alpha_p)_i` makes it undefined, and a negative one (e.g. from ones,
    when a task's gradient has a negative inner product with the sum) can make the subproblem
    unbounded; the previous :math:`\alpha` is then kept. The default ECOS tolerances limit the
    accuracy to about 1e-4 (relative). It syncs with the host and runs on the CPU.

    **Deviations from the official code.** The Newton solver (default) replaces the CCP: same
    solution, reached to ``tol`` instead of the CCP's loose early stops, without cvxpy. The
    fallback treats zero rows per task (the official solve fails as a whole). The Gramian is
    accumulated in float64 (the official code uses the gradients' dtype). On an early stop
    the cvxpy path returns the newest solution, not the iterate before it. The shared-gradient
    clipping (``max_norm``) is done by the optimizer, not here. The state (:math:`\alpha`,
    call counter) is in :meth:`state_dict`.

    **Partial labels.** With only m of the K tasks present (the rows are theirs), the solve
    is the m-task problem on their Gramian, warm-started from their entries of :math:`\alpha`
    (and falling back to them); only those entries are updated, the missing tasks' weights are
    kept for when they return. :math:`\alpha` has K entries even when the first call already
    misses a task (ones for the tasks not solved for yet). The call counter of
    ``update_weights_every`` counts every call; on a call that does not solve, the present
    tasks' stored weights are returned.

    Args:
        solver: ``"newton"`` (default) or ``"cvxpy"``.
        update_weights_every: solve on calls ``0, n, 2n, ...`` (counting from 0) and reuse the
            stored :math:`\alpha` without solving on the others (official default 1). A change
            of the number of tasks always triggers a solve.
        optim_niter: the most CCP iterations of the cvxpy solver (official default 20).
        max_norm: the official clipping norm of the shared gradient (default 1.0). Stored
            only: the optimizer applies it after the combination; :meth:`weights` does not clip.
        max_iter: the most Newton iterations per solve.
        tol: Newton stops when :math:`\max_i|\alpha_i(M\alpha)_i - 1| \le` ``tol``.
        check_every: test the Newton stop rule every this many iterations. Each test is one host
            sync (a ``bool`` of a device tensor); ``None`` never tests and always runs
            ``max_iter`` iterations, with no sync at all.
    """

    def __init__(
        self,
        *,
        solver: Solver = "newton",
        update_weights_every: int = 1,
        optim_niter: int = 20,
        max_norm: float = 1.0,
        max_iter: int = 100,
        tol: float = 1e-10,
        check_every: int | None = 1,
    ) -> None:
        if solver not in _SOLVERS:
            raise ValueError(f"solver must be one of {_SOLVERS}, got {solver!r}")
        check_int("update_weights_every", update_weights_every, 1)
        check_int("optim_niter", optim_niter, 1)
        check_int("max_iter", max_iter, 1)
        check_int("check_every", check_every, 1, optional=True)
        positive("tol", tol)
        positive("max_norm", max_norm)
        self.solver = solver
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self.max_norm = float(max_norm)
        self.max_iter = max_iter
        self.tol = float(tol)
        self.check_every = check_every
        self._alpha: Tensor | None = None  # float64, on the device of the last J
        self._step = 0
        self._cvx_cache: dict[int, tuple[Any, ...]] = {}

    # ------------------------------------------------------------------ API

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        k = gram.shape[0]
        device = gram.device
        index, num_tasks = present_tasks(self, k)
        prev = self._alpha
        if prev is not None and prev.shape[0] != num_tasks:
            prev = None  # the number of tasks changed: start again from ones
        full = prev
        if index is not None and prev is not None:  # warm start from the present tasks' α
            full = prev.to(device)
            prev = full.index_select(0, on(index, device))
        if prev is None or self._step % self.update_weights_every == 0:
            if prev is None:
                prev = torch.ones(k, dtype=torch.float64, device=device)
            prev = prev.to(device)
            if self.solver == "newton":
                alpha = _newton(gram, prev, self.max_iter, self.tol, self.check_every)
            else:
                alpha = self._cvxpy(gram, prev)
        else:
            alpha = prev.to(device)
        self._step += 1
        if index is None:
            self._alpha = alpha
        else:  # only the present tasks' α move; a first call sizes α by K (ones elsewhere)
            if full is None:
                full = torch.ones(num_tasks, dtype=torch.float64, device=device)
            self._alpha = scatter(full, index, alpha)
        return alpha

    def state_dict(self) -> dict[str, Any]:
        alpha = None if self._alpha is None else self._alpha.detach().clone()
        return {"alpha": alpha, "step": self._step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        extra = set(state) - {"alpha", "step"}
        if extra or "step" not in state:
            raise ValueError(
                f"NashMTL state must have keys 'alpha' and 'step', got {sorted(state)}"
            )
        alpha = state.get("alpha")
        if alpha is not None:
            alpha = torch.as_tensor(alpha, dtype=torch.float64).detach().clone().reshape(-1)
        self._alpha = alpha
        self._step = int(state["step"])

    def __repr__(self) -> str:
        return (
            f"NashMTL(solver={self.solver!r}, update_weights_every={self.update_weights_every}, "
            f"optim_niter={self.optim_niter}, max_norm={self.max_norm}, "
            f"max_iter={self.max_iter}, tol={self.tol}, check_every={self.check_every})"
        )

    # ------------------------------------------------------------------ cvxpy reference

    def _cvxpy(self, gram: Tensor, prev: Tensor) -> Tensor:
        """The official concave-convex procedure on the CPU; see the class docstring."""
        cp = _import_cvxpy()
        k = gram.shape[0]
        g = gram.cpu().numpy()
        alpha_t = prev.cpu().numpy().astype(np.float64)
        nf = float(np.linalg.norm(g))
        if not (np.isfinite(g).all() and nf > 0):
            return prev
        if k not in self._cvx_cache:
            self._cvx_cache[k] = _build_problem(cp, k)
        prob, a, g_par, c_par, lognf_par, solve_kw = self._cvx_cache[k]
        g_n = g / nf
        g_par.value = g_n
        lognf_par.value = math.log(nf)
        for _ in range(self.optim_niter):
            with np.errstate(divide="ignore", invalid="ignore"):
                c = (1.0 / alpha_t + (1.0 / (g_n @ alpha_t)) @ g_n) / nf
            if not np.isfinite(c).all():
                break
            c_par.value = c
            a.value = np.maximum(alpha_t, 0.0)  # a solver may return -1e-12; a is nonneg
            try:
                prob.solve(warm_start=True, **solve_kw)
            except (cp.SolverError, ValueError, ArithmeticError):
                break
            new = a.value
            if new is None or not np.isfinite(new).all():
                break
            new = np.asarray(new, dtype=np.float64)
            stop = (
                np.linalg.norm(g_n @ alpha_t - 1.0 / (alpha_t + 1e-10)) < 1e-3
                or np.linalg.norm(new - alpha_t) < 1e-6
            )
            alpha_t = new
            if stop:
                break
        return torch.from_numpy(alpha_t.copy()).to(device=gram.device, dtype=torch.float64)


# ---------------------------------------------------------------------- helpers


def _objective(m: Tensor, beta: Tensor) -> Tensor:
    """``f(β) = ½ βᵀ M β − Σ log β`` along the last dimension (``beta`` may be batched)."""
    return 0.5 * ((beta @ m) * beta).sum(-1) - torch.log(beta).sum(-1)


def _newton(gram: Tensor, prev: Tensor, max_iter: int, tol: float, check: int | None) -> Tensor:
    """Damped Newton on ``f`` (see :class:`NashMTL`); returns ``α`` in float64."""
    k = gram.shape[0]
    if k == 0:
        return prev
    dev = gram.device
    eye = torch.eye(k, dtype=torch.float64, device=dev)
    diag = gram.diagonal()
    active = diag > TINY  # False for zero rows and NaN; True for +inf (fails later)
    d = torch.where(active, diag, torch.ones_like(diag)).sqrt()
    both = active[:, None] & active[None, :]
    # Jacobi normalisation; an inactive (zero) row becomes the decoupled equation β_i² = 1.
    m = torch.where(both, gram / d[:, None] / d[None, :], eye)
    ones = torch.ones(k, dtype=torch.float64, device=dev)

    # Start: the warm start D·α_prev or β = 1 (α_i = 1/‖g_i‖), whichever has the lower f.
    warm = d * prev
    warm = torch.where(torch.isfinite(warm) & (warm > 0), warm, ones)
    beta = torch.where(_objective(m, warm) < _objective(m, ones), warm, ones)

    ts = 0.5 ** torch.arange(_N_BACKTRACK, dtype=torch.float64, device=dev)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=dev)
    for it in range(max_iter):
        mb = m @ beta
        grad = mb - 1.0 / beta
        chol, info = torch.linalg.cholesky_ex(m + torch.diag(1.0 / beta**2))
        step = -torch.cholesky_solve(grad[:, None], chol)[:, 0]
        lam2 = -(grad @ step)
        if check is not None and it % check == 0:
            res = (beta * mb - 1.0).abs().amax()
            # Host sync (one small device-to-host copy): the early stop saves most of the
            # max_iter iterations, since warm-started solves converge in a few. Stop when
            # converged, and also when hopeless (non-finite, or a weight blew up).
            stats = torch.stack([res, beta.amax(), lam2, info.to(lam2), step.abs().amax()])
            r, b_max, l2, failed, s_max = stats.tolist()
            if not (r > tol and math.isfinite(r) and b_max <= _DIVERGED):
                break
            if failed == 0 and 0 < l2 < _FULL_STEP**2 and math.isfinite(s_max):
                # Inside the region of quadratic convergence the full step is safe (it stays
                # in the Dikin ellipsoid, so α > 0): skip the line search altogether.
                beta = beta + step
                continue
        # A non-PD Hessian (only if M is numerically indefinite) or a non-descent step: fall
        # back to the Newton step of the log barrier alone, -β² ∇f, a descent direction.
        bad = (info != 0) | ~(lam2 > 0) | ~torch.isfinite(step).all()
        step = torch.where(bad, -(beta**2) * grad, step)
        lam2 = torch.where(bad, ((beta * grad) ** 2).sum(), lam2)
        lam = lam2.sqrt()

        t_max = torch.where(step < 0, -beta / step, inf).amin()
        t0 = torch.clamp(_TO_BOUNDARY * t_max, max=1.0)
        cand_t = t0 * ts
        cand = beta + cand_t[:, None] * step
        ok = _objective(m, cand) <= _objective(m, beta) - _ARMIJO * cand_t * lam2
        first = torch.argmax(ok.to(torch.int8))  # the first (largest) accepted step
        t_ls = torch.where(ok.any(), cand_t[first], torch.zeros_like(t0))
        t_damped = torch.where(bad, torch.zeros_like(lam), 1.0 / (1.0 + lam))
        t = torch.where(
            ~bad & (lam < _FULL_STEP), torch.ones_like(t0), torch.maximum(t_ls, t_damped)
        )
        t = torch.minimum(t, _TO_BOUNDARY * t_max)  # belt and braces: positivity
        beta = beta + t * step

    res = (beta * (m @ beta) - 1.0).abs().amax()
    good = torch.isfinite(res) & (res <= _ACCEPT) & (beta.amax() <= _DIVERGED)
    good = good & torch.isfinite(gram).all()  # NaN/Inf anywhere: keep the whole previous α
    alpha = torch.where(active & good, beta / d, prev)
    return alpha


def _import_cvxpy():
    try:
        import cvxpy as cp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "NashMTL(solver='cvxpy') needs cvxpy; install it with pip install 'mtl_optim[solvers]'"
        ) from exc
    return cp


def _build_problem(cp, k: int) -> tuple[Any, ...]:
    """The DPP form of one CCP subproblem for ``K = k`` (compiled once, then re-solved)."""
    a = cp.Variable(k, nonneg=True)
    g = cp.Parameter((k, k))
    c = cp.Parameter(k)
    lognf = cp.Parameter()
    ga = g @ a
    prob = cp.Problem(
        cp.Minimize(cp.sum(ga) + c @ a),
        [-cp.log(a) - cp.log(ga) <= lognf],
    )
    if "ECOS" in cp.installed_solvers():
        solve_kw = {"solver": cp.ECOS, "max_iters": 100}
    else:
        solve_kw = {"solver": cp.CLARABEL}
    return prob, a, g, c, lognf, solve_kw
