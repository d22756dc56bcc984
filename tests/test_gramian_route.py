"""The Gramian route: ``J Jᵀ`` without storing ``J``, and the weighted backward after it."""

from __future__ import annotations

import pytest
import torch
from conftest import batches, clone, examples, make_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mtl_optim
from mtl_optim import aggregators, weighting
from mtl_optim._streamed_gramian import streamed_gramian

F64 = torch.float64


def reference_gramian(losses, shared):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, shared)
                ]
            )
        )
    j = torch.stack(rows).to(F64)
    return j @ j.T


def assert_gramian(losses, shared):
    expected = reference_gramian(losses, shared)
    got = streamed_gramian(losses, shared)
    assert got.dtype == F64 and got.shape == expected.shape
    # Both sides compute the rows g_i in the losses' dtype, by different sequences of
    # operations, so an entry G_ij = g_i·g_j is exact only up to a few roundings of that dtype
    # relative to |g_i||g_j| (Cauchy–Schwarz), not to |G_ij|, which can cancel. Measured: at
    # most 2 eps·|g_i||g_j| on these models; the bound allows 8 eps·sqrt(d) for d parameters.
    eps = torch.finfo(losses[0].dtype).eps
    d = sum(p.numel() for p in shared)
    norms = expected.diagonal().clamp_min(0).sqrt()
    bound = 8 * eps * d**0.5 * torch.outer(norms, norms)
    assert ((got - expected).abs() <= bound).all(), (got - expected).abs() / bound


@settings(max_examples=examples(25))
@given(
    k=st.integers(1, 5),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_streamed_gramian_equals_j_jt_on_random_mlps(k, widths, batch, seed):
    torch.manual_seed(seed)
    layers, d_in = [], 3
    for w in widths:
        layers += [nn.Linear(d_in, w), nn.Tanh()]
        d_in = w
    trunk = nn.Sequential(*layers).to(F64)
    pair = nn.Linear(d_in, d_in).to(F64)  # shared by tasks 0 and 1 only
    unused = nn.Linear(2, 2).to(F64)  # in the shared list but reached by no loss
    heads = [nn.Linear(d_in, 2).to(F64) for _ in range(k)]
    x = torch.randn(batch, 3, dtype=F64)
    z = trunk(x)
    losses = [
        (h(torch.sin(pair(z)) if i < 2 else z) ** 2).mean() + 0.1 * i for i, h in enumerate(heads)
    ]
    shared = [*trunk.parameters(), *pair.parameters(), *unused.parameters()]
    assert_gramian(losses, shared)


def test_streamed_gramian_on_convolutions_with_batchnorm():
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.Flatten()
    ).to(F64)
    x = torch.randn(4, 1, 7, 7, dtype=F64)
    z = trunk(x)
    heads = [nn.Linear(z.shape[1], 1).to(F64) for _ in range(3)]
    assert_gramian([h(z).pow(2).mean() for h in heads], list(trunk.parameters()))


def test_streamed_gramian_with_tied_weights_and_direct_parameter_use():
    # One layer applied twice, its weight read directly by a loss and through w.t() and 3·w.
    torch.manual_seed(0)
    lin = nn.Linear(5, 5).to(F64)
    x = torch.randn(4, 5, dtype=F64)
    z = torch.tanh(lin(torch.tanh(lin(x))))
    w = lin.weight
    losses = [z[:, 0].pow(2).sum() + (w**2).sum(), (z @ w.t()).sum(), (w * 3).sum()]
    assert_gramian(losses, list(lin.parameters()))


def test_streamed_gramian_with_embedding_layernorm_and_unbound_float32_losses():
    torch.manual_seed(0)
    emb, norm = nn.Embedding(10, 6).to(F64), nn.LayerNorm(6).to(F64)
    z = norm(emb(torch.randint(0, 10, (5, 3)))).mean(1)
    assert_gramian(
        [z[:, 0].pow(2).sum(), z.sum(), z[:, 1].exp().sum()],
        [*emb.parameters(), *norm.parameters()],
    )
    lin = nn.Linear(6, 3)
    per_task = lin(torch.randn(4, 6)).pow(2).mean(0)
    assert_gramian(list(per_task.unbind()), list(lin.parameters()))


GRAMIAN_METHODS = {
    "MGDA": lambda: aggregators.MGDA(),
    "MGDA-loss+": lambda: aggregators.MGDA("loss+"),
    "NashMTL": lambda: aggregators.NashMTL(),
    "IMTLG": lambda: aggregators.IMTLG(),
    "CAGrad": lambda: aggregators.CAGrad(),
    "Mean": lambda: aggregators.Mean(),
    "Random": lambda: aggregators.Random(seed=3),
}


@pytest.mark.parametrize("name", sorted(GRAMIAN_METHODS))
@pytest.mark.parametrize("with_weighting", [False, True])
def test_gramian_route_trains_like_the_jacobian_route(name, with_weighting):
    k = 3
    model = make_model(k)
    twin = clone(model)
    opts = []
    for m, route in ((model, "jacobian"), (twin, "gramian")):
        w = weighting.ScaleInvariant() if with_weighting else None
        opts.append(
            mtl_optim.MTLOptimizer(
                m.parameters(),
                base=torch.optim.SGD,
                lr=0.05,
                aggregator=GRAMIAN_METHODS[name](),
                weighting=w,
                route=route,
            )
        )
    for x, ys in batches(k, 5):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            opt.backward(m.losses(x, ys))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(opts[1].last_weights, opts[0].last_weights)
        assert opts[1]._engine.jacobian is None  # J was never formed
        for opt in opts:
            opt.step()


def test_gramian_route_validation():
    params = list(make_model(2).parameters())
    with pytest.raises(ValueError, match="route"):
        mtl_optim.MTLOptimizer(params, route="fast")
    with pytest.raises(ValueError, match="Gramian"):
        mtl_optim.MTLOptimizer(params, aggregator=aggregators.PCGrad(seed=0), route="gramian")
    with pytest.raises(ValueError, match="Gramian"):
        mtl_optim.MTLOptimizer(params, route="gramian")
    with pytest.raises(ValueError, match="per-task gradients"):
        mtl_optim.AdaTask(params, aggregator=aggregators.MGDA(), route="gramian")


def test_gramian_route_skips_a_non_finite_batch():
    model = make_model(2)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(),
        base=torch.optim.SGD,
        lr=0.1,
        aggregator=aggregators.MGDA(),
        route="gramian",
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, ys = batches(2, 1)[0]
    x = x.clone()
    x[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.backward(model.losses(x, ys))
    opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
