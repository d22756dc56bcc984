"""``route="auto"`` (the default): which route it takes, and that it changes no numbers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtl_optim
from mtl_optim import _streamed_gramian as streamed
from mtl_optim import aggregators, weighting

K = 3


class Net(nn.Module):
    """A trunk of ``depth`` Linear layers and K heads."""

    def __init__(self, width: int, d_in: int = 8, depth: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.Tanh()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, 2) for _ in range(K))

    def losses(self, x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [(h(z) - y).pow(2).mean() for h, y in zip(self.heads, ys)]


def data(batch: int, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, generator=g), [
        torch.randn(batch, 2, generator=g) for _ in range(K)
    ]


WIDE = dict(width=128, batch=4)  # wide layers, 4 rows: the Gramian is cheaper from activations
NARROW = dict(width=8, batch=64)  # narrow layers, many rows: forming J is cheaper


def routes_taken(opt) -> list[str]:
    """Record, per backward, whether J was formed (a hook that does not ask for it)."""
    taken: list[str] = []
    opt.register_gradient_hook(
        lambda o, info: taken.append("jacobian" if info.jacobian is not None else "gramian"),
        needs_jacobian=False,
    )
    return taken


def train(width, batch, route=None, steps=3, accumulate=1, make=None, depth=2, **kw):
    net = Net(width, depth=depth)
    make = make or (lambda p, **a: mtl_optim.MTLOptimizer(p, **a))
    args = dict(base=torch.optim.SGD, lr=0.05, aggregator=aggregators.UPGrad(), **kw)
    if route is not None:
        args["route"] = route
    opt = make(net.parameters(), **args)
    taken = routes_taken(opt)
    grads = []
    for step in range(steps):
        opt.zero_grad()
        for micro in range(accumulate):
            x, ys = data(batch, seed=10 * step + micro)
            opt.backward(net.losses(x, ys))
        grads.append([p.grad.clone() for p in net.parameters()])
        opt.step()
    return net, opt, taken, grads


def test_auto_is_the_default_and_validated():
    params = list(Net(8).parameters())
    assert mtl_optim.MTLOptimizer(params).route == "auto"
    with pytest.raises(ValueError, match="'auto', 'jacobian' or 'gramian'"):
        mtl_optim.MTLOptimizer(params, route="fast")


def test_auto_takes_the_gramian_route_on_wide_layers_with_the_jacobian_routes_gradients():
    net, _, taken, grads = train(**WIDE)
    ref, _, ref_taken, ref_grads = train(**WIDE, route="jacobian")
    assert taken == ["gramian"] * 3 and ref_taken == ["jacobian"] * 3
    for got, want in zip(grads, ref_grads):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * w.abs().max())


def test_auto_takes_the_jacobian_route_on_narrow_layers_with_the_same_numbers():
    net, _, taken, _ = train(**NARROW)
    ref, _, _, _ = train(**NARROW, route="jacobian")
    assert taken == ["jacobian"] * 3
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)  # the Jacobian route: today's numbers, bit for bit


class ReplacedCombine(mtl_optim.MTLOptimizer):
    def combine(self, jacobian: torch.Tensor) -> torch.Tensor:
        return super().combine(jacobian)


@pytest.mark.parametrize(
    "setup",
    ["pcgrad", "adatask", "gradnorm", "hook", "subclass"],
)
def test_auto_forms_j_wherever_the_gramian_route_is_not_allowed(setup):
    net = Net(**{"width": WIDE["width"]})
    x, ys = data(WIDE["batch"])
    params = net.parameters()
    kw = dict(base=torch.optim.SGD, lr=0.05)
    if setup == "pcgrad":
        opt = mtl_optim.MTLOptimizer(params, aggregator=aggregators.PCGrad(seed=0), **kw)
    elif setup == "adatask":
        opt = mtl_optim.AdaTask(params, aggregator=aggregators.UPGrad(), lr=0.05)
    elif setup == "gradnorm":
        opt = mtl_optim.MTLOptimizer(
            params, aggregator=aggregators.UPGrad(), weighting=weighting.GradNorm(K), **kw
        )
    elif setup == "subclass":
        opt = ReplacedCombine(params, aggregator=aggregators.UPGrad(), **kw)
    else:
        opt = mtl_optim.MTLOptimizer(params, aggregator=aggregators.UPGrad(), **kw)
        opt.register_gradient_hook(lambda o, info: None, needs_jacobian=True)
    taken = routes_taken(opt)
    opt.backward(net.losses(x, ys))
    assert taken == ["jacobian"]


def test_accumulation_under_auto_combines_the_accumulated_batch_like_the_jacobian_route():
    # the first micro-batch of a window takes the Gramian route; the second one rebuilds that
    # batch's rows and continues in J: the combination is over the whole window, as in the
    # Jacobian route, and later windows form J from the start
    net, opt, taken, grads = train(**WIDE, accumulate=2)
    ref, _, _, ref_grads = train(**WIDE, route="jacobian", accumulate=2)
    assert taken == ["gramian", "jacobian", "jacobian", "jacobian", "jacobian", "jacobian"]
    for got, want in zip(grads, ref_grads):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * w.abs().max())


def test_explicit_gramian_route_keeps_its_per_micro_batch_combination():
    _, _, taken, grads = train(**WIDE, route="gramian", accumulate=2, steps=1)
    _, _, _, ref = train(**WIDE, route="jacobian", accumulate=2, steps=1)
    assert taken == ["gramian", "gramian"]
    assert any(not torch.allclose(g, w, rtol=1e-3) for g, w in zip(grads[0], ref[0]))


def test_auto_takes_the_gramian_route_when_j_would_not_fit(monkeypatch):
    # four layers: the Gramian route holds one layer's rows and the activations' gradients,
    # well under half of J; with the trick disabled it has no time advantage left
    deep = dict(**WIDE, depth=4, steps=1)
    monkeypatch.setattr(streamed, "_TRICK_MAX_ELEMENTS", 0)
    assert train(**deep)[2] == ["jacobian"]
    monkeypatch.setattr(streamed, "_J_MEMORY_FLOOR", 0)
    monkeypatch.setattr(streamed, "_available_bytes", lambda device: 1024)
    _, _, taken, grads = train(**deep)
    _, _, _, ref = train(**deep, route="jacobian")
    assert taken == ["gramian"]
    for g, w in zip(grads[0], ref[0]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * w.abs().max())
    monkeypatch.setattr(streamed, "_available_bytes", lambda device: None)  # unknown: keep J
    assert train(**deep)[2] == ["jacobian"]
    monkeypatch.setattr(streamed, "_available_bytes", lambda device: 1 << 40)  # J fits
    assert train(**deep)[2] == ["jacobian"]


def test_route_costs_prefer_the_gramian_route_only_for_wide_layers_and_few_rows():
    for cfg, want in ((WIDE, True), (NARROW, False)):
        net = Net(cfg["width"])
        x, ys = data(cfg["batch"])
        shared = list(net.trunk.parameters())
        assert streamed.prefers_gramian(net.losses(x, ys), shared, torch.float32) is want


def test_auto_state_dict_round_trip_keeps_the_route():
    net, opt, _, _ = train(**WIDE, steps=1)
    twin = copy.deepcopy(net)
    fresh = mtl_optim.MTLOptimizer(
        twin.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=aggregators.UPGrad()
    )
    fresh.load_state_dict(opt.state_dict())
    assert fresh.route == "auto"
