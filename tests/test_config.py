"""ConFIG: golden values, equal cosines without conflict, invariances, preferences, degenerate
rows.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, J_GOLDEN, examples
from conftest import matrices as _matrices
from helpers import permutation, randn
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import ConFIG

SETTINGS = settings(max_examples=examples(40))


S19 = math.sqrt(19.0)


def matrices(k_min: int = 2, k_max: int = 6, full_rank: bool = False):
    """The shared sampler with this file's ranges: K <= 6, d <= 10, scale 10^±6."""
    return _matrices(k_min, k_max, full_rank, d_max=10, exponent=6.0)


def test_config_golden():
    # Unit rows u_1 = g_1/(3√2), u_2 = g_2/(√2√19); UUᵀ = [[1, c], [c, 1]] with
    # c = -11/(3√19), so (UUᵀ)⁻¹1 = 1/(1 + c) and x = (u_1 + u_2)/(1 + c): u_i·x = 1.
    # ‖u_1 + u_2‖² = 2(1 + c) and Σ_i g_i·(u_1 + u_2) = (18 - 22)/(3√2) + (38 - 22)/(√2√19),
    # so d = ℓ x̂ = [Σ_i g_i·(u_1 + u_2)] / [2(1 + c)] · (u_1 + u_2) = f (u_1 + u_2) with
    # f = (24 - 2√19) / (√2 (3√19 - 11)) ≈ 5.20351, i.e. w = f (1/(3√2), 1/(√2√19)).
    f = (24 - 2 * S19) / (math.sqrt(2) * (3 * S19 - 11))
    expected = torch.tensor([f / (3 * math.sqrt(2)), f / (math.sqrt(2) * S19)], dtype=F64)
    torch.testing.assert_close(ConFIG().weights(J_GOLDEN), expected, rtol=1e-12, atol=0)
    d = ConFIG()(J_GOLDEN)
    torch.testing.assert_close(d, expected @ J_GOLDEN, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        d, torch.tensor([0.158809, 2.070607, 2.070607], dtype=F64), rtol=0, atol=1e-6
    )
    cosines = J_GOLDEN @ d / J_GOLDEN.norm(dim=1)
    torch.testing.assert_close(cosines[0], cosines[1], rtol=1e-12, atol=0)  # equal angles


@SETTINGS
@given(matrices(full_rank=True), st.sampled_from(["min", "max", "geometric", "harmonic"]))
def test_config_non_conflicting_equal_cosines_and_lengths(jacobian, length):
    out = ConFIG()(jacobian)
    norms = jacobian.norm(dim=1)
    cosines = jacobian @ out / norms
    assert (cosines > 0).all()  # full row rank: no task is hurt
    torch.testing.assert_close(cosines, cosines.mean().expand_as(cosines), rtol=1e-6, atol=0)
    # With equal cosines the projection length is Σ‖g_i‖·cos, the track lengths τ·K·cos, so
    # a track model rescales the projection direction by τ / mean‖g_i‖.
    tau = {
        "min": norms.min(),
        "max": norms.max(),
        "geometric": norms.log().mean().exp(),
        "harmonic": len(norms) / (1 / norms).sum(),
    }[length]
    scale = out.norm()
    torch.testing.assert_close(
        ConFIG(length=length)(jacobian), out * tau / norms.mean(), rtol=1e-6, atol=1e-9 * scale
    )
    arithmetic = ConFIG(length="arithmetic")(jacobian)
    torch.testing.assert_close(arithmetic, out, rtol=1e-6, atol=1e-9 * scale)


@SETTINGS
@given(matrices(), st.integers(0, 2**16))
def test_config_permutation_invariant_and_homogeneous(jacobian, seed):
    out = ConFIG()(jacobian)
    perm = permutation(jacobian.shape[0], seed)
    scale = jacobian.norm(dim=1).sum()
    torch.testing.assert_close(ConFIG()(jacobian[perm]), out, rtol=1e-6, atol=1e-9 * scale)
    torch.testing.assert_close(ConFIG()(-3.0 * jacobian), -3.0 * out, rtol=1e-9, atol=1e-12 * scale)


def test_config_pref_vector_sets_the_cosines():
    jacobian = randn(0, 3, 7)
    pref = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    out = ConFIG(pref)(jacobian)
    cosines = jacobian @ out / jacobian.norm(dim=1)
    torch.testing.assert_close(cosines / cosines[0], pref, rtol=1e-10, atol=0)
    torch.testing.assert_close(ConFIG(7.0 * pref)(jacobian), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ConFIG([1.0, 1.0, 1.0])(jacobian), ConFIG()(jacobian))
    with pytest.raises(ValueError, match="pref_vector"):
        ConFIG(pref)(jacobian[:2])


def test_config_degenerate_rows():
    g = J_GOLDEN[0]
    torch.testing.assert_close(ConFIG()(g[None]), g)  # K = 1: the gradient itself
    # two equal rows: U⁺1 = u, and ℓ = 2‖g‖, so the direction is the sum 2g
    torch.testing.assert_close(ConFIG()(torch.stack([g, g])), 2 * g)
    # a zero row gets weight 0 and the other rows are combined as without it
    with_zero = torch.cat([J_GOLDEN[:1], torch.zeros(1, 3, dtype=F64), J_GOLDEN[1:]])
    w = ConFIG().weights(with_zero)
    assert w[1] == 0
    torch.testing.assert_close(w[[0, 2]], ConFIG().weights(J_GOLDEN))
    assert torch.equal(ConFIG()(torch.zeros(3, 4, dtype=F64)), torch.zeros(4, dtype=F64))
    # exactly opposed rows (Pareto stationary): 1 ⟂ range(UUᵀ), no direction has equal cosines
    opposed = torch.tensor([[0.8, 0.1, -0.7], [-1.6, -0.2, 1.4]], dtype=F64)
    assert torch.equal(ConFIG()(opposed), torch.zeros(3, dtype=F64))
    assert ConFIG()(J_GOLDEN.float()).dtype == torch.float32


def test_config_validation_and_repr():
    for bad in (dict(length="mean"), dict(rcond=0.0), dict(rcond=1.0), dict(pref_vector=[1, -1])):
        with pytest.raises(ValueError):
            ConFIG(**bad)
    assert repr(ConFIG([1, 2], length="min")) == (
        "ConFIG(pref_vector=[1.0, 2.0], length='min', rcond=1e-06)"
    )
