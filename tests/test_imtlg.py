"""IMTL-G: equal projections, the paper's closed form, invariances, degenerate cases, golden
values.

The decisions tested are in docs/methods/aggregators.md, "IMTL-G".
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import J_GOLDEN, examples
from conftest import matrices as _matrices
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import IMTLG

SETTINGS = settings(max_examples=examples(50))


def matrices(k_min: int = 2, k_max: int = 6, full_rank: bool = False):
    """The shared sampler with this file's ranges: K <= 6, d <= 10, scale 10^±6."""
    return _matrices(k_min, k_max, full_rank, d_max=10, exponent=6.0)


def projections(jacobian: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``d·u_i`` for the direction ``d = αᵀJ``."""
    return jacobian @ (alpha @ jacobian) / jacobian.norm(dim=1)


def assert_equal_projections(jacobian: torch.Tensor, alpha: torch.Tensor) -> None:
    proj = projections(jacobian, alpha)
    scale = (alpha.abs() * jacobian.norm(dim=1)).sum()  # bounds every |d·u_i|
    assert (proj - proj.mean()).abs().max() <= 1e-7 * scale, (proj, alpha)
    assert abs(alpha.sum().item() - 1.0) <= 1e-8 * max(1.0, alpha.abs().sum().item())


def test_imtlg_golden():
    # K = 2: α = (n_2, n_1)/(n_1 + n_2) with n_1 = √18 = 3√2, n_2 = √38 = √2·√19, so
    # α_1 = √19/(3 + √19) ≈ 0.592330, α_2 = 3/(3 + √19) ≈ 0.407670.
    # Spec formula: α_2 = g_1·(u_1-u_2) / ((g_1-g_2)·(u_1-u_2))
    #   = (√18 + 22/√38) / (√18 + 22/√38 + 22/√18 + √38) = (33 + 9√19)/(90 + 20√19), the same.
    # d = α_1 g_1 + α_2 g_2 = ((18 - 4√19)/(3 + √19), 1, 1) ≈ (0.076697, 1, 1) and
    # d·u_1 = (18α_1 - 22α_2)/√18 = (18√19 - 66)/(3√2(3 + √19)) ≈ 0.399094 = d·u_2.
    s19 = math.sqrt(19.0)
    expected = torch.tensor([s19, 3.0], dtype=torch.float64) / (3.0 + s19)
    assert abs((33 + 9 * s19) / (90 + 20 * s19) - expected[1].item()) < 1e-15
    alpha = IMTLG().weights(J_GOLDEN)
    torch.testing.assert_close(alpha, expected, rtol=1e-12, atol=0)
    proj = projections(J_GOLDEN, alpha)
    assert proj[0].item() == pytest.approx(0.399094, abs=1e-6)
    torch.testing.assert_close(proj[0], proj[1], rtol=1e-12, atol=0)
    d = torch.tensor([(18 - 4 * s19) / (3 + s19), 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(IMTLG()(J_GOLDEN), d, rtol=1e-12, atol=1e-14)


def paper_imtlg(jacobian: torch.Tensor) -> torch.Tensor:
    """The paper's closed form with g_1 as the reference (no regulariser)."""
    g = jacobian
    u = g / g.norm(dim=1, keepdim=True)
    d, uu = g[0] - g[1:], u[0] - u[1:]
    rest = torch.linalg.solve((d @ uu.T).T, (g[0] @ uu.T))
    return torch.cat([(1 - rest.sum()).reshape(1), rest])


@SETTINGS
@given(matrices(full_rank=True))
def test_imtlg_matches_the_papers_closed_form(jacobian):
    expected = paper_imtlg(jacobian)
    alpha = IMTLG().weights(jacobian)
    torch.testing.assert_close(alpha, expected, rtol=1e-6, atol=1e-8 * expected.abs().max())


@SETTINGS
@given(matrices(), st.floats(-6, 6))
def test_imtlg_equal_projections_and_scaling(jacobian, log_c):
    alpha = IMTLG().weights(jacobian)
    assert_equal_projections(jacobian, alpha)
    scaled = jacobian * 10.0**log_c
    alpha_scaled = IMTLG().weights(scaled)
    assert_equal_projections(scaled, alpha_scaled)
    # per-row positive scaling: the property still holds on the rescaled rows
    row_scales = torch.linspace(0.5, 3.0, jacobian.shape[0], dtype=torch.float64)[:, None]
    assert_equal_projections(jacobian * row_scales, IMTLG().weights(jacobian * row_scales))


@SETTINGS
@given(matrices(), st.randoms(use_true_random=False))
def test_imtlg_permutation_equivariant(jacobian, rnd):
    perm = list(range(jacobian.shape[0]))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    alpha = IMTLG().weights(jacobian)
    alpha_p = IMTLG().weights(jacobian[perm])
    scale = alpha.abs().max()
    torch.testing.assert_close(alpha_p, alpha[perm], rtol=1e-6, atol=1e-8 * scale)


def test_imtlg_degenerate_cases():
    imtlg = IMTLG()
    assert imtlg.weights(torch.ones(1, 3)).tolist() == [1.0]
    # exactly opposed gradients: equal projections only for d = 0
    j = torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=torch.float64)
    alpha = imtlg.weights(j)
    torch.testing.assert_close(alpha, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert (alpha @ j).abs().max() < 1e-12
    # a zero row gets weight 0, the others are solved among themselves; no NaN
    j = torch.cat([J_GOLDEN[:1], torch.zeros(1, 3, dtype=torch.float64), J_GOLDEN[1:]])
    alpha = imtlg.weights(j)
    assert torch.isfinite(alpha).all() and alpha[1] == 0
    torch.testing.assert_close(alpha[[0, 2]], imtlg.weights(J_GOLDEN))
    torch.testing.assert_close(imtlg.weights(torch.zeros(3, 4)), torch.full((3,), 1 / 3))
    # dtype and NaN propagation
    assert imtlg.weights(J_GOLDEN.float()).dtype == torch.float32
    assert torch.isnan(imtlg.weights(torch.tensor([[math.nan, 1.0], [1.0, 2.0]]))).all()
    with pytest.raises(ValueError):
        IMTLG(rcond=0.0)
