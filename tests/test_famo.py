"""FAMO: a convex combination of the task gradients, the weight step with Adam, guards, state,
the clipped shared gradient.

The decisions tested are in docs/methods/weightings.md, "FAMO".
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    F64,
    TwoTask,
    examples,
    jacobian,
    leaf,
    t,
    two_task_data,
)
from helpers import positive_floats
from hypothesis import given, settings
from hypothesis import strategies as st

import mtl_optim
from mtl_optim.weighting import FAMO

SETTINGS = settings(max_examples=examples(40))


# --- FAMO --------------------------------------------------------------------------------
def test_famo_objectives_give_a_convex_combination_by_hand():
    famo = FAMO(2, dtype=F64)
    with torch.no_grad():
        famo.logits.copy_(t(0.0, math.log(3.0)))  # z = (1/4, 3/4)
    losses = t(1.0, 3.0)
    d = losses + 1e-8
    c = 1 / (0.25 / d[0] + 0.75 / d[1])  # ≈ 2
    o = famo(losses.clone().requires_grad_(True))
    torch.testing.assert_close(o.detach(), c * t(0.25, 0.75) * torch.log(d))
    torch.testing.assert_close(famo.weights, t(0.25, 0.75))
    mix = jacobian(famo, losses)
    torch.testing.assert_close(mix, torch.diag(c * t(0.25, 0.75) / d))  # ≈ diag(1/2, 1/2)
    assert mix.sum().item() == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(data=st.data(), k=st.integers(2, 6))
def test_famo_gradient_weights_are_convex_for_any_logits_and_losses(data, k):
    famo = FAMO(k, dtype=F64)
    with torch.no_grad():
        famo.logits.copy_(t(*data.draw(st.lists(st.floats(-5, 5), min_size=k, max_size=k))))
    losses = t(*data.draw(positive_floats(k, 1e-3, 1e3)))
    mix = jacobian(famo, losses)
    assert torch.equal(mix, torch.diag(torch.diagonal(mix)))
    assert (torch.diagonal(mix) > 0).all()
    assert mix.sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(famo.weights.sum(), t(1.0)[0])


def test_famo_weight_steps_follow_the_formula_with_adam():
    lr, gamma, eps = 0.025, 0.001, 1e-8
    famo = FAMO(3, dtype=F64)
    before, after = t(1.0, 2.0, 4.0), t(0.5, 1.8, 4.2)
    famo(before.clone().requires_grad_(True))
    famo.after_step()
    famo.post_step(after)
    # δ = J_softmax(0)ᵀ Δ = (Δ - mean Δ) / 3; Adam's first step is lr·δ/(|δ| + eps)
    delta = torch.log(before + eps) - torch.log(after + eps)
    g1 = (delta - delta.mean()) / 3
    xi1 = -lr * g1 / (g1.abs() + eps)
    torch.testing.assert_close(famo.logits.detach(), xi1, rtol=1e-12, atol=0)
    assert famo.logits.grad is None
    # a second step, now with the weight decay γξ added to the gradient
    later = t(0.4, 1.7, 4.0)
    famo(after.clone().requires_grad_(True))
    famo.after_step()
    famo.post_step(later)
    z = torch.softmax(xi1, 0)
    delta = torch.log(after + eps) - torch.log(later + eps)
    g2 = z * (delta - (z * delta).sum()) + gamma * xi1
    m = 0.9 * 0.1 * g1 + 0.1 * g2
    v = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
    xi2 = xi1 - lr * (m / (1 - 0.9**2)) / ((v / (1 - 0.999**2)).sqrt() + eps)
    torch.testing.assert_close(famo.logits.detach(), xi2, rtol=1e-12, atol=0)


def test_famo_weight_step_guards():
    famo = FAMO(2, dtype=F64)
    with pytest.raises(RuntimeError, match="backward"):
        famo.post_step(t(1.0, 1.0))
    famo(leaf(1.0, 2.0))  # no optimizer step follows (e.g. a skipped batch)
    with pytest.warns(RuntimeWarning, match="no optimizer step"):
        famo.post_step(t(0.5, 1.0))
    assert torch.equal(famo.logits.detach(), torch.zeros(2, dtype=F64))
    famo.after_step()
    famo.post_step(t(0.5, 1.0))
    with pytest.raises(RuntimeError, match="backward"):  # one weight step per model step
        famo.post_step(t(0.5, 1.0))
    floored = FAMO(2, min_losses=(0.5, 0.0), dtype=F64)
    with pytest.raises(ValueError, match="min_losses"):
        floored(leaf(0.4, 1.0))
    # D = L - ℓ* + ε = (1 + ε, 1 + ε): the objectives are ≈ 0 and the weights equal
    torch.testing.assert_close(floored(leaf(1.5, 1.0)).detach(), t(0.0, 0.0), rtol=0, atol=1e-7)
    torch.testing.assert_close(jacobian(floored, t(1.5, 1.0)), torch.diag(t(0.5, 0.5)))
    for kwargs, match in [
        ({"gamma": -1.0}, "gamma"),
        ({"w_lr": 0.0}, "w_lr"),
        ({"max_norm": 0.0}, "max_norm"),
        ({"min_losses": (0.0,)}, "min_losses"),
        ({"eps": 0.0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            FAMO(2, **kwargs)
    assert FAMO(2).max_norm == 1.0 and FAMO(2, max_norm=None).max_norm is None
    assert repr(FAMO(2)) == "FAMO(2, gamma=0.001, w_lr=0.025, max_norm=1.0)"
    assert repr(floored).endswith("min_losses=[0.5, 0.0])")


def test_famo_state_round_trip_continues_bit_identically():
    gen = torch.Generator().manual_seed(3)
    seq = [torch.rand(3, generator=gen, dtype=F64) + 0.1 for _ in range(12)]

    def run(famo, pairs):
        out = []
        for before, after in pairs:
            famo(before.clone().requires_grad_(True))
            famo.after_step()
            famo.post_step(after)
            out.append(famo.logits.detach().clone())
        return out

    pairs = list(zip(seq[::2], seq[1::2]))
    a = FAMO(3, dtype=F64)
    run(a, pairs[:3])
    b = FAMO(3, dtype=F64)
    b.load_state_dict(a.state_dict())
    ref, got = run(a, pairs[3:]), run(b, pairs[3:])
    for x, y in zip(ref, got):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="logits"):
        b.load_state_dict({})


def test_famo_max_norm_clips_the_shared_gradient():
    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    x, ys = two_task_data(nonlinear=True)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.SGD, lr=0.0, weighting=FAMO(2, max_norm=1e-3)
    )
    opt.backward([((o - y) ** 2).mean() for o, y in zip(model(x), ys)])
    shared = opt.shared_params
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in shared])) > 1e-3
    opt.step()
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in shared]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-5)
