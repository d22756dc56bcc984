"""UPGrad and DualProj, and the exact dual-cone solver they share: KKT conditions, brute-force
minima, golden values on ``J_GOLDEN``, non-conflict, invariances, preferences.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import (
    F64,
    J_GOLDEN,
    examples,
    matrices,
    t,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import DualProj, PCGrad, UPGrad
from mtl_optim.aggregators._dual_cone import dual_cone_weights, regularized_gramian

SETTINGS = settings(max_examples=examples(40))


G1, G2 = J_GOLDEN  # g_1 = (-4, 1, 1), g_2 = (6, 1, 1): ‖g_1‖² = 18, ‖g_2‖² = 38, g_1·g_2 = -22


# ------------------------------------------------------------------------- dual-cone solver
def assert_kkt(u: torch.Tensor, v: torch.Tensor, gram: torch.Tensor, rtol: float = 1e-9):
    """v ≥ u, μ = Gv ≥ 0 and μ_j = 0 where v_j > u_j, up to the rounding of μ."""
    x = v - u
    assert (x >= 0).all()
    mu = v @ gram
    bound = rtol * ((u.abs() + x.abs()) @ gram.abs())  # the size of μ's rounding error
    assert (mu >= -bound).all(), (mu / bound).min()
    assert (mu.abs() <= bound)[x > 0].all()


def brute_force_objective(u: np.ndarray, gram: np.ndarray) -> float:
    """min_{x ≥ 0} ½xᵀGx + (Gu)ᵀx by enumerating the supports."""
    k, q, best = len(u), gram @ u, 0.0
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            x = np.zeros(k)
            x[idx] = np.linalg.lstsq(gram[np.ix_(idx, idx)], -q[idx], rcond=None)[0]
            if (x >= 0).all():
                best = min(best, 0.5 * x @ gram @ x + q @ x)
    return best


@SETTINGS
@given(jacobian=matrices(k_min=1), seed=st.integers(0, 2**32 - 1), signed=st.booleans())
def test_dual_cone_solver_meets_the_kkt_conditions(jacobian, seed, signed):
    """Gramians of every rank 1..K and scale 1e-16..1e16; a batch of K + 2 right-hand sides."""
    gram = jacobian @ jacobian.T
    k = gram.shape[0]
    u = torch.from_numpy(np.random.default_rng(seed).standard_normal((k + 2, k)))
    u = u if signed else u.abs()
    v = dual_cone_weights(u, gram)
    assert v.shape == u.shape and v.dtype == F64
    assert_kkt(u, v, gram)
    for row in range(k + 2):  # unbatched calls give the same weights
        torch.testing.assert_close(dual_cone_weights(u[row], gram), v[row], rtol=0, atol=0)


@SETTINGS
@given(jacobian=matrices(k_max=5), seed=st.integers(0, 2**32 - 1))
def test_dual_cone_solver_reaches_the_brute_force_minimum(jacobian, seed):
    gram = jacobian @ jacobian.T
    gram = gram / gram.diagonal().sum()  # the objective's scale; v does not change
    u = torch.from_numpy(np.random.default_rng(seed).standard_normal((3, gram.shape[0])))
    for ui, vi in zip(u, dual_cone_weights(u, gram)):
        x = vi - ui
        value = (0.5 * x @ gram @ x + (gram @ ui) @ x).item()
        reference = brute_force_objective(ui.numpy(), gram.numpy())
        assert value <= reference + 1e-10 * (1 + ui.abs().max().item()) ** 2


def test_dual_cone_solver_iterates_are_feasible_and_the_loop_is_bounded():
    rng = np.random.default_rng(0)
    jacobian = torch.from_numpy(rng.standard_normal((12, 3)) @ rng.standard_normal((3, 20)))
    gram, u = jacobian @ jacobian.T, torch.eye(12, dtype=F64)
    assert torch.equal(dual_cone_weights(u, gram, max_iter=0), u)
    for max_iter in (1, 3, 7):
        assert (dual_cone_weights(u, gram, max_iter=max_iter) >= u).all()
    assert_kkt(u, dual_cone_weights(u, gram), gram)
    # no conflict: v = u exactly, whatever the Gramian's scale
    positive = torch.from_numpy(np.abs(rng.standard_normal((4, 6))))
    for scale in (1e-12, 1.0, 1e12):
        assert torch.equal(dual_cone_weights(u[:4, :4], scale * positive @ positive.T), u[:4, :4])


def test_regularized_gramian_normalises_and_thresholds():
    gram = J_GOLDEN @ J_GOLDEN.T  # trace 56
    eye = torch.eye(2, dtype=F64)
    torch.testing.assert_close(regularized_gramian(gram, 1e-4, 0.5), gram / 56 + 0.5 * eye)
    assert torch.equal(regularized_gramian(1e-6 * gram, 1e-4, 0.5), 0.5 * eye)  # trace < norm_eps
    assert torch.equal(regularized_gramian(0 * gram, 0.0, 0.0), 0 * gram)


# ------------------------------------------------------------------------- UPGrad / DualProj
def test_upgrad_golden_values():
    # Exact (norm_eps = reg_eps = 0). Row 1 projects g_1/2: it conflicts with g_2, so
    # v = (1/2, x) with g_2·(g_1/2 + x g_2) = -11 + 38x = 0, x = 11/38; the other multiplier is
    # g_1·(g_1/2 + 11/38 g_2) = 9 - 242/38 > 0. Row 2 likewise: v = (11/18, 1/2). So
    # π(g_1/2) = (-5/19, 15/19, 15/19), π(g_2/2) = (5/9, 10/9, 10/9), w = (10/9, 15/19) and
    # d = (50/171, 325/171, 325/171): half the PCGrad direction (100, 650, 650)/171.
    exact = UPGrad(norm_eps=0.0, reg_eps=0.0)
    torch.testing.assert_close(exact.weights(J_GOLDEN), t(10 / 9, 15 / 19))
    torch.testing.assert_close(exact(J_GOLDEN), t(50, 325, 325) / 171)
    rows = torch.stack([t(-5, 15, 15) / 19, t(5, 10, 10) / 9])
    torch.testing.assert_close(exact.transform(J_GOLDEN), rows)
    torch.testing.assert_close(exact(J_GOLDEN), PCGrad(seed=0)(J_GOLDEN) / 2)
    # TorchJD defaults: G = M/56 + 1e-4 I, so x = (22/56)(1/2) / (38/56 + 1e-4) = 11/(38 + ρ)
    # with ρ = 56e-4, and 11/(18 + ρ) for row 2; TorchJD documents d ≈ (0.2929, 1.9004, 1.9004).
    rho = 56e-4
    w = t(0.5 + 11 / (18 + rho), 0.5 + 11 / (38 + rho))
    torch.testing.assert_close(UPGrad().weights(J_GOLDEN), w)
    torch.testing.assert_close(UPGrad()(J_GOLDEN), w @ J_GOLDEN)
    torch.testing.assert_close(UPGrad()(J_GOLDEN), t(0.2929, 1.9004, 1.9004), atol=1e-4, rtol=0)


def test_dualproj_golden_values():
    # Exact: the mean (1, 1, 1) conflicts with g_1 (g_1·mean = -2), so v = (1/2 + x, 1/2) with
    # g_1·Jᵀv = 18(1/2 + x) - 11 = 0, x = 1/9; the other multiplier g_2·Jᵀv = 19 - 242/18 > 0.
    # w = (11/18, 1/2) and d = 11/18 g_1 + 1/2 g_2 = (5/9, 10/9, 10/9).
    exact = DualProj(norm_eps=0.0, reg_eps=0.0)
    torch.testing.assert_close(exact.weights(J_GOLDEN), t(11 / 18, 1 / 2))
    torch.testing.assert_close(exact(J_GOLDEN), t(5, 10, 10) / 9)
    # TorchJD defaults: v_1 = (11/56) / (18/56 + 1e-4) = 11/(18 + ρ), documented d ≈
    # (0.5563, 1.1109, 1.1109).
    w = t(11 / (18 + 56e-4), 0.5)
    torch.testing.assert_close(DualProj().weights(J_GOLDEN), w)
    torch.testing.assert_close(DualProj()(J_GOLDEN), t(0.5563, 1.1109, 1.1109), atol=1e-4, rtol=0)
    # preference e_1: project g_1 itself, i.e. PCGrad's ĝ_1 = g_1 + 22/38 g_2
    torch.testing.assert_close(
        DualProj([1.0, 0.0], norm_eps=0.0, reg_eps=0.0)(J_GOLDEN), G1 + 22 / 38 * G2
    )


def conflict_bound(jacobian: torch.Tensor, w: torch.Tensor, reg_eps: float) -> torch.Tensor:
    """How negative ``J d`` may be: the ridge's ε‖J‖²_F w_j plus rounding."""
    norms = jacobian.norm(dim=1)
    rounding = 1e-9 * norms * (w.abs() @ norms)
    return reg_eps * jacobian.pow(2).sum() * w.abs() + rounding


@pytest.mark.parametrize("reg_eps", [0.0, 1e-4])
@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@SETTINGS
@given(jacobian=matrices(k_min=1))
def test_dual_cone_methods_conflict_with_no_task(cls, reg_eps, jacobian):
    agg = cls(norm_eps=0.0, reg_eps=reg_eps)
    w = agg.weights(jacobian)
    assert (w >= 0).all()
    out = agg(jacobian)
    torch.testing.assert_close(out, w @ jacobian, rtol=1e-9, atol=0.0)
    assert (jacobian @ out >= -conflict_bound(jacobian, w, reg_eps)).all()
    if cls is UPGrad:  # every projected row conflicts with no task, and they sum to d
        rows = agg.transform(jacobian)
        v = agg.projection_weights(jacobian @ jacobian.T)
        for row, vi in zip(rows, v):
            assert (jacobian @ row >= -conflict_bound(jacobian, vi, reg_eps)).all()
        scale = jacobian.norm(dim=1).max() * w.sum()
        torch.testing.assert_close(rows.sum(0), out, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@SETTINGS
@given(jacobian=matrices(), pref_seed=st.integers(0, 2**32 - 1))
def test_dual_cone_methods_leave_non_conflicting_rows_alone(cls, jacobian, pref_seed):
    jacobian = jacobian.abs()  # all pairwise dot products ≥ 0
    k = jacobian.shape[0]
    pref = np.random.default_rng(pref_seed).uniform(0.0, 2.0, k).tolist()
    assert torch.equal(cls(pref).weights(jacobian), torch.tensor(pref, dtype=F64))
    assert torch.equal(cls().weights(jacobian), torch.full((k,), 1 / k, dtype=F64))


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@SETTINGS
@given(jacobian=matrices(full_rank=True), seed=st.integers(0, 1000), log_c=st.floats(-4, 4))
def test_dual_cone_methods_are_permutation_equivariant_and_scale_invariant(
    cls, jacobian, seed, log_c
):
    """Default ridge: the weights are unique. They ignore J's scale while ‖J‖²_F ≥ norm_eps."""
    agg = cls()
    perm = torch.randperm(len(jacobian), generator=torch.Generator().manual_seed(seed))
    w = agg.weights(jacobian)
    torch.testing.assert_close(agg.weights(jacobian[perm]), w[perm], rtol=1e-7, atol=1e-9)
    scaled = jacobian * 10.0**log_c
    if jacobian.pow(2).sum() >= 1e-4 and scaled.pow(2).sum() >= 1e-4:
        torch.testing.assert_close(agg.weights(scaled), w, rtol=1e-7, atol=1e-9)
    # below the absolute threshold the rows are just combined with the preference
    tiny = jacobian / jacobian.norm() * 1e-3  # ‖J‖²_F = 1e-6 < norm_eps
    k = jacobian.shape[0]
    assert torch.equal(agg.weights(tiny), torch.full((k,), 1 / k, dtype=F64))


@SETTINGS
@given(jacobian=matrices(), seed=st.integers(0, 1000))
def test_exact_dual_cone_directions_are_permutation_invariant_at_any_rank(jacobian, seed):
    """Without the ridge the weights may not be unique, but the projections are."""
    perm = torch.randperm(len(jacobian), generator=torch.Generator().manual_seed(seed))
    for agg in (UPGrad(norm_eps=0.0, reg_eps=0.0), DualProj(norm_eps=0.0, reg_eps=0.0)):
        out = agg(jacobian)
        tol = 1e-7 * jacobian.norm(dim=1).max()
        torch.testing.assert_close(agg(jacobian[perm]), out, rtol=0, atol=tol)


def test_dual_cone_methods_preferences_and_validation():
    jacobian = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    for cls in (UPGrad, DualProj):
        # positively homogeneous in the preference vector
        pref = [0.5, 1.0, 2.0, 0.25]
        torch.testing.assert_close(
            cls([3 * p for p in pref]).weights(jacobian), 3 * cls(pref).weights(jacobian)
        )
        assert cls(torch.tensor(pref)).weights(jacobian).dtype == F64
        assert cls()(jacobian.float()).dtype == torch.float32
        nan = jacobian.clone()
        nan[0, 0] = math.nan
        assert cls().weights(nan).isnan().all()
        with pytest.raises(ValueError, match="4 tasks"):
            cls([1.0, 1.0])(jacobian)
        for bad in ([1.0, -1.0], [[1.0]], [], [math.nan]):
            with pytest.raises(ValueError, match="pref_vector"):
                cls(bad)
        with pytest.raises(TypeError, match="pref_vector"):
            cls("uniform")
        for bad in (dict(norm_eps=-1.0), dict(reg_eps=math.nan), dict(reg_eps=math.inf)):
            with pytest.raises(ValueError):
                cls(**bad)
    assert repr(UPGrad()) == "UPGrad(pref_vector=None, norm_eps=0.0001, reg_eps=0.0001)"
    assert repr(DualProj([1, 2], reg_eps=0)) == (
        "DualProj(pref_vector=[1.0, 2.0], norm_eps=0.0001, reg_eps=0.0)"
    )
