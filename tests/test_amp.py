"""Mixed precision: GradScaler through ``opt.backward(losses, scaler=...)``, autocast, bf16."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import batches, clone, make_model

import mtl_optim
from mtl_optim import aggregators, weighting

F32 = torch.float32

METHODS = {
    "sum": lambda p: mtl_optim.MTLOptimizer(p, base=torch.optim.SGD, lr=0.05),
    "nash": lambda p: mtl_optim.MTLOptimizer(
        p, base=torch.optim.SGD, lr=0.05, aggregator=aggregators.NashMTL()
    ),
    "mgda-gramian": lambda p: mtl_optim.MTLOptimizer(
        p, base=torch.optim.SGD, lr=0.05, aggregator=aggregators.MGDA(), route="gramian"
    ),
    "adatask": lambda p: mtl_optim.AdaTask(p, base=torch.optim.Adam, lr=1e-2),
    "igb+pcgrad": lambda p: mtl_optim.MTLOptimizer(
        p,
        base=torch.optim.Adam,
        lr=1e-2,
        weighting=weighting.IGB(),
        aggregator=aggregators.PCGrad(seed=0),
    ),
    "uncertainty": lambda p: mtl_optim.MTLOptimizer(
        p, base=torch.optim.Adam, lr=1e-2, weighting=weighting.Uncertainty(3)
    ),
}


def run(name, scaler=None, steps=8, dtype=F32):
    k = 3
    model = make_model(k, dtype=dtype)
    opt = METHODS[name](model.parameters())
    for i, (x, ys) in enumerate(batches(k, steps, dtype=dtype)):
        opt.zero_grad()
        if scaler is None:
            opt.backward(model.losses(x, ys))
            opt.step()
        else:
            opt.backward(model.losses(x, ys), scaler=scaler)
            scaler.step(opt)
            scaler.update()
        if i % 3 == 2:
            opt.end_epoch()
    return model, opt


@pytest.mark.parametrize("name", sorted(METHODS))
def test_grad_scaler_gives_the_unscaled_trajectory(name):
    # A power-of-two scale is exact in floating point: the run equals the run without it.
    plain, _ = run(name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    scaled, _ = run(name, scaler)
    assert scaler.get_scale() > 2.0**10  # it grew: no step was skipped
    for p, q in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sum", "nash", "adatask", "mgda-gramian"])
def test_scale_overflow_skips_the_step_silently_and_backs_off(name):
    k = 3
    model = make_model(k, dtype=F32)
    before = clone(model)
    opt = METHODS[name](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=3.0e38, backoff_factor=2.0**-100)
    x, ys = batches(k, 1, dtype=F32)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow of the scale is not worth a warning
        opt.zero_grad()
        # scale × gradient overflows float32 (the forward values are not what overflows)
        opt.backward([100.0 * v for v in model.losses(x, ys)], scaler=scaler)
        scaler.step(opt)
        scaler.update()
    for p, q in zip(model.parameters(), before.parameters()):
        assert torch.equal(p, q)
    state = getattr(opt, "_task_state", {})
    assert all(float(st["step"]) == 0 for st in state.values())
    assert scaler.get_scale() < 2.0**30  # backed off
    opt.zero_grad()
    opt.backward(model.losses(x, ys), scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))


def test_autocast_bfloat16_forward_and_bf16_parameters_keep_fp32_state():
    k = 2
    model = make_model(k, dtype=torch.bfloat16)
    opt = mtl_optim.AdaTask(model.parameters(), base=torch.optim.Adam, lr=1e-2)
    first = last = None
    for x, ys in batches(k, 20, dtype=torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = [((o.float() - y.float()) ** 2).mean() for o, y in zip(model(x), ys)]
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
        first = first or [float(v.detach()) for v in losses]
        last = [float(v.detach()) for v in losses]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    state = opt.task_state(model.trunk[0].weight)
    assert state["exp_avg"].dtype == F32 and state["exp_avg_sq"].dtype == F32
    assert sum(last) < sum(first)
