"""The hooks between ``MTLOptimizer`` and a weighting, and the separable fast path."""

from __future__ import annotations

import pytest
import torch
from conftest import batches, make_model

import mtl_optim
from benchmarks.methods import default_instance, exported
from mtl_optim import weighting

F64 = torch.float64


def instances(k: int):
    """A default instance of every exported weighting, for K tasks."""
    return {
        name: default_instance(cls, k, steps_per_epoch=2, dtype=F64)
        for name, cls in exported(weighting).items()
    }


@pytest.mark.parametrize("name", sorted(instances(3)))
def test_separable_weightings_have_a_diagonal_jacobian(name):
    # The optimizer takes ∂o/∂L from one reverse pass when `separable` is set: check that the
    # full Jacobian of the objectives really is diagonal, after a few epochs of state.
    w = instances(3)[name]
    if not w.separable:
        pytest.skip(f"{name} is not separable")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for _ in range(2):
            losses = torch.rand(3, generator=g, dtype=F64) + 0.5
            w(losses.clone())
        w.end_epoch()
    losses = torch.rand(3, generator=g, dtype=F64) + 0.5

    def objectives(values):
        return w(values)

    jac = torch.autograd.functional.jacobian(objectives, losses)
    off = jac - torch.diag(jac.diagonal())
    assert torch.count_nonzero(off) == 0, f"{name}: ∂o/∂L has off-diagonal entries\n{jac}"


class _Recorder(weighting.Weighting):
    """Records every hook call; objectives are the losses themselves."""

    needs_jacobian = True

    def __init__(self):
        self.calls = []

    def attach(self, optimizer):
        self.calls.append(("attach", optimizer))

    def forward(self, losses):
        return losses * 1.0

    def observe(self, jacobian):
        self.calls.append(("observe", jacobian.shape))
        return 2.0 * jacobian  # the optimizer must use what observe returns

    def after_step(self):
        self.calls.append(("after_step",))

    def post_step(self, losses):
        self.calls.append(("post_step", losses.clone()))


def test_hooks_are_called_in_order_and_observe_feeds_the_combination():
    k = 2
    model = make_model(k)
    rec = _Recorder()
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.1, weighting=rec)
    assert rec.calls == [("attach", opt)]
    x, ys = batches(k, 1)[0]
    losses = model.losses(x, ys)
    total = torch.autograd.grad(sum(losses), list(model.trunk.parameters()), retain_graph=True)
    opt.backward(losses)
    for p, g in zip(model.trunk.parameters(), total):
        torch.testing.assert_close(p.grad, 2.0 * g)  # observe() doubled every row
    opt.step()
    with torch.no_grad():
        opt.update_weighting(model.losses(x, ys))
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["attach", "observe", "after_step", "post_step"]
    assert rec.calls[-1][1].shape == (k,)


def test_after_step_is_not_called_for_a_skipped_step_and_update_weighting_validates():
    k = 2
    model = make_model(k)
    rec = _Recorder()
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.1, weighting=rec)
    x, ys = batches(k, 1)[0]
    opt.backward(model.losses(x, ys))  # a normal step first: K is known from here on
    opt.step()
    rec.calls.clear()
    losses = model.losses(x, ys)
    bad = [losses[0] * float("nan"), losses[1]]
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.backward(bad)
    opt.step()
    assert "after_step" not in [c[0] for c in rec.calls]
    with pytest.raises(ValueError, match="losses"):
        opt.update_weighting([torch.tensor(1.0)])  # K is 2
    with pytest.warns(RuntimeWarning, match="ignored"):
        opt.update_weighting([torch.tensor(float("inf")), torch.tensor(1.0)])
    assert "post_step" not in [c[0] for c in rec.calls]
