"""Aligned-MTL: golden values, equal singular values at any rank, degenerate matrices."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    F64,
    J_GOLDEN,
    examples,
    matrices,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import AlignedMTL

SETTINGS = settings(max_examples=examples(40))


G1, G2 = J_GOLDEN  # g_1 = (-4, 1, 1), g_2 = (6, 1, 1): ‖g_1‖² = 18, ‖g_2‖² = 38, g_1·g_2 = -22


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
        w = math.sqrt(scale) * torch.tensor([60 + s, 40 + s], dtype=F64) / (s * t)
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
