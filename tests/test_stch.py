"""STCH: the warm-up on log losses, then K·softmax weights; the gradient of the scalarization,
the limits of mu, guards and state.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    examples,
    jacobian,
    leaf,
    t,
)
from helpers import positive_floats
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_optim.weighting import STCH

SETTINGS = settings(max_examples=examples(40))


# --- STCH --------------------------------------------------------------------------------
def stch_scalar(losses, nadir, mu, lam=None):
    """The official objective ``K μ log Σ exp(λ (log L - log L̄) / μ)``."""
    lam = torch.ones_like(losses) if lam is None else lam
    u = lam * (torch.log(losses) - torch.log(nadir)) / mu
    return losses.numel() * mu * torch.logsumexp(u, 0)


def test_stch_warms_up_on_log_losses_then_weights_are_k_softmax():
    stch = STCH(mu=0.5, warmup_epoch=1)
    for epoch in ([(1.0, 2.0)], [(2.0, 8.0), (4.0, 4.0)]):
        for batch in epoch:
            o = stch(leaf(*batch))
            torch.testing.assert_close(o.detach(), torch.log(t(*batch)))
            torch.testing.assert_close(stch.weights, t(1.0, 1.0))
        assert stch.nadir is None
        stch.end_epoch()
    torch.testing.assert_close(stch.nadir, t(3.0, 6.0))  # epoch 1's means, not epoch 0's
    # log(L / L̄) = (log 1/2, log 3/2); softmax(./0.5) = (1/4, 9/4) / (10/4) = (0.1, 0.9)
    losses = t(1.5, 9.0)
    o = stch(losses.clone().requires_grad_(True))
    torch.testing.assert_close(stch.weights, t(0.2, 1.8))
    torch.testing.assert_close(o.detach(), t(0.2 * math.log(0.5), 1.8 * math.log(1.5)))
    mix = jacobian(stch, losses)
    torch.testing.assert_close(mix, torch.diag(t(0.2 / 1.5, 1.8 / 9.0)))
    x = losses.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(stch_scalar(x, t(3.0, 6.0), 0.5), x)
    torch.testing.assert_close(mix.sum(0), expected)
    stch.end_epoch()
    stch.end_epoch()
    torch.testing.assert_close(stch.nadir, t(3.0, 6.0))


@SETTINGS
@given(data=st.data(), k=st.integers(2, 6), mu=st.floats(0.05, 20.0))
def test_stch_gradient_is_that_of_the_scalarization_and_scale_free(data, k, mu):
    losses, nadir = t(*data.draw(positive_floats(k))), t(*data.draw(positive_floats(k)))
    lam = data.draw(st.none() | positive_floats(k, 0.2, 5.0))
    stch = STCH(mu=mu, warmup_epoch=0, preference=lam)
    stch.nadir = nadir
    lam_t = None if lam is None else t(*lam)
    x = losses.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(stch_scalar(x, nadir, mu, lam_t), x)
    torch.testing.assert_close(jacobian(stch, losses).sum(0), expected)
    w = stch.weights.clone()
    if lam is None:  # K times a softmax, monotone in the normalised log loss
        assert w.sum().item() == pytest.approx(k)
        f = torch.log(losses) - torch.log(nadir)
        assert (w[:, None] >= w[None, :])[f[:, None] > f[None, :]].all()
    scale = data.draw(st.floats(1e-3, 1e3))
    stch.nadir = nadir * scale
    stch(losses * scale)  # multiplying the losses and L̄ by one constant changes nothing
    torch.testing.assert_close(stch.weights, w)


def test_stch_mu_interpolates_between_tchebycheff_and_equal_weights():
    losses, nadir = t(1.0, 4.0, 2.0), t(1.0, 2.0, 1.5)
    sharp = STCH(mu=1e-3, warmup_epoch=0)
    sharp.nadir = nadir
    sharp(losses)
    torch.testing.assert_close(sharp.weights, t(0.0, 3.0, 0.0))  # the worst task only
    flat = STCH(mu=1e6, warmup_epoch=0)
    flat.nadir = nadir
    flat(losses)
    torch.testing.assert_close(flat.weights, t(1.0, 1.0, 1.0), rtol=0, atol=1e-5)


def test_stch_guards_state_and_repr():
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="mu"):
            STCH(mu=bad)
    with pytest.raises(ValueError, match="warmup_epoch"):
        STCH(warmup_epoch=-1)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="warmup_epoch"):
            STCH(warmup_epoch=bad)
    with pytest.raises(ValueError, match="preference"):
        STCH(preference=(1.0, 0.0))
    stch = STCH(warmup_epoch=0, preference=(1.0, 2.0))
    with pytest.raises(ValueError, match=">= 0"):
        stch(leaf(-1.0, 1.0))
    o = stch(leaf(0.0, 1.0))  # a zero loss is floored, not -inf
    assert torch.isfinite(o).all()
    stch.end_epoch()
    with pytest.raises(ValueError, match="2 warm-up losses, got 3"):
        stch(leaf(1.0, 1.0, 1.0))
    other = STCH(preference=(1.0, 2.0))
    other.nadir = t(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="2 preferences, got 3"):
        other(leaf(1.0, 1.0, 1.0))
    restored = STCH(warmup_epoch=0, preference=(1.0, 2.0))
    restored.load_state_dict(stch.state_dict())
    torch.testing.assert_close(restored.nadir, stch.nadir)
    restored(leaf(0.3, 0.7))
    stch(leaf(0.3, 0.7))
    torch.testing.assert_close(restored.weights, stch.weights, rtol=0, atol=0)
    with pytest.raises(ValueError, match="nadir"):
        restored.load_state_dict({})
    assert repr(STCH()) == "STCH(mu=1.0, warmup_epoch=4, eps=1e-08)"
    assert repr(stch) == "STCH(mu=1.0, warmup_epoch=0, preference=[1.0, 2.0], eps=1e-08)"
