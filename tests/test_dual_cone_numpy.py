"""The dual-cone solver's CPU path (NumPy) against its torch reference, on random problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import F64, examples, matrices
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import UPGrad
from mtl_optim.aggregators import _dual_cone as dual_cone
from mtl_optim.aggregators._dual_cone import (
    _dual_cone_weights_numpy,
    _dual_cone_weights_torch,
    dual_cone_weights,
    regularized_gramian,
)


@settings(max_examples=examples(60))
@given(
    jacobian=matrices(k_min=1, k_max=13, d_max=17),
    batch=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    reg=st.sampled_from([0.0, 1e-4]),
    max_iter=st.sampled_from([None, 0, 1, 3]),
)
def test_numpy_solver_matches_the_torch_loop(jacobian, batch, seed, reg, max_iter):
    """Same iterations, same weights (float64 rounding) for awkward K, batches of right-hand
    sides of either sign, every rank, scales 1e-16..1e16 and truncated loops."""
    gram = regularized_gramian(jacobian @ jacobian.T, 1e-4, reg)
    u = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, gram.shape[0])))
    got = _dual_cone_weights_numpy(u, gram, max_iter)
    want = _dual_cone_weights_torch(u, gram, max_iter)
    assert got.dtype == F64 and got.shape == u.shape
    scale = 1 + u.abs().max().item() + want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * scale)


def test_cpu_calls_take_the_numpy_path_and_unbatched_calls_agree():
    rng = np.random.default_rng(0)
    j = torch.from_numpy(rng.standard_normal((7, 5)))
    gram, u = regularized_gramian(j @ j.T, 1e-4, 1e-4), torch.eye(7, dtype=F64)
    v = dual_cone_weights(u, gram)
    assert torch.equal(v, _dual_cone_weights_numpy(u, gram))
    for row in range(7):  # a right-hand side alone gets the same weights as in the batch
        assert torch.equal(dual_cone_weights(u[row], gram), v[row])


def test_numpy_solver_non_finite_gramian_gives_nan_like_the_reference():
    gram = torch.eye(3, dtype=F64)
    gram[0, 1] = gram[1, 0] = float("nan")
    u = torch.full((3,), 1 / 3, dtype=F64)
    assert torch.isnan(_dual_cone_weights_numpy(u, gram)).all()
    assert torch.isnan(_dual_cone_weights_torch(u, gram)).all()


def test_singular_system_falls_back_to_the_torch_loop(monkeypatch):
    def singular(*args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    j = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.5, -2.0]], dtype=F64)
    gram, u = j @ j.T, torch.eye(3, dtype=F64) / 3
    monkeypatch.setattr(dual_cone.np.linalg, "solve", singular)
    assert torch.equal(dual_cone_weights(u, gram), _dual_cone_weights_torch(u, gram))


@pytest.mark.parametrize("k", [2, 5, 16])
def test_upgrad_weights_match_the_torch_solver_on_conflicting_gradients(k):
    torch.manual_seed(k)
    j = torch.randn(k, 50, dtype=F64)
    j[1] = -j[0] + 0.1 * j[1]  # a strong conflict: the projections are active
    upgrad = UPGrad()
    gram = j @ j.T
    u = torch.diag(upgrad.preference(gram))
    want = _dual_cone_weights_torch(u, upgrad.cone_gramian(gram)).sum(0)
    torch.testing.assert_close(upgrad.weights_from_gramian(gram), want, rtol=1e-10, atol=1e-14)
