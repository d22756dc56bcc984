"""IGB (v1): the SI baseline until the base epoch, then the softmax of the ratios; state."""

from __future__ import annotations

import pytest
import torch
from conftest import F64, jacobian, leaf, t
from helpers import softmax_by_hand

from mtl_optim.weighting import IGB


# --- IGB ---------------------------------------------------------------------------------
def test_igb_si_until_the_base_epoch_then_softmax_of_the_ratio():
    igb = IGB()  # base_epoch = 1
    for epoch in ([(2.0, 8.0), (4.0, 4.0)], [(1.0, 6.0), (3.0, 2.0)]):
        for batch in epoch:
            x = leaf(*batch)
            o = igb(x)
            torch.testing.assert_close(igb.weights, torch.ones(2, dtype=F64))
            torch.testing.assert_close(o.detach(), torch.log(t(*batch)))
        assert igb.base_losses is None
        igb.end_epoch()
    torch.testing.assert_close(igb.base_losses, t(2.0, 4.0))  # means of epoch 1, not epoch 0
    cur = (1.0, 1.0)
    expected = [2 * p for p in softmax_by_hand([1.0 / 2.0, 1.0 / 4.0])]
    o = igb(leaf(*cur))
    torch.testing.assert_close(igb.weights, t(*expected))
    torch.testing.assert_close(o.detach(), t(*expected) * torch.log(t(*cur)))
    assert igb.weights.sum().item() == pytest.approx(2.0)
    cur = (3.0, 0.5)
    expected = [2 * p for p in softmax_by_hand([3.0 / 2.0, 0.5 / 4.0])]
    jac = jacobian(igb, t(*cur))
    torch.testing.assert_close(igb.weights, t(*expected))
    # d o_i / d L_i = w_i / L_i: the weights are constants
    torch.testing.assert_close(jac, torch.diag(t(expected[0] / 3.0, expected[1] / 0.5)))
    igb.end_epoch()
    igb.end_epoch()  # later epochs leave the base losses alone
    torch.testing.assert_close(igb.base_losses, t(2.0, 4.0))


def test_igb_base_epoch_zero_guards_and_repr():
    igb = IGB(base_epoch=0)
    igb(leaf(1.0, 3.0))
    igb(leaf(3.0, 1.0))
    igb.end_epoch()
    torch.testing.assert_close(igb.base_losses, t(2.0, 2.0))
    o = igb(leaf(0.0, 2.0))  # a zero loss: the log is floored, no -inf
    assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match=">= 0"):
        igb(leaf(-1.0, 2.0))
    with pytest.raises(ValueError, match="got 3"):
        igb(leaf(1.0, 2.0, 3.0))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="base_epoch"):
            IGB(base_epoch=bad)
    assert repr(IGB()) == "IGB(base_epoch=1, eps=1e-08)"


def test_igb_state_dict_round_trip():
    gen = torch.Generator().manual_seed(1)
    seq = [torch.rand(3, generator=gen, dtype=F64) + 0.1 for _ in range(16)]
    for cut in (3, 6, 10):  # before, inside and after the base epoch
        a = IGB()
        for i, x in enumerate(seq[:cut]):
            a(x.clone().requires_grad_(True))
            if i % 3 == 2:
                a.end_epoch()
        b = IGB()
        b.load_state_dict(a.state_dict())
        for i, x in enumerate(seq[cut:], start=cut):
            oa = a(x.clone().requires_grad_(True))
            ob = b(x.clone().requires_grad_(True))
            torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
            torch.testing.assert_close(oa, ob, rtol=0, atol=0)
            if i % 3 == 2:
                a.end_epoch()
                b.end_epoch()
        assert a.base_losses is not None and a.epochs == b.epochs
    with pytest.raises(ValueError, match="unexpected|base_losses"):
        IGB().load_state_dict({"x": 1})
