"""Faults: each gives the documented behaviour and never leaves partially updated state.

- NaN/Inf in a loss or in one task's gradient: the step is skipped with a warning; parameters,
  base-optimizer state and method state (aggregator, weighting, RNG) are byte-identical.
- A task whose loss does not reach the shared parameters, a zero gradient, a rank-deficient
  Gramian: every aggregator returns a finite direction.
- A solver that does not converge: Nash-MTL falls back to the previous weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batches, make_model

import mtl_optim
from benchmarks.methods import default_instance, exported
from mtl_optim import aggregators, weighting

K = 3
F64 = torch.float64


def _aggregator(name):
    return default_instance(exported(aggregators)[name], K)


AGGREGATORS = sorted(exported(aggregators))

CONFIGS = {
    "adatask+pcgrad+igb": lambda p: mtl_optim.AdaTask(
        p, lr=1e-2, aggregator=aggregators.PCGrad(seed=0), weighting=weighting.IGB()
    ),
    "nash": lambda p: mtl_optim.MTLOptimizer(
        p, base=torch.optim.SGD, lr=0.05, momentum=0.9, aggregator=aggregators.NashMTL()
    ),
    "rlw+mgda": lambda p: mtl_optim.MTLOptimizer(
        p, lr=1e-2, weighting=weighting.RLW(seed=0), aggregator=aggregators.MGDA()
    ),
    "uncertainty": lambda p: mtl_optim.MTLOptimizer(p, lr=1e-2, weighting=weighting.Uncertainty(K)),
    "famo": lambda p: mtl_optim.MTLOptimizer(p, lr=1e-2, weighting=weighting.FAMO(K)),
    "igbrl": lambda p: mtl_optim.MTLOptimizer(
        p, lr=1e-2, weighting=weighting.IGBRL(steps_per_epoch=2, seed=0)
    ),
    "gradnorm": lambda p: mtl_optim.MTLOptimizer(p, lr=1e-2, weighting=weighting.GradNorm(K)),
}


def same(a, b) -> bool:
    """Deep, exact equality of nested state (tensors compared bytewise, NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def nan_gradient_losses(model, x, ys):
    """Finite losses, but task 1's gradient is NaN (sqrt'(0) · 0 on a shared weight)."""
    losses = model.losses(x, ys)
    w = model.trunk[0].weight
    losses[1] = losses[1] + 0.0 * torch.sqrt((w - w.detach()).sum())
    return losses


@pytest.mark.parametrize("fault", ["loss", "gradient"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_skipped_step_leaves_every_piece_of_state_untouched(name, fault):
    model = make_model(K)
    opt = CONFIGS[name](model.parameters())
    data = batches(K, 6)
    for i, (x, ys) in enumerate(data[:4]):  # build up state first (epochs for IGB / IGB-RL)
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()
        with torch.no_grad():
            opt.update_weighting(model.losses(x, ys))
        if i % 2 == 1:
            opt.end_epoch()
    params = copy.deepcopy([p.detach() for p in model.parameters()])
    state = copy.deepcopy(opt.state_dict())
    x, ys = data[4]
    opt.zero_grad()
    if fault == "loss":
        losses = model.losses(x, ys)
        losses[2] = losses[2] * float("nan")
    else:
        losses = nan_gradient_losses(model, x, ys)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.backward(losses)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert same(opt.state_dict(), state), "method or optimizer state changed by a skipped step"
    x, ys = data[5]  # and training goes on
    opt.zero_grad()
    opt.backward(model.losses(x, ys))
    opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), params))


def degenerate_matrices():
    g = torch.Generator().manual_seed(0)
    row = torch.randn(6, generator=g, dtype=F64)
    other = torch.randn(6, generator=g, dtype=F64)
    return {
        "zero-row": torch.stack([row, torch.zeros(6, dtype=F64), other]),
        "all-zero": torch.zeros(3, 6, dtype=F64),
        "duplicate": torch.stack([row, row, other]),
        "opposed": torch.stack([row, -row, other]),
        "rank-one": torch.stack([row, 2 * row, 0.5 * row]),
    }


@pytest.mark.parametrize("case", sorted(degenerate_matrices()))
@pytest.mark.parametrize("name", AGGREGATORS)
def test_every_aggregator_returns_a_finite_direction_on_degenerate_matrices(name, case):
    jac = degenerate_matrices()[case]
    agg = _aggregator(name)
    for _ in range(3):  # stateful methods: several calls
        out = agg(jac)
        assert out.shape == (6,) and torch.isfinite(out).all(), f"{name} on {case}: {out}"


def test_a_task_that_does_not_reach_the_shared_parameters_trains():
    # Task 2 reads only its head (no trunk): its row of J is zero; declare the trunk shared.
    model = make_model(K)
    for name in ["NashMTL", "MGDA", "IMTLG", "CAGrad", "PCGrad"]:
        opt = mtl_optim.MTLOptimizer(
            model.parameters(),
            base=torch.optim.SGD,
            lr=0.01,
            aggregator=_aggregator(name),
            shared=list(model.trunk.parameters()),
        )
        for x, ys in batches(K, 3):
            opt.zero_grad()
            losses = model.losses(x, ys)
            losses[2] = (model.heads[2](torch.ones(1, 8, dtype=F64)) ** 2).mean()
            opt.backward(losses)
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), name


def test_nash_mtl_keeps_the_previous_weights_when_the_solver_fails():
    agg = aggregators.NashMTL(max_iter=1, check_every=None)
    good = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64)
    converged = aggregators.NashMTL().weights(good)
    agg.load_state_dict({"alpha": converged, "step": 1})
    hard = torch.tensor([[1.0, 1e-9], [1e-9, 1e-8]], dtype=F64) @ torch.randn(2, 5, dtype=F64)
    w = agg.weights(hard)  # one Newton step cannot converge from this start
    torch.testing.assert_close(w, converged)


@pytest.mark.parametrize("before", [5, 6, 7])
def test_igb_rl_rolls_back_light_and_full_snapshots(before):
    # With update_every = 2 from step 6 on, a faulty step 6 would have trained the agent (full
    # snapshot); steps 5 and 7 only record a transition (light snapshot), into a full ring.
    model = make_model(K)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(),
        lr=1e-2,
        weighting=weighting.IGBRL(steps_per_epoch=2, update_every=2, buffer_size=2, seed=0),
    )
    data = batches(K, before + 1)
    for i, (x, ys) in enumerate(data[:before]):
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()
        if i % 2 == 1:
            opt.end_epoch()
    state = copy.deepcopy(opt.state_dict())
    x, ys = data[before]
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.backward(nan_gradient_losses(model, x, ys))
    opt.step()
    assert same(opt.state_dict(), state)
