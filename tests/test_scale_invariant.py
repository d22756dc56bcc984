"""ScaleInvariant: the log objectives, their gradient and the guards."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import F64, jacobian, leaf, t

from mtl_optim.weighting import ScaleInvariant


# --- ScaleInvariant ----------------------------------------------------------------------
def test_scale_invariant_objectives_gradient_and_guards():
    si = ScaleInvariant()
    losses = t(0.5, 2.0, 4.0)
    o = si(losses.clone().requires_grad_(True))
    torch.testing.assert_close(o.detach(), t(math.log(0.5), math.log(2.0), math.log(4.0)))
    torch.testing.assert_close(si.weights, torch.ones(3, dtype=F64))
    torch.testing.assert_close(jacobian(si, losses), torch.diag(1 / losses))
    # a zero loss is floored at eps, not -inf, and gets no gradient
    o = si(leaf(0.0, 1.0))
    assert o[0].item() == pytest.approx(math.log(1e-8)) and torch.isfinite(o).all()
    torch.testing.assert_close(jacobian(si, t(0.0, 1.0)), torch.diag(t(0.0, 1.0)))
    with pytest.raises(ValueError, match=">= 0"):
        si(leaf(1.0, -0.1))
    with pytest.raises(ValueError, match="eps"):
        ScaleInvariant(eps=0.0)
    assert repr(si) == "ScaleInvariant(eps=1e-08)"
    assert si.state_dict() == {}
