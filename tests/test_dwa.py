"""DWA: uniform for two epochs, then the formula by hand; empty epochs; state."""

from __future__ import annotations

import pytest
import torch
from conftest import F64, jacobian, leaf, t
from helpers import softmax_by_hand

from mtl_optim.weighting import DWA


# --- DWA ---------------------------------------------------------------------------------
def test_dwa_uniform_for_two_epochs_then_the_formula_by_hand():
    dwa = DWA()  # T = 2
    # epoch 0: task means (2, 4); epoch 1: (1, 3)
    for batch in ((1.0, 3.0), (3.0, 5.0)):
        dwa(leaf(*batch))
        torch.testing.assert_close(dwa.weights, torch.ones(2, dtype=F64))
    dwa.end_epoch()
    for batch in ((0.5, 2.0), (1.5, 4.0)):
        dwa(leaf(*batch))
        torch.testing.assert_close(dwa.weights, torch.ones(2, dtype=F64))
    dwa.end_epoch()
    # epoch 2: r = (1/2, 3/4), w = 2 softmax(r / 2)
    expected = [2 * p for p in softmax_by_hand([0.5 / 2, 0.75 / 2])]
    x = leaf(0.8, 2.5)
    o = dwa(x)
    torch.testing.assert_close(dwa.weights, t(*expected))
    torch.testing.assert_close(o.detach(), t(expected[0] * 0.8, expected[1] * 2.5))
    torch.testing.assert_close(jacobian(dwa, t(0.8, 2.5)), torch.diag(t(*expected)))
    dwa(leaf(1.2, 2.5))  # the weights are constant within an epoch
    torch.testing.assert_close(dwa.weights, t(*expected))
    dwa.end_epoch()  # the epoch-2 means average all 3 calls (jacobian() is one of them)
    m2 = [(0.8 + 0.8 + 1.2) / 3, 2.5]
    expected = [2 * p for p in softmax_by_hand([m2[0] / 1.0 / 2, m2[1] / 3.0 / 2])]
    dwa(leaf(1.0, 1.0))
    torch.testing.assert_close(dwa.weights, t(*expected))
    assert dwa.weights.sum().item() == pytest.approx(2.0)


def test_dwa_empty_epoch_is_not_counted_and_temperature_matters():
    dwa = DWA(temperature=0.5)
    dwa.end_epoch()  # nothing seen: not an epoch
    for means in ((4.0, 1.0), (1.0, 1.0)):
        dwa(leaf(*means))
        dwa.end_epoch()
        dwa.end_epoch()
    assert dwa.epochs == 2
    dwa(leaf(1.0, 1.0))
    expected = [2 * p for p in softmax_by_hand([0.25 / 0.5, 1.0 / 0.5])]
    torch.testing.assert_close(dwa.weights, t(*expected))
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0.0)
    assert repr(DWA()) == "DWA(temperature=2.0)"


def test_dwa_state_dict_round_trip():
    gen = torch.Generator().manual_seed(0)
    seq = [torch.rand(3, generator=gen, dtype=F64) + 0.1 for _ in range(20)]
    a = DWA()
    for i, x in enumerate(seq[:11]):
        a(x.clone().requires_grad_(True))
        if i % 4 == 3:
            a.end_epoch()
    b = DWA()
    b.load_state_dict(a.state_dict())
    for i, x in enumerate(seq[11:], start=11):
        a(x.clone().requires_grad_(True))
        b(x.clone().requires_grad_(True))
        torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
        if i % 4 == 3:
            a.end_epoch()
            b.end_epoch()
    assert not torch.equal(a.weights, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="history"):
        b.load_state_dict({})
