"""RLW: weights summing to the scale, the seeded draws, state."""

from __future__ import annotations

import pytest
import torch
from conftest import F64, leaf, t

from mtl_optim.weighting import RLW


# --- RLW ---------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["normal", "dirichlet"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_rlw_weights_sum_to_scale_and_the_seed_reproduces_the_draws(distribution, scale):
    a = RLW(distribution, scale=scale, seed=7)
    b = RLW(distribution, scale=scale, seed=7)
    c = RLW(distribution, scale=scale, seed=8)
    losses = t(1.0, 2.0, 3.0)
    draws_a, draws_c = [], []
    for _ in range(5):
        xa = losses.clone().requires_grad_(True)
        oa = a(xa)
        b(losses.clone().requires_grad_(True))
        c(losses.clone().requires_grad_(True))
        assert a.weights.sum().item() == pytest.approx(scale, rel=1e-12)
        assert (a.weights > 0).all()
        torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
        torch.testing.assert_close(oa.detach(), a.weights * losses)
        rows = [torch.autograd.grad(oi, xa, retain_graph=True)[0] for oi in oa.unbind()]
        torch.testing.assert_close(torch.stack(rows), torch.diag(a.weights))  # constant weights
        draws_a.append(a.weights)
        draws_c.append(c.weights)
    assert not torch.allclose(draws_a[0], draws_a[1])  # fresh weights every call
    assert not torch.allclose(torch.stack(draws_a), torch.stack(draws_c))


def test_rlw_normal_matches_softmax_of_the_generator_draws():
    rlw = RLW(seed=3, scale=2.0)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        rlw(leaf(1.0, 1.0, 1.0, 1.0))
        z = torch.randn(4, generator=g, dtype=F64)
        torch.testing.assert_close(rlw.weights, 2.0 * torch.softmax(z, 0))
    x = leaf(1.0, 2.0)
    o = rlw(x)
    (grad,) = torch.autograd.grad(o.sum(), x)
    torch.testing.assert_close(grad, rlw.weights)  # the weights are constants


def test_rlw_state_dict_round_trip_draws_the_same_weights():
    rlw = RLW("dirichlet", seed=11)
    for _ in range(3):
        rlw(leaf(1.0, 2.0, 3.0))
    state = rlw.state_dict()
    ahead = []
    for _ in range(4):
        rlw(leaf(1.0, 2.0, 3.0))
        ahead.append(rlw.weights)
    resumed = RLW("dirichlet", seed=999)
    resumed.load_state_dict(state)
    for w in ahead:
        resumed(leaf(1.0, 2.0, 3.0))
        torch.testing.assert_close(resumed.weights, w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="generator"):
        resumed.load_state_dict({})
    with pytest.raises(ValueError, match="distribution"):
        RLW("uniform")
    with pytest.raises(ValueError, match="scale"):
        RLW(scale=-1.0)
    assert repr(RLW()) == "RLW(distribution='normal', scale=1.0, seed=None)"
