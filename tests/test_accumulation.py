"""Gradient accumulation: micro-batches give the one-large-batch update where that is true."""

from __future__ import annotations

import pytest
import torch
from conftest import batches, clone, make_model

import mtl_optim
from mtl_optim import aggregators, weighting

K = 3


def sgd(aggregator=None, weighting_=None):
    return lambda p: mtl_optim.MTLOptimizer(
        p, base=torch.optim.SGD, lr=0.05, aggregator=aggregator, weighting=weighting_
    )


# Exact: the combination is taken on the accumulated J, which equals the large batch's J when
# each micro-batch loss is divided by the number of micro-batches (and nothing depends on the
# micro-batch's loss values).
EXACT = {
    "none": sgd,
    "adatask-adam": lambda: lambda p: mtl_optim.AdaTask(p, base=torch.optim.Adam, lr=1e-2),
    "adatask-rmsprop": lambda: lambda p: mtl_optim.AdaTask(p, base=torch.optim.RMSprop, lr=1e-3),
    "mgda": lambda: sgd(aggregators.MGDA()),
    "nash": lambda: sgd(aggregators.NashMTL()),
    "pcgrad": lambda: sgd(aggregators.PCGrad(seed=0)),
    "imtlg": lambda: sgd(aggregators.IMTLG()),
    "cagrad": lambda: sgd(aggregators.CAGrad()),
    "mean": lambda: sgd(aggregators.Mean()),
    "rlw": lambda: sgd(weighting_=weighting.RLW(seed=0)),  # weights do not depend on losses
}


def train(factory, micro: int, steps: int = 6):
    model = make_model(K)
    opt = factory(model.parameters())
    for x, ys in batches(K, steps):
        opt.zero_grad()
        n = x.shape[0] // micro
        for m in range(micro):
            part = slice(m * n, (m + 1) * n)
            losses = model.losses(x[part], [y[part] for y in ys])
            opt.backward([loss / micro for loss in losses])
        opt.step()
    return model


@pytest.mark.parametrize("name", sorted(EXACT))
def test_micro_batches_equal_one_large_batch(name):
    whole = train(EXACT[name](), micro=1)
    accumulated = train(EXACT[name](), micro=4)
    for p, q in zip(accumulated.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_loss_dependent_weightings_weight_each_micro_batch_by_its_own_losses():
    # Documented: with a weighting that reads the loss values, every micro-batch enters with
    # its own ∂o/∂L, for the shared and the task-specific parameters alike. ScaleInvariant:
    # o = log L, so the accumulated gradient is Σ_m ∇L_m / L_m (not ∇L / L of the large batch).
    model = make_model(K)
    ref = clone(model)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(),
        base=torch.optim.SGD,
        lr=0.1,
        weighting=weighting.ScaleInvariant(),
        aggregator=aggregators.Sum(),
    )
    x, ys = batches(K, 1)[0]
    expected = [torch.zeros_like(p) for p in ref.parameters()]
    for m in range(2):
        part = slice(8 * m, 8 * (m + 1))
        opt.backward(model.losses(x[part], [y[part] for y in ys]))
        losses = ref.losses(x[part], [y[part] for y in ys])
        grads = torch.autograd.grad(sum(torch.log(v) for v in losses), list(ref.parameters()))
        expected = [e + g for e, g in zip(expected, grads)]
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
