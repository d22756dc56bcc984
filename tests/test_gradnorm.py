"""GradNorm: the weight gradient by hand and against autograd, renormalisation and clipping,
the epoch mode, compositions, representation gradients, guards and state.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    F64,
    J_GOLDEN,
    TwoTask,
    examples,
    jacobian,
    leaf,
    matrices,
    t,
    train_two_task,
    two_task_data,
)
from helpers import positive_floats
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mtl_optim
from mtl_optim.aggregators import Mean
from mtl_optim.weighting import GradNorm

SETTINGS = settings(max_examples=examples(40))


SQ18, SQ38 = math.sqrt(18.0), math.sqrt(38.0)  # the row norms of J_GOLDEN


# --- GradNorm ----------------------------------------------------------------------------
def test_gradnorm_weight_gradient_by_hand_on_two_tasks():
    gn = GradNorm(2, dtype=F64)  # alpha = 1.5
    gn(leaf(2.0, 4.0))  # the first call fixes L(0)
    torch.testing.assert_close(gn.initial_losses, t(2.0, 4.0))
    with torch.no_grad():
        gn.loss_weights.copy_(t(0.5, 1.5))
    o = gn(leaf(1.0, 3.0))
    torch.testing.assert_close(o.detach(), t(0.5, 4.5))
    torch.testing.assert_close(gn.weights, t(0.5, 1.5))
    torch.testing.assert_close(jacobian(gn, t(1.0, 3.0)), torch.diag(t(0.5, 1.5)))
    j = t(0.5, 1.5)[:, None] * J_GOLDEN  # rows ∇(w_i L_i)
    assert gn.observe(j) is j  # the model's gradient is untouched
    # G = (0.5√18, 1.5√38) ≈ (2.12, 9.25); r = (0.5, 0.75) / 0.625 = (0.8, 1.2);
    # targets Ḡ r^1.5 ≈ (4.07, 7.47): task 1 is below its target, task 2 above
    g = [0.5 * SQ18, 1.5 * SQ38]
    targets = [(g[0] + g[1]) / 2 * r**1.5 for r in (0.8, 1.2)]
    assert g[0] < targets[0] and g[1] > targets[1]
    torch.testing.assert_close(gn.loss_weights.grad, t(-SQ18, SQ38))
    w = t(0.5, 1.5).requires_grad_(True)
    lgrad = (torch.linalg.vector_norm(w[:, None] * J_GOLDEN, dim=1) - t(*targets)).abs().sum()
    torch.testing.assert_close(gn.loss_weights.grad, torch.autograd.grad(lgrad, w)[0])


@SETTINGS
@given(j=matrices(exponent=4.0), data=st.data())
def test_gradnorm_gradient_is_the_autograd_gradient_of_lgrad(j, data):
    k = j.shape[0]
    magnitudes = data.draw(positive_floats(k, 0.1, 3.0))
    signs = data.draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=k, max_size=k))
    w = t(*[m * s for m, s in zip(magnitudes, signs)])
    l0, losses = t(*data.draw(positive_floats(k))), t(*data.draw(positive_floats(k)))
    alpha = data.draw(st.floats(0.0, 3.0))
    gn = GradNorm(k, alpha=alpha, dtype=F64)
    gn(l0.clone().requires_grad_(True))
    with torch.no_grad():
        gn.loss_weights.copy_(w)
    gn(losses.clone().requires_grad_(True))
    gn.observe(w[:, None] * j)
    wr = w.clone().requires_grad_(True)
    norms = torch.linalg.vector_norm(wr[:, None] * j, dim=1)
    ratio = losses / l0
    target = (norms.mean() * (ratio / ratio.mean()) ** alpha).detach()
    assume(bool(((norms.detach() - target).abs() > 1e-9 * norms.detach().max()).all()))
    (expected,) = torch.autograd.grad((norms - target).abs().sum(), wr)
    torch.testing.assert_close(gn.loss_weights.grad, expected, rtol=1e-10, atol=0)


def test_gradnorm_renormalises_after_each_step_and_clips():
    gn = GradNorm(3, dtype=F64)
    gn(leaf(1.0, 1.0, 1.0))
    with torch.no_grad():
        gn.loss_weights.copy_(t(0.5, 2.0, 1.5))
    gn.after_step()
    torch.testing.assert_close(gn.loss_weights.detach(), t(0.375, 1.5, 1.125))
    clipped = GradNorm(3, clip=(0.1, 10.0), dtype=F64)
    clipped(leaf(1.0, 1.0, 1.0))
    with torch.no_grad():
        clipped.loss_weights.copy_(t(-1.0, 2.0, 20.0))
    clipped.after_step()  # clamp to (0.1, 2, 10), then scale to sum 3
    torch.testing.assert_close(clipped.loss_weights.detach(), t(0.1, 2.0, 10.0) * 3 / 12.1)
    with torch.no_grad():
        gn.loss_weights.copy_(t(-2.0, 0.5, 0.5))
    with pytest.raises(RuntimeError, match="clip"):
        gn.after_step()


def test_gradnorm_epoch_mode_freezes_epoch_zero_and_uses_its_mean_losses():
    gn = GradNorm(2, initial="epoch", dtype=F64)
    for batch in ((2.0, 6.0), (4.0, 2.0)):
        gn(leaf(*batch))
        assert gn.observe(J_GOLDEN) is J_GOLDEN
        assert gn.loss_weights.grad is None  # w is not trained during epoch 0
        gn.after_step()
        torch.testing.assert_close(gn.weights, t(1.0, 1.0))
    assert gn.initial_losses is None
    gn.end_epoch()
    torch.testing.assert_close(gn.initial_losses, t(3.0, 4.0))
    # ratios (0.5, 1) -> r = (2/3, 4/3); G = (√18, √38) ≈ (4.24, 6.16), Ḡ ≈ 5.20;
    # targets ≈ (2.83, 8.01): task 1 above, task 2 below
    gn(leaf(1.5, 4.0))
    gn.observe(J_GOLDEN)
    torch.testing.assert_close(gn.loss_weights.grad, t(SQ18, -SQ38))
    gn.end_epoch()  # later epochs keep L(0)
    torch.testing.assert_close(gn.initial_losses, t(3.0, 4.0))


def test_gradnorm_guards_state_and_repr():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            GradNorm(2, alpha=bad)
    with pytest.raises(ValueError, match="lr"):
        GradNorm(2, lr=0.0)
    with pytest.raises(ValueError, match="initial"):
        GradNorm(2, initial="last")
    with pytest.raises(ValueError, match="clip"):
        GradNorm(2, clip=(0.0, 1.0))
    with pytest.raises(ValueError, match="num_tasks"):
        GradNorm(0)
    gn = GradNorm(2, dtype=F64)
    with pytest.raises(ValueError, match="2 tasks"):
        gn(leaf(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=">= 0"):
        gn(leaf(1.0, -2.0))
    assert GradNorm(2).param_group_options == {}
    assert GradNorm(2, lr=0.025).param_group_options == {"lr": 0.025}
    assert repr(GradNorm(2)) == "GradNorm(2, alpha=1.5, lr=None, initial='first')"
    assert repr(GradNorm(3, 0.1, clip=(0.1, 10.0))) == (
        "GradNorm(3, alpha=0.1, lr=None, initial='first', clip=(0.1, 10.0))"
    )
    gn(leaf(1.0, 2.0))
    restored = GradNorm(2, dtype=F64)
    restored.load_state_dict(gn.state_dict())
    torch.testing.assert_close(restored.initial_losses, t(1.0, 2.0))
    with pytest.raises(ValueError, match="initial_losses"):
        restored.load_state_dict({})


# --- through the optimizer ---------------------------------------------------------------
def train(make_opt):
    """A 150-step run of the nonlinear two-task problem, epochs of 10 steps."""
    return train_two_task(make_opt, nonlinear=True, steps=150, epoch_every=10)


@pytest.mark.parametrize("composition", ["SGD", "Mean", "AdaTask"])
def test_gradnorm_composes_with_sgd_an_aggregator_and_adatask(composition):
    # with SGD's momentum on w the paper's unconstrained weights overshoot below 0: clip them
    clip = (0.1, 10.0) if composition == "SGD" else None
    weighting = GradNorm(2, lr=1e-2, clip=clip, dtype=F64)

    def make_opt(model):
        if composition == "AdaTask":
            return mtl_optim.AdaTask(model.parameters(), lr=1e-2, weighting=weighting)
        if composition == "Mean":
            return mtl_optim.MTLOptimizer(
                model.parameters(), lr=1e-2, aggregator=Mean(), weighting=weighting
            )
        return mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.SGD, lr=0.1, momentum=0.9, weighting=weighting
        )

    opt, first, last = train(make_opt)
    assert all(b < 0.5 * a for a, b in zip(first, last)), (first, last)
    assert opt.param_groups[-1]["params"] == [weighting.loss_weights]
    assert weighting.loss_weights.sum().item() == pytest.approx(2.0)
    assert not torch.allclose(weighting.loss_weights.detach(), torch.ones(2, dtype=F64))


def test_gradnorm_measures_the_representation_gradient_with_features():
    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    x, ys = two_task_data(nonlinear=True)
    gn = GradNorm(2, dtype=F64)
    opt = mtl_optim.MTLOptimizer(model.parameters(), lr=1e-2, weighting=gn)
    z = torch.tanh(model.trunk(x))
    losses = [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, ys)]
    opt.backward(losses, features=z)
    # at the first step r = 1: every G_i is pulled to the mean, so the signs are opposite
    rows = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses]
    )
    norms = torch.linalg.vector_norm(rows, dim=1)
    expected = torch.sign(norms - norms.mean()) * norms
    torch.testing.assert_close(gn.loss_weights.grad, expected)
