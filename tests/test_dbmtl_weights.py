"""DB-MTL reports its effective task weights (the factors on the averaged log-loss gradients) as
``weights`` / ``opt.last_weights``, checked against a computation by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import TwoTask, two_task_data

import mtl_optim
from mtl_optim.aggregators import MGDA
from mtl_optim.weighting import DBMTL

F64 = torch.float64
EPS64 = torch.finfo(F64).eps


def reference_scales(model, losses_fn, steps: int, beta: float, beta_sigma: float, lr: float):
    """Plain torch: SGD on Σ_i a_i ĝ_i by hand, recording ``a`` at every step."""
    shared = list(model.trunk.parameters())
    heads = list(model.heads.parameters())
    average, out = None, []
    for t in range(steps):
        losses = losses_fn()
        rows = []
        for loss in losses:
            grads = torch.autograd.grad(torch.log(loss), shared, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        jac = torch.stack(rows)
        b = beta / (t + 1) ** beta_sigma
        average = (1 - b) * jac if average is None else b * average + (1 - b) * jac
        norms = average.norm(dim=1)
        scales = norms.max() / norms
        out.append(scales)
        head_grads = torch.autograd.grad(sum(torch.log(v) for v in losses), heads)
        direction = (scales[:, None] * average).sum(0)
        with torch.no_grad():
            offset = 0
            for p in shared:
                p -= lr * direction[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            for p, g in zip(heads, head_grads):
                p -= lr * g
    return out


@pytest.mark.parametrize("beta_sigma", [0.0, 0.5])
def test_last_weights_are_the_scales_on_the_averaged_log_loss_gradients(beta_sigma):
    x, ys = two_task_data(nonlinear=True)
    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    twin = TwoTask(nonlinear=True).double()
    twin.load_state_dict(model.state_dict())

    def losses_of(m):
        return [((out - y) ** 2).mean() for out, y in zip(m(x), ys)]

    expected = reference_scales(twin, lambda: losses_of(twin), 8, 0.9, beta_sigma, 0.05)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(),
        base=torch.optim.SGD,
        lr=0.05,
        weighting=DBMTL(beta_sigma=beta_sigma),
    )
    moved = False
    for scales in expected:
        opt.zero_grad()
        opt.backward(losses_of(model))
        got = opt.last_weights
        # float64 throughout: the same sums in another order, so a few roundings of the
        # norms' ratio (relative 2^6 eps)
        torch.testing.assert_close(got, scales, rtol=64 * EPS64, atol=0)
        assert torch.equal(opt.weighting.weights, got)
        torch.testing.assert_close(opt.weighting.scales, scales, rtol=64 * EPS64, atol=0)
        moved |= not torch.allclose(got, torch.ones(2, dtype=F64))
        opt.step()
    assert moved  # not the ones it used to report
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_last_weights_with_an_aggregator_are_its_row_weights_times_the_scales():
    # first step by hand: ĝ = (1 - β) ∇log L_i on the trunk, a = max‖ĝ‖/‖ĝ_i‖, and MGDA
    # combines the rows a_i ĝ_i; opt.last_weights is MGDA's weights times a
    x, ys = two_task_data(nonlinear=True)
    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    losses = [((out - y) ** 2).mean() for out, y in zip(model(x), ys)]
    shared = list(model.trunk.parameters())
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(torch.log(loss), shared, retain_graph=True)
        rows.append(0.1 * torch.cat([g.reshape(-1) for g in grads]))
    average = torch.stack(rows)
    scales = average.norm(dim=1).max() / average.norm(dim=1)
    expected = MGDA().weights(scales[:, None] * average) * scales
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.SGD, lr=0.05, weighting=DBMTL(), aggregator=MGDA()
    )
    opt.backward(losses)
    torch.testing.assert_close(opt.last_weights, expected, rtol=1e-10, atol=0)


def test_weights_are_one_before_any_gradient_is_seen():
    db = DBMTL()
    db(torch.tensor([2.0, 0.5], dtype=F64))
    assert torch.equal(db.weights, torch.ones(2, dtype=F64))  # forward alone: no gradients yet
