"""MoCo: golden first steps, LibMTL's variant, convergence to MGDA, transform, validation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, J_GOLDEN, examples
from conftest import matrices as _matrices
from helpers import permutation, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import MGDA, MoCo

SETTINGS = settings(max_examples=examples(40))


def matrices(k_min: int = 2, k_max: int = 6, full_rank: bool = False):
    """The shared sampler with this file's ranges: K <= 6, d <= 10, scale 10^±6."""
    return _matrices(k_min, k_max, full_rank, d_max=10, exponent=6.0)


def test_moco_golden_first_two_steps():
    moco = MoCo()
    # t = 1: β_1 = 0.5, y_1 = 0 - 0.5(0 - J) = J/2, Y Yᵀ = M/4 = [[4.5, -5.5], [-5.5, 9.5]].
    # λ_0 = (1/2, 1/2): YYᵀλ_0 = (-0.5, 2), λ_0 - 0.1·(-0.5, 2) = (0.55, 0.3); the projection
    # adds (1 - 0.85)/2 = 0.075 to both: λ_1 = (0.625, 0.375), and
    # d_1 = (0.625 g_1 + 0.375 g_2)/2 = (-0.25, 1, 1)/2.
    d1 = moco(J_GOLDEN)
    torch.testing.assert_close(d1, torch.tensor([-0.125, 0.5, 0.5], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(moco.state_dict()["lambda"], torch.tensor([0.625, 0.375], dtype=F64))
    # t = 2 on the same J: β_2 = 0.5/√2, y_2 = J/2 + β_2 J/2 = c J with c = (1 + β_2)/2;
    # γ_2 = 0.1/√2 and YYᵀλ_1 = c² M λ_1 = c² (3, 0.5); the projection shifts both by half the
    # missing mass.
    c = (1 + 0.5 / math.sqrt(2)) / 2
    step = 0.1 / math.sqrt(2) * c * c * torch.tensor([3.0, 0.5], dtype=F64)
    lam = torch.tensor([0.625, 0.375], dtype=F64) - step
    lam = lam + (1 - lam.sum()) / 2
    rows = moco.transform(J_GOLDEN)
    torch.testing.assert_close(moco.state_dict()["lambda"], lam, rtol=1e-14, atol=0)
    torch.testing.assert_close(rows, c * lam[:, None] * J_GOLDEN, rtol=1e-14, atol=1e-15)


def test_moco_libmtl_variant_golden():
    # LibMTL: h_i = L_i g_i/(‖g_i‖ + 1e-8) and a softmax. With L = (3√2, √2√19) = (‖g_1‖,
    # ‖g_2‖), h ≈ J (to 1e-8 relative), so λ_1 = softmax((0.55, 0.3)) = (σ(0.25), σ(-0.25)).
    moco = MoCo(normalization="loss", lambda_update="softmax")
    assert moco.needs_losses
    with pytest.raises(ValueError, match="loss values"):
        moco(J_GOLDEN)
    moco.set_losses(J_GOLDEN.norm(dim=1))
    sig = 1 / (1 + math.exp(-0.25))
    expected = 0.5 * (sig * J_GOLDEN[0] + (1 - sig) * J_GOLDEN[1])
    torch.testing.assert_close(moco(J_GOLDEN), expected, rtol=1e-8, atol=0)
    # "l2": unit rows, so the result is invariant to the rows' scales
    scaled = J_GOLDEN * torch.tensor([[1e2], [1e4]], dtype=F64)  # ‖g‖ ≫ 1e-8
    torch.testing.assert_close(
        MoCo(normalization="l2")(scaled),
        MoCo(normalization="l2")(J_GOLDEN / J_GOLDEN.norm(dim=1, keepdim=True)),
    )


@pytest.mark.parametrize("rho", [0.0, 2.0])
def test_moco_with_exact_tracking_converges_to_mgda(rho):
    # β = 1, no decay: y_t = J, and the λ update is projected gradient descent on
    # ½λᵀ(M + ρI)λ over the simplex, whose minimiser is MGDA's weights for the Gramian M + ρI,
    # i.e. for the rows of [J, √ρ I].
    jacobian = randn(5, 3, 6)
    gram = jacobian @ jacobian.T + rho * torch.eye(3, dtype=F64)
    gamma = 1.0 / torch.linalg.eigvalsh(gram)[-1].item()
    moco = MoCo(beta=1.0, beta_sigma=0.0, gamma=gamma, gamma_sigma=0.0, rho=rho)
    for _ in range(3000):
        out = moco(jacobian)
    augmented = torch.cat([jacobian, math.sqrt(rho) * torch.eye(3, dtype=F64)], dim=1)
    mgda = MGDA().weights(augmented)
    torch.testing.assert_close(moco.state_dict()["lambda"], mgda, rtol=0, atol=1e-9)
    torch.testing.assert_close(out, mgda @ jacobian, rtol=0, atol=1e-9)


@SETTINGS
@given(matrices(), st.integers(0, 2**16))
def test_moco_transform_sums_to_forward_and_is_permutation_equivariant(jacobian, seed):
    k = jacobian.shape[0]
    perm = permutation(k, seed)
    a, b, c = MoCo(), MoCo(), MoCo()
    scale = jacobian.norm(dim=1).max()
    for _ in range(3):
        rows = a.transform(jacobian)
        rows_p = b.transform(jacobian[perm])
        out = c(jacobian)
        torch.testing.assert_close(rows_p, rows[perm], rtol=1e-9, atol=1e-12 * scale)
        torch.testing.assert_close(rows.sum(0), out, rtol=0, atol=0)
        lam = c.state_dict()["lambda"]
        assert (lam >= 0).all() and abs(lam.sum().item() - 1) < 1e-12


def test_moco_validation_and_shapes():
    for bad in (
        dict(beta=0.0),
        dict(beta=1.5),
        dict(gamma=0.0),
        dict(beta_sigma=-1.0),
        dict(rho=math.nan),
        dict(normalization="loss+"),
        dict(lambda_update="exp"),
    ):
        with pytest.raises(ValueError):
            MoCo(**bad)
    moco = MoCo()
    moco(J_GOLDEN)
    with pytest.raises(ValueError, match="shape"):
        moco(J_GOLDEN[:, :2])
    assert moco(J_GOLDEN.float()).dtype == torch.float32
    assert "lambda_update='projection'" in repr(moco)
    with pytest.raises(ValueError, match="keys"):
        moco.load_state_dict({"y": None})
