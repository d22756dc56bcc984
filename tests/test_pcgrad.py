"""PCGrad: the sequential projections, the sum without conflict, the two-task closed form,
golden values, seeding and state, reductions.

The decisions tested are in docs/methods/aggregators.md, "PCGrad".
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import J_GOLDEN, examples, matrices
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import PCGrad

SETTINGS = settings(max_examples=examples(60))


# --- PCGrad ----------------------------------------------------------------------------------
def pcgrad_reference(jacobian: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """The paper's loop, one vector at a time, with ``orders[i]`` the visiting order of task i."""
    rows = []
    for i, order in enumerate(orders):
        g = jacobian[i].clone()
        for j in order:
            dot = g @ jacobian[j]
            if dot < 0:
                g = g - dot / jacobian[j].pow(2).sum() * jacobian[j]
        rows.append(g)
    return torch.stack(rows)


def closed_form_two_tasks(jacobian: torch.Tensor) -> torch.Tensor:
    g1, g2 = jacobian
    dot = g1 @ g2
    return torch.stack([g1 - dot / (g2 @ g2) * g2, g2 - dot / (g1 @ g1) * g1])


@SETTINGS
@given(jacobian=matrices(k_max=4), seed=st.integers(0, 2**31))
def test_pcgrad_rows_follow_the_sequential_projections_in_some_order(jacobian, seed):
    rows = PCGrad(seed=seed).transform(jacobian)
    k = len(jacobian)
    tol = 1e-9 * jacobian.norm(dim=1).max()
    for i in range(k):
        others = [j for j in range(k) if j != i]
        candidates = [
            pcgrad_reference(jacobian[[i, *order]], [list(range(1, k))])[0]
            for order in itertools.permutations(others)
        ]
        assert any((rows[i] - c).abs().max() <= tol for c in candidates)


@SETTINGS
@given(jacobian=matrices(k_max=8), seed=st.integers(0, 2**31))
def test_pcgrad_without_conflict_is_exactly_the_sum_in_any_order(jacobian, seed):
    jacobian = jacobian.abs()  # non-negative entries: every pairwise dot is >= 0
    perm = torch.randperm(len(jacobian), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(PCGrad(seed=seed)(jacobian), jacobian.sum(0))
    assert torch.equal(PCGrad(seed=seed + 1)(jacobian[perm]), jacobian[perm].sum(0))
    assert torch.equal(PCGrad(seed=seed).transform(jacobian), jacobian)


@SETTINGS
@given(jacobian=matrices(k_min=2, k_max=2, full_rank=True), seed=st.integers(0, 2**31))
def test_pcgrad_two_tasks_is_the_closed_form_whatever_the_order(jacobian, seed):
    if jacobian[0] @ jacobian[1] >= 0:
        jacobian[1] = (
            jacobian[1] - 2 * (jacobian[0] @ jacobian[1]) / jacobian[0].pow(2).sum() * (jacobian[0])
        )  # reflect the component along g_1, so the two now conflict
    expected = closed_form_two_tasks(jacobian)
    tol = 1e-9 * jacobian.norm(dim=1).max()
    for s in (seed, seed + 1):
        torch.testing.assert_close(PCGrad(seed=s).transform(jacobian), expected, rtol=0, atol=tol)
        torch.testing.assert_close(
            PCGrad(seed=s).transform(jacobian.flip(0)), expected.flip(0), rtol=0, atol=tol
        )


def test_pcgrad_golden_values():
    # g_1·g_2 = -22 < 0, ‖g_1‖² = 18, ‖g_2‖² = 38, so both project:
    # ĝ_1 = g_1 + 22/38 g_2 = (-4 + 66/19, 1 + 11/19, 1 + 11/19) = (-10/19, 30/19, 30/19)
    # ĝ_2 = g_2 + 22/18 g_1 = (6 - 44/9, 1 + 11/9, 1 + 11/9)    = (10/9, 20/9, 20/9)
    # Σ ĝ_i = (-10/19 + 10/9, 30/19 + 20/9, ...) = (100/171, 650/171, 650/171)
    rows = torch.tensor([[-10 / 19, 30 / 19, 30 / 19], [10 / 9, 20 / 9, 20 / 9]]).double()
    pcgrad = PCGrad(seed=0)
    torch.testing.assert_close(pcgrad.transform(J_GOLDEN), rows)
    torch.testing.assert_close(pcgrad(J_GOLDEN), torch.tensor([100, 650, 650]).double() / 171)
    torch.testing.assert_close(PCGrad("mean", seed=0)(J_GOLDEN), rows.mean(0))


def test_pcgrad_zero_row_never_projects():
    # g_1 = 0 conflicts with nothing; g_2, g_3 conflict as in the golden matrix
    jacobian = torch.cat([torch.zeros(1, 3, dtype=torch.float64), J_GOLDEN])
    for seed in range(5):
        rows = PCGrad(seed=seed).transform(jacobian)
        assert torch.isfinite(rows).all()
        assert torch.equal(rows[0], torch.zeros(3, dtype=torch.float64))
        torch.testing.assert_close(rows[1:], closed_form_two_tasks(J_GOLDEN))


def _conflicting(k: int = 6, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_pcgrad_seeding_and_state_dict_round_trip():
    jacobian = _conflicting()
    outputs = {tuple(PCGrad(seed=s)(jacobian).tolist()) for s in range(8)}
    assert len(outputs) > 1  # the order matters for this J
    assert torch.equal(PCGrad(seed=3)(jacobian), PCGrad(seed=3)(jacobian))

    first = PCGrad(seed=3)
    for _ in range(4):
        first(jacobian)
    state = first.state_dict()
    resumed = PCGrad(seed=11)
    resumed.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(first(jacobian), resumed(jacobian))
    with pytest.raises(ValueError, match="generator"):
        resumed.load_state_dict({})


def test_pcgrad_reductions_and_validation():
    jacobian = _conflicting()
    total = PCGrad(seed=1)(jacobian)
    mean = PCGrad("mean", seed=1)
    torch.testing.assert_close(mean(jacobian), total / len(jacobian))
    for pcgrad in (PCGrad(seed=2), PCGrad("mean", seed=2)):  # rows sum to the direction
        rows = pcgrad.transform(jacobian)
        pcgrad.load_state_dict(PCGrad(seed=2).state_dict())
        torch.testing.assert_close(rows.sum(0), pcgrad(jacobian))
    with pytest.raises(ValueError, match="reduction"):
        PCGrad("max")
    assert repr(PCGrad("mean", seed=4)) == "PCGrad(reduction='mean', seed=4)"
    assert PCGrad()(jacobian.float()).dtype == torch.float32
    single = jacobian[:1]
    assert torch.equal(PCGrad()(single), single[0])
