"""The per-task gradient engine: detection, J, accumulation, weightings, representations."""

from __future__ import annotations

import pytest
import torch
from conftest import batches, examples, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mtl_optim
from mtl_optim.aggregators import MGDA, Mean, Sum
from mtl_optim.engine import TaskGradients, gramian, reachable_params
from mtl_optim.weighting import Weighting


class _Net(nn.Module):
    """Trunk shared by all tasks, a middle layer shared by tasks 0 and 1 only, one head each."""

    def __init__(self, k, widths, pair_shared, seed):
        super().__init__()
        torch.manual_seed(seed)
        layers, d = [], 3
        for w in widths:
            layers += [nn.Linear(d, w), nn.Tanh()]
            d = w
        self.trunk = nn.Sequential(*layers)
        self.pair = nn.Linear(d, d) if pair_shared else None
        self.heads = nn.ModuleList(nn.Linear(d, 1) for _ in range(k))
        self.unused = nn.Linear(2, 2)
        self.double()

    def losses(self, x):
        z = self.trunk(x)
        out = []
        for i, h in enumerate(self.heads):
            zi = torch.tanh(self.pair(z)) if self.pair is not None and i < 2 else z
            out.append((h(zi) ** 2).mean() * (i + 1))
        return out


@settings(max_examples=examples(25))
@given(
    k=st.integers(2, 4),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    pair_shared=st.booleans(),
    strategy=st.sampled_from(TaskGradients.STRATEGIES),
    seed=st.integers(0, 10_000),
)
def test_engine_matches_autograd_per_task(k, widths, pair_shared, strategy, seed):
    net = _Net(k, widths, pair_shared, seed)
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    opt = mtl_optim.MTLOptimizer(net.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=Sum())
    opt._engine.strategy = strategy
    opt.backward(net.losses(x))

    expected_shared = list(net.trunk.parameters()) + (
        list(net.pair.parameters()) if pair_shared else []
    )
    assert [id(p) for p in opt.shared_params] == [id(p) for p in expected_shared]
    assert net.unused.weight.grad is None

    losses = net.losses(x)
    jac = opt._engine.jacobian
    assert jac.shape == (k, sum(p.numel() for p in expected_shared))
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, expected_shared, retain_graph=True, allow_unused=True)
        row = torch.cat(
            [
                torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
                for g, p in zip(grads, expected_shared)
            ]
        )
        torch.testing.assert_close(jac[i], row, rtol=1e-10, atol=1e-12)
    total = sum(losses)
    params = list(net.parameters())[:-2]  # all but `unused`
    for p, g in zip(params, torch.autograd.grad(total, params)):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gramian(jac), jac @ jac.T)
    torch.testing.assert_close(gramian(jac.float()), (jac @ jac.T), rtol=1e-5, atol=1e-6)


def test_reachable_params_sees_only_the_losses_graph():
    model = make_model(2)
    x, ys = batches(2, 1)[0]
    losses = model.losses(x, ys)
    ids = reachable_params(losses[0])
    assert {id(p) for p in model.trunk.parameters()} <= ids
    assert {id(p) for p in model.heads[0].parameters()} <= ids
    assert not ({id(p) for p in model.heads[1].parameters()} & ids)


def test_explicit_shared_overrides_detection():
    model = make_model(2)
    x, ys = batches(2, 1)[0]
    first = list(model.trunk[0].parameters())
    opt = mtl_optim.MTLOptimizer(model.parameters(), shared=first, aggregator=Sum())
    opt.backward(model.losses(x, ys))
    assert [id(p) for p in opt.shared_params] == [id(p) for p in first]

    model = make_model(2)
    groups = [
        {"params": list(model.trunk[2].parameters()), "shared": True},
        {"params": list(model.trunk[0].parameters()) + list(model.heads.parameters())},
    ]
    opt = mtl_optim.MTLOptimizer(groups, aggregator=Sum())
    opt.backward(model.losses(x, ys))
    assert [id(p) for p in opt.shared_params] == [id(p) for p in model.trunk[2].parameters()]
    # a shared group added after training started joins the shared set at the next backward
    extra = nn.Parameter(torch.zeros(2, dtype=x.dtype))
    opt.add_param_group({"params": [extra], "shared": True})
    opt.zero_grad()
    opt.backward(model.losses(x, ys))
    assert [id(p) for p in opt.shared_params] == [
        id(p) for p in [*model.trunk[2].parameters(), extra]
    ]
    assert torch.equal(extra.grad, torch.zeros(2, dtype=x.dtype))  # no task reaches it


def test_accumulation_combines_the_accumulated_jacobian_and_keeps_external_grads():
    k = 3
    model = make_model(k)
    (x1, y1), (x2, y2) = batches(k, 2)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=Mean()
    )
    reg = sum((p**2).sum() for p in model.trunk.parameters())
    reg.backward()  # an external gradient on the shared parameters before the window
    external = [p.grad.clone() for p in model.trunk.parameters()]
    opt.backward(model.losses(x1, y1))
    j1 = opt._engine.jacobian.clone()
    opt.backward(model.losses(x2, y2))
    jac = opt._engine.jacobian
    torch.testing.assert_close(jac - j1, _jacobian(model, x2, y2), rtol=1e-10, atol=1e-12)
    combined = jac.mean(0)
    offset = 0
    for p, e in zip(model.trunk.parameters(), external):
        n = p.numel()
        torch.testing.assert_close(p.grad, e + combined[offset : offset + n].view_as(p))
        offset += n
    opt.step()
    assert opt._engine.jacobian is None  # a step starts a new window


def _jacobian(model, x, ys):
    shared = list(model.trunk.parameters())
    rows = []
    for loss in model.losses(x, ys):
        gs = torch.autograd.grad(loss, shared, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


class _Coupled(Weighting):
    """A weighting that mixes tasks, with a learnable temperature: o = softmax(L/τ)·L·K."""

    def __init__(self):
        self.tau = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, losses):
        w = torch.softmax(losses / self.tau, 0) * losses.numel()
        self.weights = w.detach()
        return w * losses


class _Record(Sum):
    """Sum that keeps the matrix it was given."""

    def weights(self, jacobian):
        self.seen = jacobian.clone()
        return super().weights(jacobian)


def test_weighting_is_applied_by_the_chain_rule():
    k = 3
    model = make_model(k)
    x, ys = batches(k, 1)[0]
    weighting, record = _Coupled(), _Record()
    params = list(model.parameters()) + [weighting.tau]
    opt = mtl_optim.MTLOptimizer(
        params, aggregator=record, weighting=weighting, shared=model.trunk.parameters()
    )
    opt.backward(model.losses(x, ys))

    objectives = weighting(torch.stack(model.losses(x, ys)))
    shared = list(model.trunk.parameters())
    for i in range(k):  # the aggregator sees the rows ∇θs o_i, not ∇θs L_i
        gs = torch.autograd.grad(objectives[i], shared, retain_graph=True)
        expected = torch.cat([g.reshape(-1) for g in gs])
        torch.testing.assert_close(record.seen[i], expected, rtol=1e-10, atol=1e-12)
    rest = list(model.heads.parameters()) + shared + [weighting.tau]
    for p, g in zip(rest, torch.autograd.grad(objectives.sum(), rest)):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.last_weights, weighting.weights)


@pytest.mark.parametrize("aggregator", [Sum(), Mean()])
def test_features_route_is_the_vjp_of_the_combined_representation_gradient(aggregator):
    k = 3
    model = make_model(k)
    ref = make_model(k)
    x, ys = batches(k, 1)[0]
    opt = mtl_optim.MTLOptimizer(model.parameters(), aggregator=aggregator)
    z = model.trunk(x)
    opt.backward([((h(z) - y) ** 2).mean() for h, y in zip(model.heads, ys)], features=z)
    losses = ref.losses(x, ys)
    scale = 1.0 if isinstance(aggregator, Sum) else 1.0 / k
    trunk = list(ref.trunk.parameters())
    heads = list(ref.heads.parameters())
    for p, g in zip(
        model.trunk.parameters(), torch.autograd.grad(scale * sum(losses), trunk, retain_graph=True)
    ):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    for p, g in zip(model.heads.parameters(), torch.autograd.grad(sum(losses), heads)):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


class _FirstRow(mtl_optim.aggregators.Aggregator):
    """Returns a view of J (legal for an aggregator)."""

    def forward(self, jacobian):
        return jacobian[0]


def test_grad_never_aliases_the_jacobian_buffer():
    k = 2
    model = make_model(k)
    (x1, y1), (x2, y2) = batches(k, 2)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=_FirstRow()
    )
    opt.backward(model.losses(x1, y1))
    first = [p.grad.clone() for p in model.trunk.parameters()]
    opt.step()
    opt.backward(model.losses(x2, y2))  # a new window; J is overwritten, .grad is rewritten
    jac = opt._engine.jacobian
    opt.zero_grad(set_to_none=False)
    assert torch.count_nonzero(jac[0]) == jac.shape[1]  # zeroing .grad did not zero J
    assert not all(torch.equal(a, p.grad) for a, p in zip(first, model.trunk.parameters()))


@pytest.mark.parametrize("route", ["jacobian", "gramian"])
@pytest.mark.parametrize("explicit", [False, True], ids=["detected", "shared="])
def test_heads_get_the_sum_gradient_bit_for_bit_with_external_grads_and_accumulation(
    explicit, route
):
    """Without a weighting the K per-task passes also fill the heads' ``.grad`` (the graph walk
    found the shared set) or a separate pass of the sum does (``shared=``): either way the
    heads hold exactly what ``backward`` of the summed losses leaves, on top of gradients
    already there (a regulariser's) and over two accumulated micro-batches."""
    model, ref = make_model(3), make_model(3)
    shared = list(model.trunk.parameters()) if explicit else None
    opt = mtl_optim.MTLOptimizer(model.parameters(), aggregator=MGDA(), shared=shared, route=route)
    assert opt._engine.folds_heads() is False  # decided at the first backward
    data = batches(3, 2, seed=7)
    for m in (model, ref):  # a regulariser's gradient on the heads before the window
        sum(h.weight.square().sum() for h in m.heads).backward()
    for x, ys in data:
        opt.backward(model.losses(x, ys))
        sum(ref.losses(x, ys)).backward()
    assert opt._engine.folds_heads() is not explicit
    for h, g in zip(model.heads, ref.heads):
        for p, q in zip(h.parameters(), g.parameters()):
            assert torch.equal(p.grad, q.grad)
