"""Random gradient weighting: weights on the simplex from the seeded generator, state."""

from __future__ import annotations

import pytest
import torch

from mtl_optim.aggregators import Random


def test_random_weights():
    j = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rw = Random(seed=3)
    ws = [rw.weights(j) for _ in range(5)]
    for w in ws:
        assert (w > 0).all() and abs(w.sum().item() - 1) < 1e-12
    assert not torch.equal(ws[0], ws[1])  # fresh draws
    # reproducible: the same seed gives the same sequence, and softmax of N(0, I) draws
    gen = torch.Generator().manual_seed(3)
    expected = torch.softmax(torch.randn(4, generator=gen, dtype=torch.float64), 0)
    torch.testing.assert_close(ws[0], expected, rtol=0, atol=0)
    again = Random(seed=3)
    assert all(torch.equal(w, again.weights(j)) for w in ws)
    assert Random(seed=3).weights(j.float()).dtype == torch.float32
    with pytest.raises(TypeError):
        Random(seed=1.5)


def test_random_state_dict_round_trip():
    j = torch.randn(3, 4, dtype=torch.float64)
    a = Random(seed=7)
    a.weights(j)
    state = a.state_dict()
    expected = [a(j) for _ in range(3)]
    b = Random()  # a different, random seed
    b.load_state_dict(state)
    assert all(torch.equal(e, b(j)) for e in expected)
    with pytest.raises(ValueError):
        b.load_state_dict({})
