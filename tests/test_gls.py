"""GLS: the objectives sum to the geometric mean and give its gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import F64, jacobian, t

from mtl_optim.weighting import GLS


# --- GLS ----------------------------------------------------------------------------------
def test_gls_objectives_sum_to_the_geometric_mean_and_gradient_matches_autograd():
    gls = GLS()
    losses = t(0.5, 2.0, 4.0)
    g = (0.5 * 2.0 * 4.0) ** (1 / 3)
    o = gls(losses.clone().requires_grad_(True))
    torch.testing.assert_close(o.detach(), torch.full((3,), g / 3, dtype=F64))
    torch.testing.assert_close(o.sum().detach(), t(g)[0])
    torch.testing.assert_close(gls.weights, g / (3 * losses))
    x = losses.clone().requires_grad_(True)
    ref = torch.autograd.grad(x.prod() ** (1 / 3), x)[0]
    torch.testing.assert_close(jacobian(gls, losses).sum(0), ref)
    torch.testing.assert_close(gls.weights, ref)
    torch.testing.assert_close(jacobian(gls, losses), torch.diag(ref))  # distinct task rows
    # zero loss: floored, finite, no weight; negative: error
    o = gls(t(0.0, 1.0).requires_grad_(True))
    assert torch.isfinite(o).all() and gls.weights[0].item() == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        gls(t(1.0, -0.1))
    assert repr(gls) == "GLS(eps=1e-08)" and gls.state_dict() == {}
