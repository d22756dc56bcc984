"""FairGrad: golden values, its optimality equation, Nash-MTL at alpha = 1, scaling, fallbacks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, J_GOLDEN, examples
from conftest import matrices as _matrices
from helpers import permutation, randn
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import FairGrad, NashMTL

SETTINGS = settings(max_examples=examples(40))


S19 = math.sqrt(19.0)


def matrices(k_min: int = 2, k_max: int = 6, full_rank: bool = False):
    """The shared sampler with this file's ranges: K <= 6, d <= 10, scale 10^±6."""
    return _matrices(k_min, k_max, full_rank, d_max=10, exponent=6.0)


def test_fairgrad_golden_alpha_1():
    # α = 1: 18a - 22b = 1/a and -22a + 38b = 1/b. Multiplying by a and b and subtracting
    # gives 18a² = 38b², a = b√19/3; then b²(38 - 22√19/3) = 1, b = √(3/(114 - 22√19)).
    # scale_by_k (official) doubles them: w = 2(a, b) ≈ (1.182922, 0.814143).
    b = math.sqrt(3 / (114 - 22 * S19))
    a = b * S19 / 3
    w = FairGrad(scale_by_k=False).weights(J_GOLDEN)
    torch.testing.assert_close(w, torch.tensor([a, b], dtype=F64), rtol=1e-10, atol=0)
    torch.testing.assert_close(FairGrad().weights(J_GOLDEN), 2 * w, rtol=0, atol=0)
    torch.testing.assert_close(w, torch.tensor([0.591461, 0.407071], dtype=F64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_orthogonal_rows(alpha):
    # M = diag(n_i²): n_i² w_i = w_i^(-1/α), so w_i = n_i^(-2α/(1+α)).
    q, _ = torch.linalg.qr(randn(1, 8, 3))
    norms = torch.tensor([1e-3, 1.0, 40.0], dtype=F64)
    w = FairGrad(alpha, scale_by_k=False).weights(norms[:, None] * q.T)
    torch.testing.assert_close(w, norms ** (-2 * alpha / (1 + alpha)), rtol=1e-9, atol=0)


@SETTINGS
@given(matrices(full_rank=True), st.floats(0.5, 5.0))
def test_fairgrad_solves_its_optimality_equation(jacobian, alpha):
    assume(torch.linalg.cond(jacobian) < 1e4)
    w = FairGrad(alpha, scale_by_k=False).weights(jacobian)
    assert (w > 0).all()
    # (Mw)_i = w_i^(-1/α), to 1e-6 relative
    relative = w ** (1 / alpha) * (jacobian @ (w @ jacobian)) - 1
    assert relative.abs().max() <= 1e-6


@SETTINGS
@given(matrices(full_rank=True), st.integers(0, 2**16))
def test_fairgrad_alpha_1_is_nash_mtl_and_permutation_equivariant(jacobian, seed):
    assume(torch.linalg.cond(jacobian) < 1e4)
    w = FairGrad(scale_by_k=False).weights(jacobian)
    torch.testing.assert_close(w, NashMTL().weights(jacobian), rtol=1e-8, atol=0)
    perm = permutation(jacobian.shape[0], seed)
    torch.testing.assert_close(
        FairGrad(2.0).weights(jacobian[perm]),
        FairGrad(2.0).weights(jacobian)[perm],
        rtol=1e-8,
        atol=0,
    )


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_fairgrad_scaling(alpha):
    # M → cM maps w → c^(-α/(1+α)) w
    jacobian = randn(2, 4, 9)
    w = FairGrad(alpha).weights(jacobian)
    for c in (1e-8, 1e-2, 30.0, 1e8):
        expected = w * c ** (-alpha / (1 + alpha))
        torch.testing.assert_close(FairGrad(alpha).weights(math.sqrt(c) * jacobian), expected)


def test_fairgrad_fallbacks_and_state():
    # exactly opposed rows: no solution, the previous weights (ones at first) are kept
    opposed = torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=F64)
    fairgrad = FairGrad(scale_by_k=False)
    assert torch.equal(fairgrad.weights(opposed), torch.ones(2, dtype=F64))
    solved = fairgrad.weights(J_GOLDEN)
    assert torch.equal(fairgrad.weights(opposed), solved)
    # a zero row keeps its previous weight; the other rows are solved among themselves
    with_zero = torch.cat([J_GOLDEN[:1], torch.zeros(1, 3, dtype=F64), J_GOLDEN[1:]])
    w = FairGrad(scale_by_k=False).weights(with_zero)
    assert w[1] == 1.0
    torch.testing.assert_close(w[[0, 2]], solved)
    nan = FairGrad().weights(torch.tensor([[math.nan, 1.0], [1.0, 2.0]]))
    assert torch.equal(nan, torch.full((2,), 2.0))  # ones, times K
    # the number of tasks is fixed by the first call
    with pytest.raises(ValueError, match="2 tasks"):
        fairgrad.weights(randn(0, 3, 4))


def test_fairgrad_warm_start_and_syncless_mode():
    jacobian = randn(3, 4, 10)
    cold = FairGrad().weights(jacobian)
    warm = FairGrad()
    warm.weights(jacobian + 0.1 * randn(4, 4, 10))
    torch.testing.assert_close(warm.weights(jacobian), cold, rtol=1e-10, atol=0)
    no_sync = FairGrad(check_every=None, max_iter=30).weights(jacobian)
    torch.testing.assert_close(no_sync, cold, rtol=1e-10, atol=0)


def test_fairgrad_validation_and_repr():
    for bad in (
        dict(alpha=0.0),
        dict(alpha=math.inf),
        dict(max_iter=0),
        dict(tol=0.0),
        dict(max_norm=-1.0),
        dict(check_every=0),
    ):
        with pytest.raises(ValueError):
            FairGrad(**bad)
    assert FairGrad(max_norm=None).max_norm is None
    assert repr(FairGrad()).startswith("FairGrad(alpha=1.0, scale_by_k=True, max_norm=1.0,")
    with pytest.raises(ValueError, match="key 'w'"):
        FairGrad().load_state_dict({})
