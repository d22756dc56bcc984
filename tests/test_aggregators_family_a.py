"""GradVac, GradDrop, AlignedMTL, UPGrad, DualProj and the shared dual-cone solver.

Golden values on ``J_GOLDEN`` (hand-derived in the comments), the methods' guarantees on the
shared matrix sampler, state round trips and a short training run per aggregator.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import (
    J_GOLDEN,
    TwoTask,
    batches,
    clone,
    examples,
    make_model,
    matrices,
    train_two_task,
    two_task_data,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mtl_optim
from mtl_optim.aggregators._aligned_mtl import AlignedMTL
from mtl_optim.aggregators._dual_cone import dual_cone_weights, regularized_gramian
from mtl_optim.aggregators._dualproj import DualProj
from mtl_optim.aggregators._graddrop import GradDrop
from mtl_optim.aggregators._gradvac import GradVac
from mtl_optim.aggregators._pcgrad import PCGrad
from mtl_optim.aggregators._upgrad import UPGrad

SETTINGS = settings(max_examples=examples(40))
F64 = torch.float64
G1, G2 = J_GOLDEN  # g_1 = (-4, 1, 1), g_2 = (6, 1, 1): ‖g_1‖² = 18, ‖g_2‖² = 38, g_1·g_2 = -22


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


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
    torch.testing.assert_close(exact.weights(J_GOLDEN), vec(10 / 9, 15 / 19))
    torch.testing.assert_close(exact(J_GOLDEN), vec(50, 325, 325) / 171)
    rows = torch.stack([vec(-5, 15, 15) / 19, vec(5, 10, 10) / 9])
    torch.testing.assert_close(exact.transform(J_GOLDEN), rows)
    torch.testing.assert_close(exact(J_GOLDEN), PCGrad(seed=0)(J_GOLDEN) / 2)
    # TorchJD defaults: G = M/56 + 1e-4 I, so x = (22/56)(1/2) / (38/56 + 1e-4) = 11/(38 + ρ)
    # with ρ = 56e-4, and 11/(18 + ρ) for row 2; TorchJD documents d ≈ (0.2929, 1.9004, 1.9004).
    rho = 56e-4
    w = vec(0.5 + 11 / (18 + rho), 0.5 + 11 / (38 + rho))
    torch.testing.assert_close(UPGrad().weights(J_GOLDEN), w)
    torch.testing.assert_close(UPGrad()(J_GOLDEN), w @ J_GOLDEN)
    torch.testing.assert_close(UPGrad()(J_GOLDEN), vec(0.2929, 1.9004, 1.9004), atol=1e-4, rtol=0)


def test_dualproj_golden_values():
    # Exact: the mean (1, 1, 1) conflicts with g_1 (g_1·mean = -2), so v = (1/2 + x, 1/2) with
    # g_1·Jᵀv = 18(1/2 + x) - 11 = 0, x = 1/9; the other multiplier g_2·Jᵀv = 19 - 242/18 > 0.
    # w = (11/18, 1/2) and d = 11/18 g_1 + 1/2 g_2 = (5/9, 10/9, 10/9).
    exact = DualProj(norm_eps=0.0, reg_eps=0.0)
    torch.testing.assert_close(exact.weights(J_GOLDEN), vec(11 / 18, 1 / 2))
    torch.testing.assert_close(exact(J_GOLDEN), vec(5, 10, 10) / 9)
    # TorchJD defaults: v_1 = (11/56) / (18/56 + 1e-4) = 11/(18 + ρ), documented d ≈
    # (0.5563, 1.1109, 1.1109).
    w = vec(11 / (18 + 56e-4), 0.5)
    torch.testing.assert_close(DualProj().weights(J_GOLDEN), w)
    torch.testing.assert_close(DualProj()(J_GOLDEN), vec(0.5563, 1.1109, 1.1109), atol=1e-4, rtol=0)
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


# ------------------------------------------------------------------------------- AlignedMTL
def test_aligned_mtl_golden_values():
    # M = [[18, -22], [-22, 38]]: trace 56, det 200, so λ = 28 ± 2√146 and, with s = √det =
    # 10√2 and t = √(tr + 2s), M^{1/2} = (M + sI)/t and M^{-1/2} = [[38+s, 22], [22, 18+s]]/(st).
    # "min": B = √λ_min M^{-1/2}, w = B1 = √λ_min (60 + s, 40 + s)/(st). K = 2: the lower
    # median is λ_min too. "rmse": √mean(λ) = √28 in place of √λ_min.
    s = 10 * math.sqrt(2)
    t = math.sqrt(56 + 2 * s)
    lam_min = 28 - 2 * math.sqrt(146)
    inv_sqrt = torch.tensor([[38 + s, 22], [22, 18 + s]], dtype=F64) / (s * t)
    for mode, scale in (("min", lam_min), ("median", lam_min), ("rmse", 28.0)):
        agg = AlignedMTL(mode)
        torch.testing.assert_close(agg.balance(J_GOLDEN @ J_GOLDEN.T), math.sqrt(scale) * inv_sqrt)
        w = math.sqrt(scale) * vec(60 + s, 40 + s) / (s * t)
        torch.testing.assert_close(agg.weights(J_GOLDEN), w)
        torch.testing.assert_close(agg(J_GOLDEN), w @ J_GOLDEN)
        aligned = agg.transform(J_GOLDEN)  # orthogonal rows of norm √scale
        torch.testing.assert_close(aligned @ aligned.T, scale * torch.eye(2, dtype=F64))
        torch.testing.assert_close(aligned.sum(0), agg(J_GOLDEN))


@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
@SETTINGS
@given(jacobian=matrices(k_min=1), log_c=st.floats(-3, 3), seed=st.integers(0, 1000))
def test_aligned_mtl_equalises_the_singular_values_at_any_rank(mode, jacobian, log_c, seed):
    lam = torch.linalg.eigvalsh(jacobian @ jacobian.T)
    k = len(lam)
    tol = k * lam[-1] * torch.finfo(torch.float32).eps
    kept = lam[lam > tol]
    # skip the rare draws with an eigenvalue within 100x of the cut-off (rounding decides)
    assume(((lam > 100 * tol) | (lam < tol / 100)).all())
    expected = {
        "min": kept.min(),
        "median": kept.sort().values[(len(kept) - 1) // 2],
        "rmse": kept.mean(),
    }[mode]
    agg = AlignedMTL(mode)
    aligned = agg.transform(jacobian)
    sv = torch.linalg.svdvals(aligned)
    torch.testing.assert_close(
        sv[: len(kept)], expected.sqrt().expand(len(kept)), rtol=1e-5, atol=0
    )
    assert (sv[len(kept) :] <= 1e-5 * expected.sqrt()).all()
    out = agg(jacobian)
    scale = jacobian.norm(dim=1).max() * agg.weights(jacobian).abs().sum()
    torch.testing.assert_close(aligned.sum(0), out, rtol=0, atol=1e-9 * scale)
    # the weights ignore J's scale, and follow a permutation of the tasks
    torch.testing.assert_close(agg.weights(jacobian * 10**log_c), agg.weights(jacobian))
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(agg.weights(jacobian[perm]), agg.weights(jacobian)[perm])


def test_aligned_mtl_on_rank_deficient_and_degenerate_matrices():
    # g_3 = g_1 + g_2 and g_4 = 2 g_1: rank 2, two eigenvalues dropped
    jacobian = torch.stack([G1, G2, G1 + G2, 2 * G1])
    for mode in ("min", "median", "rmse"):
        agg = AlignedMTL(mode)
        w = agg.weights(jacobian)
        assert torch.isfinite(w).all()
        sv = torch.linalg.svdvals(agg.transform(jacobian))
        torch.testing.assert_close(sv[0], sv[1])
        assert sv[2:].max() <= 1e-6 * sv[0]
    # the scale modes differ only by a factor: rmse/min = √(mean λ / min λ)
    lam = torch.linalg.eigvalsh(jacobian @ jacobian.T)[2:]
    ratio = (lam.mean() / lam.min()).sqrt()
    torch.testing.assert_close(
        AlignedMTL("rmse").weights(jacobian), ratio * AlignedMTL().weights(jacobian)
    )
    zero = torch.zeros(3, 4, dtype=F64)  # nothing to align: B = I
    assert torch.equal(AlignedMTL().weights(zero), torch.ones(3, dtype=F64))
    assert torch.equal(AlignedMTL()(zero), torch.zeros(4, dtype=F64))
    nan = J_GOLDEN.clone()
    nan[1, 2] = math.nan
    assert AlignedMTL().weights(nan).isnan().all()
    assert AlignedMTL()(J_GOLDEN.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTL("max")
    with pytest.raises(ValueError, match="rtol"):
        AlignedMTL(rtol=0.0)
    assert repr(AlignedMTL("rmse", rtol=1e-6)) == "AlignedMTL(scale_mode='rmse', rtol=1e-06)"


# ---------------------------------------------------------------------------------- GradVac
def test_gradvac_golden_values():
    # Call 1: every target is 0, so GradVac is PCGrad: d = (100, 650, 650)/171 (see the PCGrad
    # golden test), and both targets move to β·cos = c/2 with c = -22/√684 = -11/(3√19).
    gradvac = GradVac(seed=0)
    torch.testing.assert_close(gradvac(J_GOLDEN), vec(100, 650, 650) / 171)
    c = -11 / (3 * math.sqrt(19))
    target = c / 2
    torch.testing.assert_close(gradvac.targets, torch.tensor([[0, target], [target, 0]]).double())
    # Call 2: c < c/2, so ĝ_1 = g_1 + a_12 g_2 with
    # a_12 = ‖g_1‖ (φ̂√(1-c²) - c√(1-φ̂²)) / (‖g_2‖ √(1-φ̂²)), 1-c² = 50/171, 1-φ̂² = 563/684;
    # a_21 is the same with the norms swapped. The targets then move to (c/2 + c)/2 = 3c/4.
    bracket = target * math.sqrt(50 / 171) - c * math.sqrt(563 / 684)
    a12 = math.sqrt(18) * bracket / (math.sqrt(38) * math.sqrt(563 / 684))
    a21 = math.sqrt(38) * bracket / (math.sqrt(18) * math.sqrt(563 / 684))
    rows = torch.stack([G1 + a12 * G2, G2 + a21 * G1])
    torch.testing.assert_close(gradvac.transform(J_GOLDEN), rows)
    torch.testing.assert_close(gradvac.targets[0, 1], torch.tensor(0.75 * c, dtype=F64))
    # the correction lands exactly on the target cosine
    cos = torch.nn.functional.cosine_similarity(rows[0], G2, dim=0)
    torch.testing.assert_close(cos, torch.tensor(target, dtype=F64))


@SETTINGS
@given(jacobian=matrices(k_max=6), seed=st.integers(0, 2**31))
def test_gradvac_starts_as_pcgrad_and_stays_pcgrad_with_beta_zero(jacobian, seed):
    """Same seed, same visiting orders: with all targets 0 the correction is PCGrad's."""
    tol = 1e-9 * jacobian.norm(dim=1).max() * len(jacobian)
    pcgrad, gradvac, frozen = PCGrad(seed=seed), GradVac(seed=seed), GradVac(0.0, seed=seed)
    first = pcgrad.transform(jacobian)
    torch.testing.assert_close(gradvac.transform(jacobian), first, rtol=0, atol=tol)
    torch.testing.assert_close(frozen.transform(jacobian), first, rtol=0, atol=tol)
    torch.testing.assert_close(
        frozen.transform(jacobian), pcgrad.transform(jacobian), rtol=0, atol=tol
    )
    assert torch.equal(frozen.targets, torch.zeros_like(frozen.targets))


@SETTINGS
@given(
    jacobian=matrices(k_max=6, full_rank=True), seed=st.integers(0, 2**31), log_c=st.floats(-6, 6)
)
def test_gradvac_weights_ignore_the_scale_of_j(jacobian, seed, log_c):
    """Full rank: no ĝ_i cancels to rounding noise, whose direction would be arbitrary."""
    a, b = GradVac(seed=seed), GradVac(seed=seed)
    for _ in range(3):  # the targets evolve identically
        wa, wb = a.weights(jacobian), b.weights(jacobian * 10**log_c)
        torch.testing.assert_close(wb, wa, rtol=1e-6, atol=1e-6 * wa.abs().max())
    torch.testing.assert_close(a.targets, b.targets, rtol=0, atol=1e-7)


def test_gradvac_state_round_trip_is_bit_identical():
    gen = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(4, 7, generator=gen, dtype=F64) for _ in range(8)]
    first = GradVac(seed=3)
    for j in jacobians[:3]:
        first(j)
    state = first.state_dict()
    resumed = GradVac(seed=11)
    resumed.load_state_dict(state)
    for j in jacobians[3:]:
        assert torch.equal(first(j), resumed(j))
        assert torch.equal(first.transform(j), resumed.transform(j))
    assert torch.equal(first.targets, resumed.targets)
    # the checkpoint is a copy, untouched by later calls
    assert not torch.equal(state["targets"], first.targets)
    fresh = GradVac(seed=3)
    fresh.load_state_dict(GradVac(seed=3).state_dict())  # before any call: no targets yet
    assert fresh.targets is None and torch.equal(fresh(jacobians[0]), GradVac(seed=3)(jacobians[0]))
    with pytest.raises(ValueError, match="targets"):
        fresh.load_state_dict({"generator": state["generator"]})
    with pytest.raises(ValueError, match="generator"):
        fresh.load_state_dict({"targets": None})


def test_gradvac_edge_cases_and_validation():
    # a zero row is never corrected and corrects nothing
    jacobian = torch.cat([torch.zeros(1, 3, dtype=F64), J_GOLDEN])
    gradvac = GradVac(seed=0)
    for _ in range(3):
        rows = gradvac.transform(jacobian)
        assert torch.isfinite(rows).all() and torch.equal(rows[0], torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="3 tasks"):
        gradvac(J_GOLDEN)
    single = J_GOLDEN[:1]
    assert torch.equal(GradVac(seed=0)(single), single[0])
    nan = J_GOLDEN.clone()
    nan[0, 1] = math.nan
    gradvac = GradVac(seed=0)
    gradvac(J_GOLDEN)
    targets = gradvac.targets.clone()
    assert gradvac.weights(nan).isnan().all()
    assert torch.equal(gradvac.targets, targets)  # not poisoned
    assert GradVac(seed=0)(J_GOLDEN.float()).dtype == torch.float32
    for bad in (dict(beta=-0.1), dict(beta=1.5), dict(eps=0.0)):
        with pytest.raises(ValueError):
            GradVac(**bad)
    with pytest.raises(TypeError):
        GradVac(seed=1.0)
    assert repr(GradVac(0.25, seed=2)) == "GradVac(beta=0.25, eps=1e-08, seed=2)"


# --------------------------------------------------------------------------------- GradDrop
def test_graddrop_golden_values():
    # Column 1: P = ½(1 + (-4 + 6)/(4 + 6)) = 0.6, so the positive 6 survives when U < 0.6 and
    # the negative -4 otherwise; columns 2-3 are all positive (P = 1) and keep 1 + 1 = 2.
    graddrop = GradDrop(seed=0)
    outputs = [tuple(graddrop(J_GOLDEN).tolist()) for _ in range(2000)]
    assert set(outputs) == {(6.0, 2.0, 2.0), (-4.0, 2.0, 2.0)}
    share = outputs.count((6.0, 2.0, 2.0)) / len(outputs)
    assert abs(share - 0.6) < 0.05  # 4.5 standard deviations of the binomial share
    # leak ½: the dropped entry counts half, giving 6 - 2 or -4 + 3; leak 1 is the plain sum
    half = {tuple(GradDrop(0.5, seed=s)(J_GOLDEN).tolist()) for s in range(40)}
    assert half == {(4.0, 2.0, 2.0), (-1.0, 2.0, 2.0)}
    assert torch.equal(GradDrop(1.0, seed=0)(J_GOLDEN), J_GOLDEN.sum(0))
    # per-task leak: task 1 never dropped, so the column is -4 + 6 or -4
    mixed = {tuple(GradDrop([1.0, 0.0], seed=s)(J_GOLDEN).tolist()) for s in range(40)}
    assert mixed == {(2.0, 2.0, 2.0), (-4.0, 2.0, 2.0)}


@SETTINGS
@given(jacobian=matrices(k_min=1), signs=st.integers(0, 2**12 - 1), seed=st.integers(0, 2**31))
def test_graddrop_keeps_columns_without_sign_conflict(jacobian, signs, seed):
    """Purity 1 (all ≥ 0) or 0 (all ≤ 0): every entry survives, whatever the draw."""
    d = jacobian.shape[1]
    column_signs = torch.tensor([1.0 if signs >> c & 1 else -1.0 for c in range(d)], dtype=F64)
    agreeing = jacobian.abs() * column_signs
    graddrop = GradDrop(seed=seed)
    assert torch.equal(graddrop.transform(agreeing), agreeing)
    assert torch.equal(graddrop(agreeing), agreeing.sum(0))


@SETTINGS
@given(jacobian=matrices(k_min=1), seed=st.integers(0, 2**31), power=st.integers(-30, 30))
def test_graddrop_keeps_one_sign_per_column(jacobian, seed, power):
    rows = GradDrop(seed=seed).transform(jacobian)
    kept = rows != 0
    positive, negative = (kept & (jacobian > 0)).any(0), (kept & (jacobian < 0)).any(0)
    assert not (positive & negative).any()
    # a column keeps all of its entries of the surviving sign
    survivors = torch.where(positive, jacobian > 0, jacobian < 0)
    assert torch.equal(rows, torch.where(survivors, jacobian, 0.0))
    # scaling by a power of two is exact: the same draws give the scaled result
    scaled = GradDrop(seed=seed).transform(jacobian * 2.0**power)
    assert torch.equal(scaled, rows * 2.0**power)


def test_graddrop_seeding_state_and_validation():
    jacobian = torch.randn(3, 50, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(GradDrop(seed=5)(jacobian), GradDrop(seed=5)(jacobian))
    assert not torch.equal(GradDrop(seed=5)(jacobian), GradDrop(seed=6)(jacobian))
    first = GradDrop(seed=5)
    first(jacobian)
    resumed = GradDrop(seed=9)
    resumed.load_state_dict(first.state_dict())
    for _ in range(3):
        assert torch.equal(first.transform(jacobian), resumed.transform(jacobian))
    assert GradDrop(seed=0)(jacobian.float()).dtype == torch.float32
    assert GradDrop(seed=0)(jacobian.to(torch.bfloat16)).dtype == torch.bfloat16
    zero = torch.zeros(2, 4, dtype=F64)  # purity ½ on zero columns: no NaN
    assert torch.equal(GradDrop(seed=0)(zero), torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="2 entries"):
        GradDrop([0.0, 1.0], seed=0)(jacobian)
    for bad in (-0.1, 1.5, [], [0.5, 2.0], math.nan, True):
        with pytest.raises(ValueError, match="leak"):
            GradDrop(bad)
    assert repr(GradDrop(seed=1)) == "GradDrop(leak=0.0, seed=1)"
    assert repr(GradDrop([0, 0.5])) == "GradDrop(leak=(0.0, 0.5), seed=None)"


# ---------------------------------------------------------------------------------- training
AGGREGATORS = {  # fresh instances per test: GradVac and GradDrop carry state
    "GradVac": lambda: GradVac(seed=0),
    "GradDrop": lambda: GradDrop(seed=0),
    "AlignedMTL": AlignedMTL,
    "AlignedMTL-rmse": lambda: AlignedMTL("rmse"),
    "UPGrad": UPGrad,
    "DualProj": DualProj,
}


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_training_decreases_both_losses(name):
    def make_opt(model):
        return mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=AGGREGATORS[name]()
        )

    _, start, end = train_two_task(make_opt, nonlinear=False, steps=100)
    assert all(e < 0.1 * s for s, e in zip(start, end)), (start, end)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_adatask_with_the_per_task_rows_decreases_both_losses(name):
    """AdaTask feeds row i of ``transform(J)`` to task i's own Adam moments."""

    def make_opt(model):
        return mtl_optim.AdaTask(model.parameters(), lr=0.02, aggregator=AGGREGATORS[name]())

    _, start, end = train_two_task(make_opt, nonlinear=False, steps=100)
    assert all(e < 0.1 * s for s, e in zip(start, end)), (start, end)


@pytest.mark.parametrize("make", [UPGrad, DualProj, AlignedMTL, lambda: GradVac(seed=0)])
def test_gramian_route_gives_the_jacobian_route_gradients(make):
    k = 3
    model = make_model(k)
    twin = clone(model)
    opts = [
        mtl_optim.MTLOptimizer(
            m.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=make(), route=route
        )
        for m, route in ((model, "jacobian"), (twin, "gramian"))
    ]
    for x, ys in batches(k, 4):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            opt.backward(m.losses(x, ys))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(opts[1].last_weights, opts[0].last_weights)
        for opt in opts:
            opt.step()


def test_graddrop_on_representation_gradients_decreases_both_losses():
    """GradDrop's home: gradients at the shared representation z (``features=z``)."""
    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    x, ys = two_task_data(nonlinear=True)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.Adam, lr=0.01, aggregator=GradDrop(seed=0)
    )

    def losses(z):
        return [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, ys)]

    start = [v.item() for v in losses(torch.tanh(model.trunk(x)))]
    for _ in range(300):
        opt.zero_grad()
        z = torch.tanh(model.trunk(x))
        opt.backward(losses(z), features=z)
        opt.step()
    end = [v.item() for v in losses(torch.tanh(model.trunk(x)))]
    assert all(e < 0.5 * s for s, e in zip(start, end)), (start, end)
