"""Properties every exported aggregator must have, on the shared matrix sampler."""

from __future__ import annotations

import pytest
import torch
from conftest import examples, matrices
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.methods import default_instance, exported
from mtl_optim import aggregators

NAMES = sorted(exported(aggregators))
#: methods whose output depends on random draws (a permuted input draws differently)
RANDOM = {"Random", "PCGrad", "GradDrop", "GradVac"}


def build(name):
    return default_instance(exported(aggregators)[name], num_tasks=3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_dtype_and_row_weights(name, dtype):
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(3, 7, generator=g, dtype=dtype)
    agg = build(name)
    out = agg(jac)
    assert out.shape == (7,) and out.dtype == dtype and torch.isfinite(out).all()
    if isinstance(agg, aggregators.WeightedAggregator) and name not in RANDOM:
        twin = build(name)  # same state as agg had before its call
        w = twin.weights(jac)
        assert w.shape == (3,) and w.dtype == dtype
        torch.testing.assert_close(w @ jac, out, rtol=1e-4, atol=1e-5 * float(out.abs().max()))
    with pytest.raises(ValueError):
        build(name)(jac[0])  # not a (K, d) matrix


@pytest.mark.parametrize("name", [n for n in NAMES if n not in RANDOM])
@settings(max_examples=examples(15))
@given(data=st.data())
def test_permutation_equivariance(name, data):
    jac = data.draw(matrices(k_min=2, k_max=5, full_rank=True))
    perm = torch.tensor(data.draw(st.permutations(range(jac.shape[0]))))
    out = build(name)(jac)
    out_perm = build(name)(jac[perm])
    scale = float(jac.abs().max()) * max(1.0, float(out.abs().max()) / float(jac.abs().max()))
    torch.testing.assert_close(out_perm, out, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("name", NAMES)
def test_a_single_task_gets_a_positive_multiple_of_its_gradient(name):
    g = torch.Generator().manual_seed(1)
    row = torch.randn(1, 9, generator=g, dtype=torch.float64)
    out = build(name)(row)
    cos = torch.nn.functional.cosine_similarity(out, row[0], dim=0)
    assert torch.isclose(cos, torch.tensor(1.0, dtype=torch.float64), atol=1e-9), (name, out)
