"""Uncertainty weighting and its variants (GroupedUncertainty, ConstrainedUncertainty):
objectives and gradients by hand, the optimum of the log-variances, regrouping, bounds, state.

The decisions tested are in docs/methods/weightings.md, "Uncertainty weighting".
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, jacobian, t
from torch import nn

import mtl_optim
from mtl_optim.weighting import ConstrainedUncertainty, GroupedUncertainty, Uncertainty
from mtl_optim.weighting._constrained_uncertainty import bounded_rescale


def grad_s(weighting, losses: torch.Tensor) -> torch.Tensor:
    """``∂(Σo)/∂s``."""
    x = losses.detach().clone().requires_grad_(True)
    return torch.stack(torch.autograd.grad(weighting(x).sum(), weighting.parameters()))


# --- Uncertainty ------------------------------------------------------------------------
def test_uncertainty_objectives_and_gradients_by_hand():
    uw = Uncertainty(3, dtype=F64)
    uw.log_vars = t(0.0, 1.0, -0.5)
    losses = t(2.0, 0.5, 3.0)
    o = uw(losses.clone().requires_grad_(True))
    s = [0.0, 1.0, -0.5]
    expect = [0.5 * math.exp(-si) * li + 0.5 * si for si, li in zip(s, losses.tolist())]
    torch.testing.assert_close(o.detach(), t(*expect))
    w = t(*[0.5 * math.exp(-si) for si in s])
    torch.testing.assert_close(uw.weights, w)
    assert not uw.weights.requires_grad
    torch.testing.assert_close(jacobian(uw, losses), torch.diag(w))
    torch.testing.assert_close(grad_s(uw, losses), 0.5 - w * losses)


def test_uncertainty_factors_clip_and_guards():
    uw = Uncertainty(2, init=0.3, factors=(1.0, 2.0), clip=(-1.0, 0.2), dtype=F64)
    losses = t(2.0, 3.0)
    o = uw(losses.clone().requires_grad_(True))
    # init 0.3 is projected onto the clip interval: s = 0.2
    torch.testing.assert_close(uw.log_vars.detach(), t(0.2, 0.2))
    e = math.exp(-0.2)
    torch.testing.assert_close(o.detach(), t(e * 2.0 + 0.1, e / 2 * 3.0 + 0.1))
    torch.testing.assert_close(uw.weights, t(e, e / 2))
    # a step below the interval is undone at the next call; the gradient is never zeroed
    uw.log_vars = t(-5.0, 0.0)
    torch.testing.assert_close(grad_s(uw, losses), t(0.5 - math.exp(1.0) * 2.0, 0.5 - 1.5))
    torch.testing.assert_close(uw.log_vars.detach(), t(-1.0, 0.0))
    with pytest.raises(ValueError, match="tasks"):
        uw(t(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="factors"):
        Uncertainty(2, factors=(1.0,))
    with pytest.raises(ValueError, match="factor"):
        Uncertainty(2, factors=(1.0, 0.0))
    with pytest.raises(ValueError, match="clip"):
        Uncertainty(2, clip=(1.0, 1.0))
    with pytest.raises(ValueError, match="num_tasks"):
        Uncertainty(0)
    with pytest.raises(ValueError, match="lr"):
        Uncertainty(2, lr=0.0)
    assert Uncertainty(2).param_group_options == {"lr": 0.025}
    assert Uncertainty(2, lr=None).param_group_options == {}
    assert repr(Uncertainty(2)) == "Uncertainty(2, init=0.0, lr=0.025)"


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2)).to(F64)


@pytest.mark.parametrize("lr", [0.025, 0.1, None])
def test_optimizer_registers_the_log_variances_with_their_lr(lr):
    uw = Uncertainty(2, lr=lr, dtype=F64)
    model = _model()
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.Adam, lr=1e-2, weighting=uw)
    assert len(opt.param_groups) == 2
    group = opt.param_groups[-1]
    assert group["params"] == uw.parameters() and len(group["params"]) == 2
    assert group["lr"] == (1e-2 if lr is None else lr)


@pytest.mark.parametrize("make", [Uncertainty, ConstrainedUncertainty])
def test_log_variances_converge_to_the_log_losses_for_constant_losses(make):
    uw = make(2, lr=0.05, dtype=F64)
    w = torch.zeros(2, dtype=F64, requires_grad=True)  # a dummy model parameter
    opt = mtl_optim.MTLOptimizer([w], base=torch.optim.Adam, lr=1e-2, weighting=uw)
    targets = t(4.0, 0.25)
    for _ in range(600):
        opt.zero_grad()
        opt.backward([w[0] * 0 + targets[0], w[1] * 0 + targets[1]])
        opt.step()
    torch.testing.assert_close(uw.log_vars.detach(), targets.log(), atol=2e-2, rtol=0)


# --- GroupedUncertainty -----------------------------------------------------------------
def test_grouped_shares_one_parameter_per_group():
    gu = GroupedUncertainty([[0, 2], [1]], dtype=F64)
    assert gu.num_tasks == 3 and gu.n_groups == 2 and gu.log_vars.shape == (2,)
    assert [p.shape for p in gu.parameters()] == [(), ()]
    gu.log_vars = t(0.5, -1.0)
    losses = t(1.0, 2.0, 3.0)
    s = t(0.5, -1.0, 0.5)
    w = 0.5 * torch.exp(-s)
    o = gu(losses.clone().requires_grad_(True))
    torch.testing.assert_close(o.detach(), w * losses + 0.5 * s)
    torch.testing.assert_close(gu.weights, w)
    torch.testing.assert_close(jacobian(gu, losses), torch.diag(w))
    per_task = 0.5 - w * losses
    torch.testing.assert_close(grad_s(gu, losses), t(per_task[0] + per_task[2], per_task[1]))
    # a one-task-per-group partition is plain Uncertainty
    single, uw = GroupedUncertainty([[0], [1], [2]], dtype=F64), Uncertainty(3, dtype=F64)
    torch.testing.assert_close(single(losses), uw(losses))
    for bad in ([[0, 1], [1]], [[0], []], [[0, 2]], [[0, "1"]]):
        with pytest.raises(ValueError):
            GroupedUncertainty(bad)
    with pytest.raises(ValueError, match="num_tasks"):
        GroupedUncertainty([[0], [1]], num_tasks=3)
    with pytest.raises(ValueError, match="n_groups"):
        GroupedUncertainty(num_tasks=3, n_groups=4)


def test_grouped_optimum_is_the_log_of_the_group_mean_loss():
    gu = GroupedUncertainty([[0, 1], [2]], lr=0.05, dtype=F64)
    w = torch.zeros(3, dtype=F64, requires_grad=True)
    opt = mtl_optim.MTLOptimizer([w], base=torch.optim.Adam, lr=1e-2, weighting=gu)
    targets = t(1.0, 3.0, 0.5)
    for _ in range(600):
        opt.zero_grad()
        opt.backward([w[i] * 0 + targets[i] for i in range(3)])
        opt.step()
    torch.testing.assert_close(
        gu.log_vars.detach(), t(math.log(2.0), math.log(0.5)), atol=2e-2, rtol=0
    )


def test_grouped_automatic_regroups_by_convergence_ratio():
    gu = GroupedUncertainty(num_tasks=4, n_groups=2, dtype=F64)
    assert gu.groups == [[0, 1], [2, 3]]  # contiguous index blocks before the first ranking
    gu(t(1.0, 1.0, 1.0, 1.0))
    gu(t(3.0, 3.0, 3.0, 3.0))
    gu.end_epoch()  # first epoch: mean 2 everywhere, no ranking yet
    assert gu.groups == [[0, 1], [2, 3]] and gu.epochs == 1
    gu.end_epoch()  # empty epoch: not counted
    assert gu.epochs == 1
    gu(t(1.8, 0.2, 1.0, 0.4))  # ratios 0.9, 0.1, 0.5, 0.2
    gu.end_epoch()
    assert gu.groups == [[1, 3], [0, 2]]
    assert gu.assignment.tolist() == [1, 0, 1, 0]
    gu(t(0.1, 0.2, 1.0, 2.0))  # ratios 0.05, 0.1, 0.5, 1.0 (relative to the first epoch)
    gu.end_epoch()
    assert gu.groups == [[0, 1], [2, 3]]
    odd = GroupedUncertainty(num_tasks=5, n_groups=3)
    assert odd.groups == [[0, 1], [2, 3], [4]]


def test_grouped_state_dict_round_trip():
    a = GroupedUncertainty(num_tasks=3, n_groups=2, dtype=F64)
    for vals in ([1.0, 2.0, 3.0], [1.0, 0.1, 3.0]):
        a(t(*vals))
        a.end_epoch()
    a(t(0.5, 0.5, 0.5))
    a.log_vars = t(0.3, -0.2)
    b = GroupedUncertainty(num_tasks=3, n_groups=2, dtype=F64)
    b.load_state_dict(a.state_dict())
    assert b.groups == a.groups and b.epochs == a.epochs
    torch.testing.assert_close(b.log_vars.detach(), a.log_vars.detach())
    for w in (a, b):
        w(t(0.2, 0.9, 3.0))
        w.end_epoch()
    assert b.groups == a.groups
    with pytest.raises(ValueError, match="assignment"):
        GroupedUncertainty(num_tasks=3, n_groups=2).load_state_dict({})


# --- ConstrainedUncertainty ---------------------------------------------------------------
def test_bounded_rescale_is_exact_and_proportional_in_the_interior():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        k = int(torch.randint(2, 7, (1,), generator=g))
        u = torch.exp(3 * torch.randn(k, generator=g, dtype=F64))
        w = bounded_rescale(u, 0.2, 3.0, float(k))
        assert w.sum().item() == pytest.approx(k, abs=1e-10)
        assert (w >= 0.2).all() and (w <= 3.0).all()
        free = (w > 0.2 + 1e-12) & (w < 3.0 - 1e-12)
        if int(free.sum()) >= 2:
            ratios = w[free] / u[free]
            torch.testing.assert_close(ratios, ratios[0].expand_as(ratios))
    torch.testing.assert_close(bounded_rescale(t(1.0, 3.0), 0.1, 10.0, 2.0), t(0.5, 1.5))
    torch.testing.assert_close(bounded_rescale(t(1.0, 100.0), 0.5, 10.0, 2.0), t(0.5, 1.5))
    torch.testing.assert_close(bounded_rescale(t(1.0, 9.0), 1.0, 10.0, 2.0), t(1.0, 1.0))


def test_constrained_weights_gradients_and_dwa_term():
    cu = ConstrainedUncertainty(3, bounds=(0.5, 1.5), dtype=F64)
    cu.log_vars = t(0.0, 2.0, -1.0)
    losses = t(1.0, 2.0, 0.5)
    o = cu(losses.clone().requires_grad_(True))
    u = 0.5 * torch.exp(-cu.log_vars.detach())
    w = bounded_rescale(u, 0.5, 1.5, 3.0)
    torch.testing.assert_close(cu.weights, w)
    assert cu.weights.sum().item() == pytest.approx(3.0)
    assert (cu.weights >= 0.5).all() and (cu.weights <= 1.5).all()
    torch.testing.assert_close(o.detach(), w * losses + u * losses + 0.5 * cu.log_vars.detach())
    torch.testing.assert_close(jacobian(cu, losses), torch.diag(w))  # w is a constant
    torch.testing.assert_close(grad_s(cu, losses), 0.5 - u * losses)  # s: the UW likelihood
    # the DWA term after two epochs: d = K softmax(r / T)
    for vals in ([1.0, 1.0, 1.0], [0.5, 1.0, 2.0]):
        cu(t(*vals))
        cu.end_epoch()
    cu(losses)
    d = 3 * torch.softmax(t(0.5, 1.0, 2.0) / 2.0, 0)
    torch.testing.assert_close(cu.weights, bounded_rescale(u * d, 0.5, 1.5, 3.0))
    for bad in ((0.0, 2.0), (1.2, 2.0), (0.5, 0.9)):
        with pytest.raises(ValueError, match="bounds"):
            ConstrainedUncertainty(2, bounds=bad)


def test_constrained_state_dict_round_trip():
    a = ConstrainedUncertainty(2, dtype=F64)
    for vals in ([1.0, 2.0], [0.5, 2.5], [0.4, 2.0]):
        a(t(*vals))
        a.end_epoch()
    b = ConstrainedUncertainty(2, dtype=F64)
    b.load_state_dict(a.state_dict())
    x = t(0.3, 1.0)
    torch.testing.assert_close(b(x), a(x))
    torch.testing.assert_close(b.weights, a.weights)
    with pytest.raises(ValueError, match="dwa"):
        b.load_state_dict({"parameters": [torch.zeros(2, dtype=F64)]})
