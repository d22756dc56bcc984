"""GradVac: golden values, PCGrad at the start, scale invariance, state, edge cases."""

from __future__ import annotations

import math

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

from mtl_optim.aggregators import GradVac, PCGrad

SETTINGS = settings(max_examples=examples(40))


G1, G2 = J_GOLDEN  # g_1 = (-4, 1, 1), g_2 = (6, 1, 1): ‖g_1‖² = 18, ‖g_2‖² = 38, g_1·g_2 = -22


# ---------------------------------------------------------------------------------- GradVac
def test_gradvac_golden_values():
    # Call 1: every target is 0, so GradVac is PCGrad: d = (100, 650, 650)/171 (see the PCGrad
    # golden test), and both targets move to β·cos = c/2 with c = -22/√684 = -11/(3√19).
    gradvac = GradVac(seed=0)
    torch.testing.assert_close(gradvac(J_GOLDEN), t(100, 650, 650) / 171)
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
