"""MTLOptimizer as a torch optimizer: equivalence, protocol, bad input, non-finite values."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import batches, clone, make_model
from torch import nn

import mtl_optim
from mtl_optim.aggregators import Mean, Sum


def test_without_a_method_it_is_the_base_optimizer_on_the_summed_loss():
    k = 3
    model = make_model(k)
    ref = clone(model)
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for x, ys in batches(k, 20):
        opt.zero_grad()
        ref_opt.zero_grad()
        opt.backward(model.losses(x, ys))
        sum(ref.losses(x, ys)).backward()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    torch.testing.assert_close(opt.last_weights, torch.ones(k))


def test_sum_aggregator_matches_the_summed_loss_and_mean_scales_shared_only():
    k = 3
    x, ys = batches(k, 1)[0]
    ref = make_model(k)
    sum(ref.losses(x, ys)).backward()
    for agg, scale in ((Sum(), 1.0), (Mean(), 1.0 / k)):
        model = make_model(k)
        opt = mtl_optim.MTLOptimizer(model.parameters(), aggregator=agg)
        opt.backward(model.losses(x, ys))
        for p, q in zip(model.trunk.parameters(), ref.trunk.parameters()):
            torch.testing.assert_close(p.grad, scale * q.grad, rtol=1e-12, atol=1e-14)
        for p, q in zip(model.heads.parameters(), ref.heads.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.last_weights, torch.full((k,), scale, dtype=torch.float64))


def test_scheduler_param_groups_and_zero_grad_behave_as_in_torch():
    model = make_model(2)
    opt = mtl_optim.AdaTask(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    assert opt.param_groups is opt._base.param_groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for x, ys in batches(2, 4):
            opt.zero_grad()
            opt.backward(model.losses(x, ys))
            opt.step()
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert opt._base.param_groups[0]["lr"] == pytest.approx(0.025)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())

    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert len(opt._base.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.5
    assert "betas" in opt.param_groups[1]  # the base filled its defaults
    assert "AdaTask(base=Adam, fused=None)" in repr(opt)


def test_bad_input_raises_clear_errors():
    model = make_model(2)
    x, ys = batches(2, 1)[0]
    with pytest.raises(ValueError, match="empty parameter list"):
        mtl_optim.MTLOptimizer([])
    with pytest.raises(TypeError, match="Optimizer subclass"):
        mtl_optim.MTLOptimizer(model.parameters(), base=object)
    with pytest.raises(TypeError, match="aggregator"):
        mtl_optim.MTLOptimizer(model.parameters(), aggregator=lambda j: j.sum(0))
    with pytest.raises(ValueError, match="nonfinite"):
        mtl_optim.MTLOptimizer(model.parameters(), nonfinite="ignore")
    opt = mtl_optim.MTLOptimizer(model.parameters(), aggregator=Sum())
    losses = model.losses(x, ys)
    with pytest.raises(ValueError, match="not a scalar"):
        opt.backward([losses[0] * torch.ones(2), losses[1]])
    with pytest.raises(ValueError, match="does not require grad"):
        opt.backward([losses[0].detach(), losses[1]])
    with pytest.raises(TypeError, match="sequence"):
        opt.backward("loss")
    with pytest.raises(TypeError, match="scalar tensor"):
        opt.backward([1.0, losses[1]])
    with pytest.raises(ValueError, match="1-D"):
        opt.backward(torch.stack(losses).reshape(1, 2))
    with pytest.raises(ValueError, match="empty"):
        opt.backward([])
    opt.backward(torch.stack(losses))  # a 1-D tensor of losses is fine
    with pytest.raises(ValueError, match="got 3 losses"):
        opt.backward(model.losses(x, ys) + [losses[0]])


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    sd = opt.state_dict()
    state = [
        (key, v.clone())
        for per_param in sd["state"].values()
        for key, v in per_param.items()
        if torch.is_tensor(v)
    ] + [
        (key, v.clone()) for st in sd["mtl"].get("task_state", {}).values() for key, v in st.items()
    ]
    return params, state


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: mtl_optim.AdaTask(m.parameters(), lr=0.1),
        lambda m: mtl_optim.MTLOptimizer(m.parameters(), lr=0.1, aggregator=Mean()),
        lambda m: mtl_optim.MTLOptimizer(m.parameters(), lr=0.1),
    ],
    ids=["adatask", "mean", "sum-route"],
)
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_skips_the_step_and_leaves_everything_untouched(make_opt, where):
    k = 2
    model = make_model(k)
    opt = make_opt(model)
    data = batches(k, 3)
    for x, ys in data[:2]:
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()
    params, state = _snapshot(model, opt)

    x, ys = data[2]
    opt.zero_grad()
    losses = model.losses(x, ys)
    if where == "loss":
        losses[1] = losses[1] * float("nan")
    else:
        z = model.trunk(x)
        z.register_hook(lambda g: g * float("inf"))
        losses = [((h(z) - y) ** 2).mean() for h, y in zip(model.heads, ys)]
    with pytest.warns(RuntimeWarning, match=f"non-finite {where}"):
        opt.backward(losses)
    opt.step()
    params2, state2 = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert len(state) == len(state2) > 0
    assert all(ka == kb and torch.equal(a, b) for (ka, a), (kb, b) in zip(state, state2))

    opt.zero_grad()  # training continues normally afterwards
    opt.backward(model.losses(*data[0]))
    opt.step()
    assert not all(torch.equal(a, p) for a, p in zip(params, model.parameters()))


def test_nonfinite_raise_mode():
    model = make_model(2)
    opt = mtl_optim.AdaTask(model.parameters(), nonfinite="raise")
    x, ys = batches(2, 1)[0]
    losses = model.losses(x, ys)
    with pytest.raises(mtl_optim.NonFiniteError, match="non-finite loss") as info:
        opt.backward([losses[0], losses[1] + float("inf")])
    assert isinstance(info.value, ValueError)


def test_kernels_ship_inside_the_package(tmp_path):
    """Installed, the kernels are ``mtl_optim.kernels``; no top-level ``kernels`` exists."""
    code = (
        "import importlib.util as u; "
        "print(u.find_spec('mtl_optim.kernels') is not None, u.find_spec('kernels') is None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("aggregator", [None, Sum()], ids=["sum-route", "jacobian-route"])
def test_grad_scaler_unscales_and_steps_like_unscaled_training(aggregator):
    """A power-of-two loss scale is exact, so the scaled run equals the unscaled one."""
    k = 2
    model, ref = make_model(k), make_model(k)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=aggregator
    )
    ref_opt = mtl_optim.MTLOptimizer(
        ref.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=aggregator
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, ys in batches(k, 5):
        opt.zero_grad()
        opt.backward([scaler.scale(loss) for loss in model.losses(x, ys)])
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        ref_opt.backward(ref.losses(x, ys))
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)


def test_aggregator_max_norm_clips_the_shared_gradient_only():
    k = 2
    model = make_model(k)
    agg = Sum()
    agg.max_norm = 1e-3
    opt = mtl_optim.MTLOptimizer(model.parameters(), aggregator=agg)
    x, ys = batches(k, 1)[0]
    opt.backward(model.losses(x, ys))
    opt.backward(model.losses(x, ys))  # clipping applies to the accumulated gradient, at step
    unclipped = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()]).norm()
    opt.step()
    shared = torch.cat([p.grad.reshape(-1) for p in model.trunk.parameters()])
    heads = torch.cat([p.grad.reshape(-1) for p in model.heads.parameters()])
    assert unclipped > 1e-2
    torch.testing.assert_close(shared.norm(), torch.tensor(1e-3, dtype=shared.dtype))
    assert heads.norm() > 1e-2


class _Learnable(mtl_optim.weighting.Weighting):
    """Uncertainty-style objectives ½·exp(−s_i)·L_i + ½·s_i with learnable s."""

    param_group_options = {"lr": 0.05}

    def __init__(self, k):
        self.s = nn.Parameter(torch.zeros(k, dtype=torch.float64))

    def parameters(self):
        return [self.s]

    def forward(self, losses):
        self.weights = 0.5 * torch.exp(-self.s.detach())
        return 0.5 * torch.exp(-self.s) * losses + 0.5 * self.s


def test_weighting_parameters_are_registered_trained_and_checkpointed():
    k = 2
    data = batches(k, 6)

    def run(model, weighting, chunk, opt=None):
        opt = opt or mtl_optim.MTLOptimizer(model.parameters(), lr=0.01, weighting=weighting)
        for x, ys in chunk:
            opt.zero_grad()
            opt.backward(model.losses(x, ys))
            opt.step()
        return opt

    model, w = make_model(k), _Learnable(k)
    opt = run(model, w, data)
    assert opt.param_groups[-1]["params"] == [w.s] and opt.param_groups[-1]["lr"] == 0.05
    assert torch.count_nonzero(w.s) == k  # s trained

    model2, w2 = make_model(k), _Learnable(k)
    opt2 = run(model2, w2, data[:3])
    sd = {"model": model2.state_dict(), "opt": opt2.state_dict()}
    model3, w3 = make_model(k, seed=7), _Learnable(k)
    model3.load_state_dict(sd["model"])
    opt3 = mtl_optim.MTLOptimizer(model3.parameters(), lr=0.01, weighting=w3)
    opt3.load_state_dict(sd["opt"])
    run(model3, w3, data[3:], opt3)
    assert torch.equal(w3.s, w.s)
    assert all(torch.equal(p, q) for p, q in zip(model3.parameters(), model.parameters()))


def test_deepcopy_and_pickle_keep_a_working_optimizer():
    import copy
    import pickle

    k = 2
    model = make_model(k)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=mtl_optim.aggregators.MGDA()
    )
    x, ys = batches(k, 1)[0]
    opt.backward(model.losses(x, ys))
    opt.step()
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert twin.param_groups[0]["lr"] == 0.1 and twin.defaults["lr"] == 0.1
        assert twin.param_groups[0]["params"][0] is not model.trunk[0].weight
        torch.testing.assert_close(twin.param_groups[0]["params"][0], model.trunk[0].weight)


def test_bad_features_are_rejected_before_any_method_state_moves():
    k = 2
    model = make_model(k)
    rlw = mtl_optim.weighting.RLW(seed=0)
    opt = mtl_optim.MTLOptimizer(model.parameters(), weighting=rlw)
    before = rlw.generator.get_state()
    x, ys = batches(k, 1)[0]
    with pytest.raises(ValueError, match="features"):
        opt.backward(model.losses(x, ys), features=x)  # the input does not require grad
    assert torch.equal(rlw.generator.get_state(), before)
