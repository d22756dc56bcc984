"""GradDrop: golden values, sign purity per column, seeding and state, representation
gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    F64,
    J_GOLDEN,
    TwoTask,
    examples,
    matrices,
    two_task_data,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import mtl_optim
from mtl_optim.aggregators import GradDrop

SETTINGS = settings(max_examples=examples(40))


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
