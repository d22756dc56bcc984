"""Loss weightings inside the optimizer: training lowers both losses and moves what each
method learns, checkpoints resume bit for bit, separable weightings have a diagonal ∂o/∂L.

Each method's own formulas are tested in its ``test_<name>.py``; the hooks every weighting
must honour in ``test_weighting_protocol.py``.
"""

from __future__ import annotations

import io

import pytest
import torch
from conftest import F64, TwoTask, assert_weighting_resumes, jacobian, t, train_two_task

import mtl_optim
from mtl_optim.weighting import (
    DBMTL,
    DWA,
    FAMO,
    GLS,
    IGB,
    RLW,
    STCH,
    ConstrainedUncertainty,
    GradNorm,
    GroupedUncertainty,
    ScaleInvariant,
    Uncertainty,
)


# --- loss-only weightings ---------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [ScaleInvariant, lambda: RLW(seed=0), lambda: RLW("dirichlet", scale=2.0, seed=0), DWA, IGB],
    ids=["SI", "RLW-normal", "RLW-dirichlet", "DWA", "IGB"],
)
def test_loss_only_weightings_train_through_the_optimizer(make):
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
def test_loss_only_weightings_resume_through_torch_save(make):
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


# --- learnable weightings --------------------------------------------------------------
LEARNABLE = {
    "UW": lambda: Uncertainty(2, dtype=F64),
    "UW-factors-clip": lambda: Uncertainty(2, factors=(1.0, 2.0), clip=(-2.0, 2.0), dtype=F64),
    "GALW-fixed": lambda: GroupedUncertainty([[0, 1]], dtype=F64),
    "GALW-auto": lambda: GroupedUncertainty(num_tasks=2, n_groups=2, dtype=F64),
    "Constrained": lambda: ConstrainedUncertainty(2, dtype=F64),
    "GLS": GLS,
}


@pytest.mark.parametrize("name", list(LEARNABLE))
def test_learnable_weightings_train_their_parameters(name):
    weighting = LEARNABLE[name]()
    start = [p.detach().clone() for p in weighting.parameters()]

    def make_opt(model):
        return mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.Adam, lr=1e-2, weighting=weighting
        )

    opt, first, last = train_two_task(make_opt, nonlinear=True, steps=150, epoch_every=10)
    assert all(b < 0.5 * a for a, b in zip(first, last)), (first, last)
    assert opt.last_weights is not None and opt.last_weights.shape == (2,)
    for p, p0 in zip(weighting.parameters(), start):
        assert not torch.equal(p.detach(), p0)  # the log-variances were trained


@pytest.mark.parametrize("name", [n for n in LEARNABLE if n != "GLS"])
def test_learnable_weightings_resume_bit_identically(name):
    def record(opt):
        params = [p.detach().flatten() for p in opt.weighting.parameters()]
        return torch.cat([opt.last_weights, *params])

    def scramble(opt):
        with torch.no_grad():
            for p in opt.weighting.parameters():
                p.fill_(7.0)  # overwritten by the checkpoint

    _, opt2 = assert_weighting_resumes(LEARNABLE[name], record, scramble)
    assert opt2.state[opt2.weighting.parameters()[0]]  # the Adam state of s is restored


# --- gradient-aware and scalarizing weightings ------------------------------------------
def _active_stch() -> STCH:
    stch = STCH(mu=0.7, warmup_epoch=0)
    stch.nadir = t(2.0, 1.0, 0.5)
    return stch


@pytest.mark.parametrize(
    "make",
    [lambda: GradNorm(3, dtype=F64), lambda: FAMO(3, dtype=F64), _active_stch, DBMTL],
    ids=["GradNorm", "FAMO", "STCH", "DBMTL"],
)
def test_separable_objectives_have_a_diagonal_loss_jacobian(make):
    weighting = make()
    assert weighting.separable  # the optimizer then takes ∂o/∂L from one reverse pass
    mix = jacobian(weighting, t(0.3, 1.7, 4.0))
    assert torch.equal(mix, torch.diag(torch.diagonal(mix)))
    assert (torch.diagonal(mix) > 0).all()


def train(make_opt):
    """A 150-step run of the nonlinear two-task problem, epochs of 10 steps."""
    return train_two_task(make_opt, nonlinear=True, steps=150, epoch_every=10)


GRADIENT_AWARE = {
    "GradNorm": lambda: GradNorm(2, dtype=F64),
    "GradNorm-epoch": lambda: GradNorm(2, initial="epoch", dtype=F64),
    "FAMO": lambda: FAMO(2, dtype=F64),
    "STCH": lambda: STCH(warmup_epoch=1),
    "DBMTL": DBMTL,
}


@pytest.mark.parametrize("name", list(GRADIENT_AWARE))
def test_gradient_aware_weightings_train_through_the_optimizer(name):
    weighting = GRADIENT_AWARE[name]()

    def make_opt(model):
        return mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.Adam, lr=1e-2, weighting=weighting
        )

    opt, first, last = train(make_opt)
    assert all(b < 0.5 * a for a, b in zip(first, last)), (first, last)
    assert opt.last_weights is not None and opt.last_weights.shape == (2,)
    if isinstance(weighting, (GradNorm, STCH)):
        assert not torch.allclose(opt.last_weights, torch.ones(2, dtype=F64))
    if isinstance(weighting, GradNorm):
        assert weighting.loss_weights.sum().item() == pytest.approx(2.0)
    if isinstance(weighting, FAMO):
        assert not torch.equal(weighting.logits, torch.zeros(2, dtype=F64))


def signature(weighting) -> torch.Tensor:
    """The state each method moves: learned weights, logits, rescaling factors."""
    if isinstance(weighting, GradNorm):
        return weighting.loss_weights.detach().clone()
    if isinstance(weighting, FAMO):
        return weighting.logits.detach().clone()
    if isinstance(weighting, DBMTL):
        return weighting.scales.clone()
    return weighting.weights.clone()


@pytest.mark.parametrize("name", list(GRADIENT_AWARE))
def test_gradient_aware_weightings_resume_bit_identically(name):
    assert_weighting_resumes(
        GRADIENT_AWARE[name], lambda opt: torch.cat([opt.last_weights, signature(opt.weighting)])
    )
