"""TaskDominance: the AU/rAU metric against a direct computation."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from conftest import batches, make_model

import mtl_optim
from mtl_optim.aggregators import Mean, Sum
from mtl_optim.diagnostics import TaskDominance

matplotlib.use("Agg")


def test_adatask_au_is_the_ema_of_each_tasks_squared_step():
    k = 3
    model = make_model(k)
    opt = mtl_optim.AdaTask(model.parameters(), lr=0.01, betas=(0.9, 0.99))
    dom = TaskDominance(opt, names=model.named_parameters())
    au = None
    for x, ys in batches(k, 5):
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        # the per-task steps, recomputed from the state the step is about to use
        before = [p.detach().clone() for p in model.trunk.parameters()]
        opt.step()
        steps = torch.cat(
            [s.view(k, -1) for s in (_task_steps(opt, p) for p in model.trunk.parameters())], dim=1
        )
        au = (1 - 0.99) * steps**2 if au is None else 0.99 * au + (1 - 0.99) * steps**2
        moved = torch.cat(
            [(p.detach() - b).reshape(-1) for p, b in zip(model.trunk.parameters(), before)]
        )
        torch.testing.assert_close(steps.sum(0), moved, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(dom.au, au, rtol=1e-10, atol=1e-20)
    rel = dom.relative()
    torch.testing.assert_close(rel.sum(0), torch.ones(rel.shape[1], dtype=rel.dtype))
    layers = dom.layers()
    assert list(layers) == ["trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias"]
    assert all(v["mean_rau"].shape == (k,) for v in layers.values())
    fig = dom.plot(task_names=["a", "b", "c"])
    assert fig.axes[0].get_title() == "task dominance (mean rAU)"


def _task_steps(opt, p):
    """Task i's Adam step on p from its moments (the update AdaTask just applied)."""
    st = opt.task_state(p)
    group = opt.param_groups[0]
    b1, b2 = group["betas"]
    t = float(st["step"])
    denom = st["exp_avg_sq"].sqrt() / (1 - b2**t) ** 0.5 + group["eps"]
    return -group["lr"] / (1 - b1**t) * st["exp_avg"] / denom


def test_adam_attribution_uses_task_moments_and_adams_shared_second_moment():
    k = 2
    model = make_model(k)
    opt = mtl_optim.MTLOptimizer(model.parameters(), lr=0.01, aggregator=Sum())
    captured = []
    dom = TaskDominance(opt, beta=0.0)  # beta 0: AU is the last squared attributable step
    dom_observe = dom._observe
    dom._observe = lambda s, u: (captured.append(u.clone()), dom_observe(s, u))
    trunk = list(model.trunk.parameters())
    m = None
    for t, (x, ys) in enumerate(batches(k, 4), start=1):
        opt.zero_grad()
        losses = model.losses(x, ys)
        jac = torch.stack(
            [
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(loss, trunk, retain_graph=True)]
                )
                for loss in losses
            ]
        )
        opt.backward(losses)
        before = torch.cat([p.detach().reshape(-1).clone() for p in trunk])
        captured.clear()
        opt.step()
        moved = torch.cat([p.detach().reshape(-1) for p in trunk]) - before
        m = 0.1 * jac if m is None else 0.9 * m + 0.1 * jac
        v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in trunk])
        expected = -0.01 / (1 - 0.9**t) * m / (v.sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8)
        (got,) = captured
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-18)
        torch.testing.assert_close(got.sum(0), moved, rtol=1e-8, atol=1e-16)
    torch.testing.assert_close(dom.au, expected**2, rtol=1e-9, atol=1e-30)


def test_unsupported_optimizer_is_rejected():
    model = make_model(2)
    with pytest.raises(TypeError, match="TaskDominance needs"):
        TaskDominance(mtl_optim.MTLOptimizer(model.parameters(), aggregator=Mean()))
    with pytest.raises(TypeError, match="TaskDominance needs"):
        TaskDominance(
            mtl_optim.MTLOptimizer(
                model.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=Sum()
            )
        )
