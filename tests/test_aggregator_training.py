"""Aggregators inside the optimizer: training lowers every loss, AdaTask's per-task rows, the
Gramian route equals the Jacobian route, stateful aggregators resume bit for bit.

The properties every exported aggregator must have on sampled matrices are in
``test_aggregator_properties.py``; each method's own guarantees are in its ``test_<name>.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batches, clone, make_model, train_two_task
from helpers import randn

import mtl_optim
from mtl_optim.aggregators import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    ConFIG,
    DualProj,
    ExcessMTL,
    FairGrad,
    GradDrop,
    GradVac,
    MoCo,
    PCGrad,
    Random,
    SDMGrad,
    UPGrad,
)

#: name -> (fresh instance, the two-task problem is nonlinear); stateful methods need a fresh
#: instance per test
TRAINED = {
    "MGDA": (MGDA, False),
    "MGDA-l2": (lambda: MGDA("l2"), False),
    "PCGrad": (lambda: PCGrad(seed=0), False),
    "PCGrad-mean": (lambda: PCGrad("mean", seed=0), False),
    "IMTLG": (IMTLG, False),
    "CAGrad": (CAGrad, False),
    "Random": (lambda: Random(seed=0), False),
    "GradVac": (lambda: GradVac(seed=0), False),
    "GradDrop": (lambda: GradDrop(seed=0), False),
    "AlignedMTL": (AlignedMTL, False),
    "AlignedMTL-rmse": (lambda: AlignedMTL("rmse"), False),
    "UPGrad": (UPGrad, False),
    "DualProj": (DualProj, False),
    "ConFIG": (ConFIG, True),
    "FairGrad": (FairGrad, True),
    "MoCo": (MoCo, True),
    "SDMGrad": (SDMGrad, True),
    "ExcessMTL": (ExcessMTL, True),
}
#: aggregators whose per-task rows AdaTask trains with
ADATASK_ROWS = ["GradVac", "GradDrop", "AlignedMTL", "AlignedMTL-rmse", "UPGrad", "DualProj"]
GRAMIAN_ROUTE = ["UPGrad", "DualProj", "AlignedMTL", "GradVac", "ConFIG", "FairGrad", "SDMGrad"]


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_training_decreases_both_losses(name):
    make, nonlinear = TRAINED[name]

    def make_opt(model):
        return mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=make()
        )

    _, start, end = train_two_task(make_opt, nonlinear=nonlinear, steps=100)
    assert all(e < 0.1 * s for s, e in zip(start, end)), (start, end)


@pytest.mark.parametrize("name", ADATASK_ROWS)
def test_adatask_with_the_per_task_rows_decreases_both_losses(name):
    """AdaTask feeds row i of ``transform(J)`` to task i's own Adam moments."""

    def make_opt(model):
        return mtl_optim.AdaTask(model.parameters(), lr=0.02, aggregator=TRAINED[name][0]())

    _, start, end = train_two_task(make_opt, nonlinear=False, steps=100)
    assert all(e < 0.1 * s for s, e in zip(start, end)), (start, end)


@pytest.mark.parametrize("name", GRAMIAN_ROUTE)
def test_gramian_route_gives_the_jacobian_route_gradients(name):
    k = 3
    model = make_model(k)
    twin = clone(model)
    opts = [
        mtl_optim.MTLOptimizer(
            m.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=TRAINED[name][0](), route=r
        )
        for m, r in ((model, "jacobian"), (twin, "gramian"))
    ]
    for x, ys in batches(k, 4):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            opt.backward(m.losses(x, ys))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(opts[1].last_weights, opts[0].last_weights)
        for opt in opts:
            opt.step()


# ------------------------------------------------------------------------------------ state
STATEFUL = {
    "FairGrad": lambda: FairGrad(2.0),
    "MoCo": lambda: MoCo(rho=0.1),
    "SDMGrad": lambda: SDMGrad(),
    "ExcessMTL": lambda: ExcessMTL(robust_step_size=0.3),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_dict_round_trip_continues_bit_identically(name):
    agg = STATEFUL[name]()
    mats = [randn(10 + i, 3, 8) for i in range(6)]
    for j in mats[:3]:
        agg(j)
    state = agg.state_dict()
    snapshot = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    expected = [agg(j) for j in mats[3:]]
    for k, v in state.items():  # the state is a copy, untouched by the later calls
        assert torch.equal(v, snapshot[k]) if isinstance(v, torch.Tensor) else v == snapshot[k]
    resumed = STATEFUL[name]()
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed(j), e) for j, e in zip(mats[3:], expected))


@pytest.mark.parametrize("name", ["MoCo", "ExcessMTL"])
def test_optimizer_checkpoint_resumes_bit_identically(name):
    k = 3
    model = make_model(k)
    data = batches(k, 6)

    def make(m):
        return mtl_optim.MTLOptimizer(
            m.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=STATEFUL[name]()
        )

    def run(m, opt, chunk):
        for x, ys in chunk:
            opt.zero_grad()
            opt.backward(m.losses(x, ys))
            opt.step()

    opt = make(model)
    run(model, opt, data[:3])
    twin = clone(model)
    twin_opt = make(twin)
    twin_opt.load_state_dict(opt.state_dict())
    run(model, opt, data[3:])
    run(twin, twin_opt, data[3:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
