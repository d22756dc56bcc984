"""CAGrad: the worst-task guarantee against a cvxpy solve of the primal, the closed form, the
decision for gradients that cancel, scale invariance, the solver and the options."""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np
import pytest
import torch
from conftest import examples, matrices
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from mtl_optim.aggregators._cagrad import (
    CAGrad,
    cagrad_objective,
    cagrad_simplex,
    cone_projection_weights,
)
from mtl_optim.aggregators._dual_cone import dual_cone_weights

F64 = torch.float64
EPS64 = torch.finfo(F64).eps

# The two matrices of the bug report: opposed 1-D gradients with c = 2, where d = 0 is in the
# ball and harms no task, and the closed form's 0/0 gave an end of the segment ḡ ± r.
OPPOSED_SMALL = torch.tensor([[0.0081], [-0.0085]], dtype=F64)
OPPOSED_LARGE = torch.tensor([[25462.8], [-26753.8]], dtype=F64)
# g_1 = -g_2 and g_3 ⟂ both: 0 is a convex combination, ḡ = g_3/3 harms no task.
CANCEL_PLUS_ONE = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)


def raw(jacobian: torch.Tensor, c: float) -> torch.Tensor:
    """The unscaled direction d* (no rescale, no factor K)."""
    return CAGrad(c=c, rescale=0, scale_by_k=False)(jacobian)


def best_worst_task(j: np.ndarray, c: float) -> float:
    """cvxpy on the primal: the best worst-task improvement ``max min_i g_i·d`` over the ball
    ``‖d - ḡ‖ <= c‖ḡ‖``, for ``j`` normalised to largest row norm 1."""
    g0 = j.mean(axis=0)
    d, t = cp.Variable(j.shape[1]), cp.Variable()
    radius = c * float(np.linalg.norm(g0))
    cp.Problem(cp.Maximize(t), [j @ d >= t, cp.norm(d - g0) <= radius]).solve(solver=cp.CLARABEL)
    return float(t.value)


def nearest_reaching(j: np.ndarray, level: float) -> float:
    """cvxpy: the distance from ḡ to the nearest ``d`` with ``min_i g_i·d >= level``."""
    g0 = j.mean(axis=0)
    e = cp.Variable(j.shape[1])
    cp.Problem(cp.Minimize(cp.norm(e - g0)), [j @ e >= level]).solve(solver=cp.CLARABEL)
    return float(np.linalg.norm(e.value - g0))


@settings(max_examples=examples(40))
@given(matrices(k_min=1, k_max=4, d_max=5, exponent=6.0), st.floats(0.05, 3.0))
@example(OPPOSED_SMALL, 2.0)
@example(OPPOSED_LARGE, 2.0)
@example(OPPOSED_SMALL, 0.5)
@example(CANCEL_PLUS_ONE, 0.4)
@example(CANCEL_PLUS_ONE, 2.0)
def test_direction_maximises_the_worst_task_improvement(jacobian, c):
    # CAGrad's guarantee: d* maximises min_i g_i·d over the ball ‖d - ḡ‖ <= c‖ḡ‖; among the
    # maximisers (there are several only when the gradients cancel) it is the nearest to ḡ.
    # Checked against cvxpy (Clarabel, tolerance 1e-8) on J normalised to largest row norm 1.
    scale = jacobian.norm(dim=1).max().item()
    if scale == 0:
        assert torch.equal(raw(jacobian, c), torch.zeros(jacobian.shape[1], dtype=F64))
        return
    j = (jacobian / scale).numpy()
    d = raw(jacobian, c).numpy() / scale
    g0 = j.mean(axis=0)
    radius = c * float(np.linalg.norm(g0))
    assert np.linalg.norm(d - g0) <= radius + 1e-12  # in the ball
    worst = (j @ d).min()
    assert worst >= best_worst_task(j, c) - 1e-6, worst  # the best worst task
    # no direction that serves every task as well is nearer to ḡ (d itself reaches the level)
    assert np.linalg.norm(d - g0) <= nearest_reaching(j, worst) + 1e-6


@pytest.mark.parametrize("jacobian", [OPPOSED_SMALL, OPPOSED_LARGE], ids=["small", "large"])
@pytest.mark.parametrize("c", [1.0, 2.0, 10.0])
def test_opposed_gradients_with_c_at_least_one_give_the_zero_direction(jacobian, c):
    # 0 is a convex combination of the gradients, so no direction improves both tasks; d = 0
    # is in the ball (c >= 1) and harms neither, and it is the only such point on the line.
    d = raw(jacobian, c)
    w = CAGrad(c=c, rescale=0, scale_by_k=False).weights(jacobian)
    assert (w > 0).all()
    bound = 4 * EPS64 * (w.abs() * jacobian.norm(dim=1)).sum()  # rounding of Jᵀw
    assert d.abs().item() <= bound
    assert (jacobian @ d).abs().max() <= bound * jacobian.abs().max()


def test_opposed_gradients_with_c_below_one_take_the_end_nearest_zero():
    # J = (a, -b), a < b: ḡ = (a - b)/2 < 0, r = c|ḡ|; on d < 0 the worst task is a·d, so the
    # best point of [ḡ - r, ḡ + r] is ḡ + r = (1 - c)ḡ, the unique maximiser: the closed form.
    for jacobian in (OPPOSED_SMALL, OPPOSED_LARGE):
        g0 = jacobian.mean().item()
        for c in (0.25, 0.5, 0.9):
            w = CAGrad(c=c, rescale=0, scale_by_k=False).weights(jacobian)
            # ḡ is a difference of nearly equal numbers: rounding relative to Σ|w_i||g_i|
            bound = 16 * EPS64 * (w.abs() @ jacobian.abs()).item()
            assert abs(raw(jacobian, c).item() - (1 - c) * g0) <= bound
    assert raw(OPPOSED_SMALL, 0.5).item() == pytest.approx(-1e-4, rel=1e-12)  # (1 - c)ḡ


@pytest.mark.parametrize("c", [0.1, 0.4, 2.0])
def test_mean_gradient_that_harms_no_task_is_kept_when_the_gradients_cancel(c):
    # g_1 = -g_2: nothing improves both, so the best worst-task improvement is 0, reached by
    # every d in the ball with d_1 = 0 and d_2 >= 0; the nearest to ḡ = (0, 1/3, 0) is ḡ.
    d = raw(CANCEL_PLUS_ONE, c)
    torch.testing.assert_close(d, CANCEL_PLUS_ONE.mean(0), rtol=0, atol=4 * EPS64)


@settings(max_examples=examples(40))
@given(matrices(k_max=6, full_rank=True, d_max=10, exponent=6.0), st.floats(0.05, 2.0))
def test_closed_form_and_permutation_on_independent_gradients(jacobian, c):
    # Independent rows: 0 is no convex combination of them, g_w ≠ 0 and d* is the closed form
    # K(ḡ + r g_w/‖g_w‖)/(1 + c²) with w* from the dual solve.
    k = jacobian.shape[0]
    agg = CAGrad(c=c)
    out = agg(jacobian)
    gram = (jacobian @ jacobian.T).numpy()
    w = torch.from_numpy(cagrad_simplex(gram, c))
    g_mean = jacobian.mean(dim=0)
    g_w = w @ jacobian
    radius = c * g_mean.norm()
    expected = k * (g_mean + radius / g_w.norm() * g_w) / (1 + c**2)
    # Tolerance from float64: the Gramian route computes ‖g_w‖² = wᵀMw with an absolute error
    # of about K eps·max_i ‖g_i‖², i.e. a relative error K eps·max_i ‖g_i‖²/‖g_w‖².
    size = k * (g_mean.norm() + radius) / (1 + c**2)
    ratio = (jacobian.norm(dim=1).max() / g_w.norm()) ** 2
    tol = 64 * k * EPS64 * (1 + ratio) * size
    assert (out - expected).norm() <= tol, ((out - expected).norm(), tol)
    assert (agg.transform(jacobian).sum(0) - out).norm() <= tol
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    # a permuted problem takes another solver path: equal to the solver's tolerance (1e-12 on
    # the normalised dual, amplified like the norm above)
    assert (agg(jacobian[perm]) - out).norm() <= 1e-6 * (1 + ratio) * size


def test_float32_gradients_give_the_float64_weights_applied_in_float32():
    torch.manual_seed(0)
    jacobian = torch.randn(4, 50) + 0.2
    agg = CAGrad()
    w = agg.weights(jacobian)
    out = agg(jacobian)
    assert out.dtype == torch.float32 and w.dtype == torch.float32
    expected = agg.weights(jacobian.double()) @ jacobian.double()
    eps32 = torch.finfo(torch.float32).eps
    bound = 8 * jacobian.shape[0] * eps32 * (w.double().abs() @ jacobian.double().abs())
    assert ((out.double() - expected).abs() <= bound).all()


@pytest.mark.parametrize("factor", [1e-9, 1e-4, 1e5])
def test_scale_invariant(factor):
    # positively homogeneous: weights unchanged, direction scaled (up to float64 rounding of
    # the scaled Gramian); the official 1e-8 guards broke this for small gradients
    torch.manual_seed(1)
    jacobian = torch.randn(3, 6, dtype=F64)
    for j in (jacobian, torch.cat([OPPOSED_SMALL, OPPOSED_SMALL.new_tensor([[0.003]])])):
        for c in (0.4, 2.0):
            w, w_scaled = CAGrad(c=c).weights(j), CAGrad(c=c).weights(j * factor)
            torch.testing.assert_close(w_scaled, w, rtol=1e-10, atol=1e-12 * w.abs().max())
            # relative to Σ|w_i||g_i| (the direction itself is 0 for the cancelling matrix)
            bound = 1e-10 * factor * (w.abs() @ j.abs())
            assert ((CAGrad(c=c)(j * factor) - factor * CAGrad(c=c)(j)).abs() <= bound).all()


@settings(max_examples=examples(40))
@given(matrices(k_min=1, k_max=8, d_max=12, exponent=3.0), st.integers(0, 2**16))
def test_cone_projection_matches_the_dual_cone_projection(jacobian, seed):
    # the NumPy projection CAGrad uses against the batched torch one of UPGrad/DualProj
    gram = (jacobian @ jacobian.T).numpy()
    gram = gram / max(gram.diagonal().max(), 1e-300)
    k = gram.shape[0]
    u = np.random.default_rng(seed).dirichlet(np.ones(k))
    v = cone_projection_weights(gram, u)
    ref = dual_cone_weights(torch.from_numpy(u), torch.from_numpy(gram)).numpy()
    assert (v >= u).all()
    mv = gram @ v
    # KKT to rounding: a backward-stable solve on the passive set leaves residuals of a few
    # K eps·max|M|·‖v‖₁ (max|M| = 1 here); measured at most 0.8 of 16 K eps ‖v‖₁
    rounding = 64 * k * EPS64 * np.abs(v).sum()
    assert (mv >= -rounding).all()  # the projection harms no task
    assert (np.abs(mv)[v > u] <= rounding).all()  # complementarity
    diff = v - ref
    assert math.sqrt(max(diff @ gram @ diff, 0.0)) <= 1e-11 * (1 + np.abs(v).sum())  # same Jᵀv


# ------------------------------------------------------------------------- solver and options


def fw_gap(gram: np.ndarray, c: float, w: np.ndarray) -> float:
    """Frank–Wolfe gap of the (unnormalised) dual: 0 exactly at the optimum."""
    r = c * math.sqrt(gram.mean())
    g = gram.mean(axis=1) + r * gram @ w / math.sqrt(w @ gram @ w)
    return float(w @ g - g.min())


@settings(max_examples=examples(40))
@given(matrices(k_min=2, k_max=2, d_max=10, exponent=6.0), st.floats(0.05, 2.0))
def test_dual_solve_against_brute_force_k2(jacobian, c):
    gram = (jacobian @ jacobian.T).numpy()
    w = cagrad_simplex(gram, c)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
    grid = np.linspace(0.0, 1.0, 20001)
    ws = np.stack([grid, 1 - grid], axis=1)  # the objective on the whole grid at once
    quad = np.einsum("ni,ij,nj->n", ws, gram, ws).clip(min=0)
    values = ws @ gram.mean(axis=1) + c * math.sqrt(gram.mean()) * np.sqrt(quad)
    best = values.min()
    assert cagrad_objective(gram, c, ws[7]) == pytest.approx(values[7], rel=1e-12, abs=1e-300)
    scale = np.max(np.diag(gram))
    assert cagrad_objective(gram, c, w) <= best + 1e-9 * scale


@settings(max_examples=examples(40))
@given(matrices(k_max=8, d_max=10, exponent=6.0), st.floats(0.05, 2.0))
def test_dual_solve_kkt_and_slsqp(jacobian, c):
    gram = (jacobian @ jacobian.T).numpy()
    k = gram.shape[0]
    w = cagrad_simplex(gram, c)
    scale = np.max(np.diag(gram))
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
    if w @ gram @ w >= 1e-6 * scale:  # away from the kink at g_w = 0
        assert fw_gap(gram, c, w) <= 1e-7 * scale
    rng = np.random.default_rng(0)  # no feasible neighbour is better
    for _ in range(20):
        other = np.clip(w + 1e-4 * rng.standard_normal(k), 0, None)
        other /= other.sum()
        assert cagrad_objective(gram, c, w) <= cagrad_objective(gram, c, other) + 1e-12 * scale
    # never worse than the official SLSQP from the uniform point
    res = minimize(
        lambda x: cagrad_objective(gram, c, x),
        np.full(k, 1 / k),
        bounds=[(0, 1)] * k,
        constraints={"type": "eq", "fun": lambda x: 1 - x.sum()},
        method="SLSQP",
    )
    slsqp = np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()  # SLSQP's x may leave Δ
    assert cagrad_objective(gram, c, w) <= cagrad_objective(gram, c, slsqp) + 1e-8 * scale


def test_c0_rescale_and_options():
    torch.manual_seed(0)
    j = torch.randn(3, 7, dtype=F64)
    assert torch.equal(CAGrad(c=0.0)(j), CAGrad(c=0.0).weights(j) @ j)
    torch.testing.assert_close(CAGrad(c=0.0)(j), j.sum(0), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(CAGrad(c=0.0, scale_by_k=False)(j), j.mean(0))
    base = CAGrad(c=0.5, rescale=0, scale_by_k=False)(j)
    torch.testing.assert_close(CAGrad(c=0.5, rescale=1, scale_by_k=False)(j), base / 1.25)
    torch.testing.assert_close(CAGrad(c=0.5, rescale=2, scale_by_k=False)(j), base / 1.5)
    torch.testing.assert_close(CAGrad(c=0.5, rescale=0)(j), 3 * base)
    assert torch.equal(CAGrad()(torch.zeros(3, 4)), torch.zeros(4))
    assert torch.isnan(CAGrad().weights(torch.tensor([[math.nan, 1.0], [1.0, 2.0]]))).all()
    assert CAGrad()(j.float()).dtype == torch.float32
    for bad in (dict(c=-1.0), dict(c=math.inf), dict(rescale=3), dict(tol=0.0), dict(max_iter=-1)):
        with pytest.raises(ValueError):
            CAGrad(**bad)
    assert "c=0.4" in repr(CAGrad())
