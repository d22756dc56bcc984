"""ExcessMTL: golden values, weights summing to K, a zero reference, validation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, J_GOLDEN, examples
from conftest import matrices as _matrices
from helpers import permutation
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import ExcessMTL

SETTINGS = settings(max_examples=examples(40))


def matrices(k_min: int = 2, k_max: int = 6, full_rank: bool = False):
    """The shared sampler with this file's ranges: K <= 6, d <= 10, scale 10^±6."""
    return _matrices(k_min, k_max, full_rank, d_max=10, exponent=6.0)


def test_excess_mtl_golden():
    excess = ExcessMTL()
    # First call: only the reference estimates e_1,i = Σ_j g_ij² / √(g_ij² + 1e-7) ≈ Σ_j |g_ij|
    # are recorded; the weights stay ones and the direction is the sum (2, 2, 2).
    torch.testing.assert_close(excess(J_GOLDEN), torch.full((3,), 2.0, dtype=F64))
    # Second call with g_2 doubled: S_1 = g_1² + g_1² = 2g_1², S_2 = g_2² + 4g_2² = 5g_2², so
    # e_2,1 = Σ g_1² / √(2g_1² + ε) ≈ e_1,1/√2 and e_2,2 = Σ 4g_2² / √(5g_2² + ε) ≈ 4e_1,2/√5;
    # w ∝ exp(0.01·ratio), normalised to sum 2.
    eps = 1e-7
    g1, g2 = J_GOLDEN
    ratio1 = (g1**2 / (2 * g1**2 + eps).sqrt()).sum() / (g1**2 / (g1**2 + eps).sqrt()).sum()
    ratio2 = (4 * g2**2 / (5 * g2**2 + eps).sqrt()).sum() / (g2**2 / (g2**2 + eps).sqrt()).sum()
    assert (
        abs(ratio1.item() - 1 / math.sqrt(2)) < 1e-7
        and abs(ratio2.item() - 4 / math.sqrt(5)) < 1e-7
    )
    expected = torch.stack([ratio1, ratio2]).mul(0.01).exp()
    expected = 2 * expected / expected.sum()
    doubled = J_GOLDEN * torch.tensor([[1.0], [2.0]], dtype=F64)
    torch.testing.assert_close(excess.weights(doubled), expected, rtol=1e-14, atol=0)
    assert expected[1] > 1 > expected[0]  # the task with more estimated excess risk gains


@SETTINGS
@given(matrices(), st.integers(0, 2**16))
def test_excess_mtl_weights_sum_to_k_and_are_permutation_equivariant(jacobian, seed):
    k = jacobian.shape[0]
    perm = permutation(k, seed)
    a, b = ExcessMTL(robust_step_size=0.5), ExcessMTL(robust_step_size=0.5)
    for t in range(1, 4):
        step = jacobian * torch.linspace(1, t, k, dtype=F64)[:, None]  # uneven growth
        w = a.weights(step)
        torch.testing.assert_close(b.weights(step[perm]), w[perm], rtol=1e-12, atol=0)
        assert (w > 0).all() and abs(w.sum().item() - k) < 1e-12


def test_excess_mtl_zero_reference_and_validation():
    # a zero row at the first call: its reference is taken later, its weight stays finite
    excess = ExcessMTL()
    with_zero = J_GOLDEN.clone()
    with_zero[1] = 0
    excess.weights(with_zero)
    w = excess.weights(J_GOLDEN)  # the zero-reference task's exponent stays 0 this time
    torch.testing.assert_close(
        w,
        2 * torch.softmax(torch.tensor([0.01 / math.sqrt(2), 0.0], dtype=F64), 0),
        rtol=1e-8,
        atol=0,
    )
    # third call: S = (3g_1², 2g_2²), so the ratios are ≈ (1/√3, 1/√2), the second task's
    # reference now being its estimate of the second call
    ratios = torch.tensor([1 / math.sqrt(3), 1 / math.sqrt(2)], dtype=F64)
    expected = w * torch.exp(0.01 * ratios)
    torch.testing.assert_close(
        excess.weights(J_GOLDEN), 2 * expected / expected.sum(), rtol=1e-8, atol=0
    )
    with pytest.raises(ValueError, match="shape"):
        excess.weights(J_GOLDEN[:, :2])
    for bad in (dict(robust_step_size=0.0), dict(robust_step_size=math.inf), dict(eps=0.0)):
        with pytest.raises(ValueError):
            ExcessMTL(**bad)
    assert repr(ExcessMTL()) == "ExcessMTL(robust_step_size=0.01, eps=1e-07)"
