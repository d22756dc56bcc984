"""ScaleInvariant, RLW, DWA and IGB: hand-computed weights, gradients, checkpoints, training."""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import TwoTask, jacobian, leaf, t, train_two_task

import mtl_optim
from mtl_optim.weighting._dwa import DWA
from mtl_optim.weighting._igb import IGB
from mtl_optim.weighting._rlw import RLW
from mtl_optim.weighting._scale_invariant import ScaleInvariant

F64 = torch.float64


def softmax_by_hand(xs: list[float]) -> list[float]:
    e = [math.exp(v) for v in xs]
    return [v / sum(e) for v in e]


# --- ScaleInvariant ----------------------------------------------------------------------
def test_scale_invariant_objectives_gradient_and_guards():
    si = ScaleInvariant()
    losses = t(0.5, 2.0, 4.0)
    o = si(losses.clone().requires_grad_(True))
    torch.testing.assert_close(o.detach(), t(math.log(0.5), math.log(2.0), math.log(4.0)))
    torch.testing.assert_close(si.weights, torch.ones(3, dtype=F64))
    torch.testing.assert_close(jacobian(si, losses), torch.diag(1 / losses))
    # a zero loss is floored at eps, not -inf, and gets no gradient
    o = si(leaf(0.0, 1.0))
    assert o[0].item() == pytest.approx(math.log(1e-8)) and torch.isfinite(o).all()
    torch.testing.assert_close(jacobian(si, t(0.0, 1.0)), torch.diag(t(0.0, 1.0)))
    with pytest.raises(ValueError, match=">= 0"):
        si(leaf(1.0, -0.1))
    with pytest.raises(ValueError, match="eps"):
        ScaleInvariant(eps=0.0)
    assert repr(si) == "ScaleInvariant(eps=1e-08)"
    assert si.state_dict() == {}


# --- RLW ---------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["normal", "dirichlet"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_rlw_weights_sum_to_scale_and_the_seed_reproduces_the_draws(distribution, scale):
    a = RLW(distribution, scale=scale, seed=7)
    b = RLW(distribution, scale=scale, seed=7)
    c = RLW(distribution, scale=scale, seed=8)
    losses = t(1.0, 2.0, 3.0)
    draws_a, draws_c = [], []
    for _ in range(5):
        xa = losses.clone().requires_grad_(True)
        oa = a(xa)
        b(losses.clone().requires_grad_(True))
        c(losses.clone().requires_grad_(True))
        assert a.weights.sum().item() == pytest.approx(scale, rel=1e-12)
        assert (a.weights > 0).all()
        torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
        torch.testing.assert_close(oa.detach(), a.weights * losses)
        rows = [torch.autograd.grad(oi, xa, retain_graph=True)[0] for oi in oa.unbind()]
        torch.testing.assert_close(torch.stack(rows), torch.diag(a.weights))  # constant weights
        draws_a.append(a.weights)
        draws_c.append(c.weights)
    assert not torch.allclose(draws_a[0], draws_a[1])  # fresh weights every call
    assert not torch.allclose(torch.stack(draws_a), torch.stack(draws_c))


def test_rlw_normal_matches_softmax_of_the_generator_draws():
    rlw = RLW(seed=3, scale=2.0)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        rlw(leaf(1.0, 1.0, 1.0, 1.0))
        z = torch.randn(4, generator=g, dtype=F64)
        torch.testing.assert_close(rlw.weights, 2.0 * torch.softmax(z, 0))
    x = leaf(1.0, 2.0)
    o = rlw(x)
    (grad,) = torch.autograd.grad(o.sum(), x)
    torch.testing.assert_close(grad, rlw.weights)  # the weights are constants


def test_rlw_state_dict_round_trip_draws_the_same_weights():
    rlw = RLW("dirichlet", seed=11)
    for _ in range(3):
        rlw(leaf(1.0, 2.0, 3.0))
    state = rlw.state_dict()
    ahead = []
    for _ in range(4):
        rlw(leaf(1.0, 2.0, 3.0))
        ahead.append(rlw.weights)
    resumed = RLW("dirichlet", seed=999)
    resumed.load_state_dict(state)
    for w in ahead:
        resumed(leaf(1.0, 2.0, 3.0))
        torch.testing.assert_close(resumed.weights, w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="generator"):
        resumed.load_state_dict({})
    with pytest.raises(ValueError, match="distribution"):
        RLW("uniform")
    with pytest.raises(ValueError, match="scale"):
        RLW(scale=-1.0)
    assert repr(RLW()) == "RLW(distribution='normal', scale=1.0, seed=None)"


# --- DWA ---------------------------------------------------------------------------------
def test_dwa_uniform_for_two_epochs_then_the_formula_by_hand():
    dwa = DWA()  # T = 2
    # epoch 0: task means (2, 4); epoch 1: (1, 3)
    for batch in ((1.0, 3.0), (3.0, 5.0)):
        dwa(leaf(*batch))
        torch.testing.assert_close(dwa.weights, torch.ones(2, dtype=F64))
    dwa.end_epoch()
    for batch in ((0.5, 2.0), (1.5, 4.0)):
        dwa(leaf(*batch))
        torch.testing.assert_close(dwa.weights, torch.ones(2, dtype=F64))
    dwa.end_epoch()
    # epoch 2: r = (1/2, 3/4), w = 2 softmax(r / 2)
    expected = [2 * p for p in softmax_by_hand([0.5 / 2, 0.75 / 2])]
    x = leaf(0.8, 2.5)
    o = dwa(x)
    torch.testing.assert_close(dwa.weights, t(*expected))
    torch.testing.assert_close(o.detach(), t(expected[0] * 0.8, expected[1] * 2.5))
    torch.testing.assert_close(jacobian(dwa, t(0.8, 2.5)), torch.diag(t(*expected)))
    dwa(leaf(1.2, 2.5))  # the weights are constant within an epoch
    torch.testing.assert_close(dwa.weights, t(*expected))
    dwa.end_epoch()  # the epoch-2 means average all 3 calls (jacobian() is one of them)
    m2 = [(0.8 + 0.8 + 1.2) / 3, 2.5]
    expected = [2 * p for p in softmax_by_hand([m2[0] / 1.0 / 2, m2[1] / 3.0 / 2])]
    dwa(leaf(1.0, 1.0))
    torch.testing.assert_close(dwa.weights, t(*expected))
    assert dwa.weights.sum().item() == pytest.approx(2.0)


def test_dwa_empty_epoch_is_not_counted_and_temperature_matters():
    dwa = DWA(temperature=0.5)
    dwa.end_epoch()  # nothing seen: not an epoch
    for means in ((4.0, 1.0), (1.0, 1.0)):
        dwa(leaf(*means))
        dwa.end_epoch()
        dwa.end_epoch()
    assert dwa.epochs == 2
    dwa(leaf(1.0, 1.0))
    expected = [2 * p for p in softmax_by_hand([0.25 / 0.5, 1.0 / 0.5])]
    torch.testing.assert_close(dwa.weights, t(*expected))
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0.0)
    assert repr(DWA()) == "DWA(temperature=2.0)"


def test_dwa_state_dict_round_trip():
    gen = torch.Generator().manual_seed(0)
    seq = [torch.rand(3, generator=gen, dtype=F64) + 0.1 for _ in range(20)]
    a = DWA()
    for i, x in enumerate(seq[:11]):
        a(x.clone().requires_grad_(True))
        if i % 4 == 3:
            a.end_epoch()
    b = DWA()
    b.load_state_dict(a.state_dict())
    for i, x in enumerate(seq[11:], start=11):
        a(x.clone().requires_grad_(True))
        b(x.clone().requires_grad_(True))
        torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
        if i % 4 == 3:
            a.end_epoch()
            b.end_epoch()
    assert not torch.equal(a.weights, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="history"):
        b.load_state_dict({})


# --- IGB ---------------------------------------------------------------------------------
def test_igb_si_until_the_base_epoch_then_softmax_of_the_ratio():
    igb = IGB()  # base_epoch = 1
    for epoch in ([(2.0, 8.0), (4.0, 4.0)], [(1.0, 6.0), (3.0, 2.0)]):
        for batch in epoch:
            x = leaf(*batch)
            o = igb(x)
            torch.testing.assert_close(igb.weights, torch.ones(2, dtype=F64))
            torch.testing.assert_close(o.detach(), torch.log(t(*batch)))
        assert igb.base_losses is None
        igb.end_epoch()
    torch.testing.assert_close(igb.base_losses, t(2.0, 4.0))  # means of epoch 1, not epoch 0
    cur = (1.0, 1.0)
    expected = [2 * p for p in softmax_by_hand([1.0 / 2.0, 1.0 / 4.0])]
    o = igb(leaf(*cur))
    torch.testing.assert_close(igb.weights, t(*expected))
    torch.testing.assert_close(o.detach(), t(*expected) * torch.log(t(*cur)))
    assert igb.weights.sum().item() == pytest.approx(2.0)
    cur = (3.0, 0.5)
    expected = [2 * p for p in softmax_by_hand([3.0 / 2.0, 0.5 / 4.0])]
    jac = jacobian(igb, t(*cur))
    torch.testing.assert_close(igb.weights, t(*expected))
    # d o_i / d L_i = w_i / L_i: the weights are constants
    torch.testing.assert_close(jac, torch.diag(t(expected[0] / 3.0, expected[1] / 0.5)))
    igb.end_epoch()
    igb.end_epoch()  # later epochs leave the base losses alone
    torch.testing.assert_close(igb.base_losses, t(2.0, 4.0))


def test_igb_base_epoch_zero_guards_and_repr():
    igb = IGB(base_epoch=0)
    igb(leaf(1.0, 3.0))
    igb(leaf(3.0, 1.0))
    igb.end_epoch()
    torch.testing.assert_close(igb.base_losses, t(2.0, 2.0))
    o = igb(leaf(0.0, 2.0))  # a zero loss: the log is floored, no -inf
    assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match=">= 0"):
        igb(leaf(-1.0, 2.0))
    with pytest.raises(ValueError, match="got 3"):
        igb(leaf(1.0, 2.0, 3.0))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="base_epoch"):
            IGB(base_epoch=bad)
    assert repr(IGB()) == "IGB(base_epoch=1, eps=1e-08)"


def test_igb_state_dict_round_trip():
    gen = torch.Generator().manual_seed(1)
    seq = [torch.rand(3, generator=gen, dtype=F64) + 0.1 for _ in range(16)]
    for cut in (3, 6, 10):  # before, inside and after the base epoch
        a = IGB()
        for i, x in enumerate(seq[:cut]):
            a(x.clone().requires_grad_(True))
            if i % 3 == 2:
                a.end_epoch()
        b = IGB()
        b.load_state_dict(a.state_dict())
        for i, x in enumerate(seq[cut:], start=cut):
            oa = a(x.clone().requires_grad_(True))
            ob = b(x.clone().requires_grad_(True))
            torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
            torch.testing.assert_close(oa, ob, rtol=0, atol=0)
            if i % 3 == 2:
                a.end_epoch()
                b.end_epoch()
        assert a.base_losses is not None and a.epochs == b.epochs
    with pytest.raises(ValueError, match="unexpected|base_losses"):
        IGB().load_state_dict({"x": 1})


# --- through the optimizer --------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [ScaleInvariant, lambda: RLW(seed=0), lambda: RLW("dirichlet", scale=2.0, seed=0), DWA, IGB],
    ids=["SI", "RLW-normal", "RLW-dirichlet", "DWA", "IGB"],
)
def test_training_through_the_optimizer_decreases_both_losses(make):
    weighting = make()

    def make_opt(model):
        return mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.Adam, lr=1e-2, weighting=weighting
        )

    opt, first, last = train_two_task(make_opt, nonlinear=True, steps=150, epoch_every=10)
    assert all(b < 0.5 * a for a, b in zip(first, last)), (first, last)
    assert opt.last_weights is not None and opt.last_weights.shape == (2,)
    if isinstance(weighting, (DWA, IGB)):
        assert not torch.equal(opt.last_weights, torch.ones(2, dtype=F64))


@pytest.mark.parametrize("make", [lambda: RLW(seed=5), DWA, IGB], ids=["RLW", "DWA", "IGB"])
def test_optimizer_checkpoint_through_torch_save_resumes_the_weights(make):
    def run(opt, model, x, ys, steps):
        out = []
        for step in steps:
            opt.zero_grad()
            opt.backward([((o - y) ** 2).mean() for o, y in zip(model(x), ys)])
            opt.step()
            out.append(opt.last_weights.clone())
            if step % 3 == 2:
                opt.end_epoch()
        return out

    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    x = torch.randn(16, 4, dtype=F64)
    ys = [x[:, 0], x[:, 1] ** 2]
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.Adam, lr=1e-2, weighting=make()
    )
    run(opt, model, x, ys, range(7))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    ref = run(opt, model, x, ys, range(7, 14))
    model2 = TwoTask(nonlinear=True).double()
    model2.load_state_dict(ckpt["model"])
    opt2 = mtl_optim.MTLOptimizer(
        model2.parameters(), base=torch.optim.Adam, lr=1e-2, weighting=make()
    )
    opt2.load_state_dict(ckpt["opt"])
    got = run(opt2, model2, x, ys, range(7, 14))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
