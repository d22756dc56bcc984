"""SDMGrad: golden values, its inner loop, warm start, and the shared simplex projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import F64, J_GOLDEN, examples
from conftest import matrices as _matrices
from helpers import permutation, randn
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import SDMGrad
from mtl_optim.aggregators._simplex import project_to_simplex, simplex_projection

SETTINGS = settings(max_examples=examples(40))


def matrices(k_min: int = 2, k_max: int = 6, full_rank: bool = False):
    """The shared sampler with this file's ranges: K <= 6, d <= 10, scale 10^±6."""
    return _matrices(k_min, k_max, full_rank, d_max=10, exponent=6.0)


def test_sdmgrad_golden():
    # s = mean(√(18 + 1e-4), √(38 + 1e-4)) ≈ 5.2035, M̂ = M/s², and at w_0 = (1/2, 1/2) the
    # inner gradient is M̂w_0 + λM̂1/2 = 1.3·(-4, 16)/2/s² ≈ (-0.096, 0.384): the step of 10
    # overshoots, (1.46, -3.34) projects to the vertex e_1. From a vertex the (momentum) step
    # always overshoots back, so the iterates alternate e_1, e_2, e_1, ... and the official
    # niter = 20 ends at e_2. The row weights are (w + λ/K)·K/(1 + λ).
    lam = 0.3
    first = SDMGrad(niter=1)
    torch.testing.assert_close(
        first.weights(J_GOLDEN), torch.tensor([1.15, 0.15], dtype=F64) * 2 / 1.3
    )
    assert torch.equal(first.state_dict()["w"], torch.tensor([1.0, 0.0], dtype=F64))
    for niter in (2, 3, 4):
        w = SDMGrad(niter=niter)
        w.weights(J_GOLDEN)
        assert torch.equal(w.state_dict()["w"], torch.eye(2, dtype=F64)[(niter + 1) % 2])
    sdm = SDMGrad()
    expected = torch.tensor([lam / 2, 1 + lam / 2], dtype=F64) * 2 / (1 + lam)
    torch.testing.assert_close(sdm.weights(J_GOLDEN), expected, rtol=1e-15, atol=0)
    # d = K(g_2 + λḡ)/(1 + λ) = 2((6, 1, 1) + 0.3(1, 1, 1))/1.3
    torch.testing.assert_close(
        SDMGrad()(J_GOLDEN), torch.tensor([6.3, 1.3, 1.3], dtype=F64) * 2 / 1.3
    )


@SETTINGS
@given(matrices(k_min=2, k_max=2), st.floats(0.0, 2.0))
def test_sdmgrad_inner_loop_minimises_its_objective(jacobian, lam):
    # K = 2, w = (t, 1 - t): the objective ½‖g_2 + λḡ + t(g_1 - g_2)‖²/s² has curvature
    # κ = ‖g_1 - g_2‖²/s² and its minimiser over [0, 1] is the clipped
    # t* = -(g_2 + λḡ)·(g_1 - g_2)/‖g_1 - g_2‖². A projected step w - η∇ moves t by -η f'(t)/2,
    # so with η = 1/κ and no momentum every step halves t - t*: 200 steps reach it.
    g1, g2 = jacobian
    diff = g1 - g2
    assume(diff.norm() > 1e-2 * jacobian.norm())
    s2 = torch.sqrt(jacobian.square().sum(1) + 1e-4).mean() ** 2
    kappa = (diff.square().sum() / s2).item()
    t_star = (-(g2 + lam * jacobian.mean(0)) @ diff / diff.square().sum()).clamp(0, 1)
    sdm = SDMGrad(lam, niter=200, w_lr=1 / kappa, w_momentum=0.0)
    sdm.weights(jacobian)
    expected = torch.stack([t_star, 1 - t_star])
    torch.testing.assert_close(sdm.state_dict()["w"], expected, rtol=0, atol=1e-9)


def test_sdmgrad_warm_start_and_limits():
    jacobian = randn(6, 3, 5)
    # the weights persist between calls while the momentum restarts: without momentum, two
    # calls of one step each equal one call of two steps
    two_calls = SDMGrad(niter=1, w_lr=0.5, w_momentum=0.0)
    two_calls.weights(jacobian)
    two_calls.weights(jacobian)
    one_call = SDMGrad(niter=2, w_lr=0.5, w_momentum=0.0)
    one_call.weights(jacobian)
    torch.testing.assert_close(
        two_calls.state_dict()["w"], one_call.state_dict()["w"], rtol=1e-15, atol=1e-16
    )
    # momentum: the second step moves along 0.5∇_1 + ∇_2; small steps stay inside the simplex,
    # where the projection subtracts the mean of the step
    gram = jacobian @ jacobian.T
    m = gram / torch.sqrt(gram.diagonal() + 1e-4).mean() ** 2

    def grad(v):
        return m @ v + 0.3 * m.mean(1)

    w0 = torch.full((3,), 1 / 3, dtype=F64)
    w1 = w0 - 0.01 * (grad(w0) - grad(w0).mean())
    buf = 0.5 * grad(w0) + grad(w1)
    w2 = w1 - 0.01 * (buf - buf.mean())
    assert (w2 > 0).all()
    sdm = SDMGrad(niter=2, w_lr=0.01)
    sdm.weights(jacobian)
    torch.testing.assert_close(sdm.state_dict()["w"], w2, rtol=1e-14, atol=1e-15)
    # λ → ∞ tends to the mean gradient (times K): weights → 1; λ = 0, niter = 0: w_0 = 1/K
    torch.testing.assert_close(
        SDMGrad(1e9).weights(jacobian), torch.ones(3, dtype=F64), rtol=1e-8, atol=0
    )
    torch.testing.assert_close(
        SDMGrad(0.0, niter=0, scale_by_k=False).weights(jacobian),
        torch.full((3,), 1 / 3, dtype=F64),
    )
    with pytest.raises(ValueError, match="3 tasks"):
        two_calls.weights(J_GOLDEN)


@SETTINGS
@given(matrices(), st.integers(0, 2**16))
def test_sdmgrad_permutation_equivariant(jacobian, seed):
    perm = permutation(jacobian.shape[0], seed)
    a, b = SDMGrad(w_lr=0.5), SDMGrad(w_lr=0.5)
    for _ in range(2):
        torch.testing.assert_close(
            b.weights(jacobian[perm]), a.weights(jacobian)[perm], rtol=1e-9, atol=1e-12
        )


@SETTINGS
@given(st.integers(1, 9), st.integers(1, 5), st.floats(-3, 3), st.integers(0, 2**16))
def test_simplex_projection_matches_the_numpy_reference(k, batch, log_scale, seed):
    v = randn(seed, batch, k) * 10.0**log_scale
    out = simplex_projection(v)
    expected = np.stack([project_to_simplex(row) for row in v.numpy()])
    torch.testing.assert_close(out, torch.from_numpy(expected), rtol=1e-12, atol=1e-15)


def test_sdmgrad_validation_and_repr():
    for bad in (
        dict(lamda=-0.1),
        dict(niter=-1),
        dict(w_lr=0.0),
        dict(w_momentum=1.0),
        dict(max_norm=0.0),
    ):
        with pytest.raises(ValueError):
            SDMGrad(**bad)
    assert repr(SDMGrad()) == (
        "SDMGrad(lamda=0.3, niter=20, w_lr=10.0, w_momentum=0.5, scale_by_k=True, max_norm=1.0)"
    )
