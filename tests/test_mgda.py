"""MGDA: the optimality conditions on sampled matrices, brute-force minima, invariances, golden
values, the official solver's limits, the loss normalisations.

The decisions tested are in docs/methods/aggregators.md, "MGDA".
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import J_GOLDEN, batches, examples, make_model, matrices
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import MGDA

SETTINGS = settings(max_examples=examples(60))


def normalized_gram(jacobian: torch.Tensor, normalization: str) -> torch.Tensor:
    gram = jacobian @ jacobian.T
    if normalization == "l2":
        norms = gram.diagonal().sqrt()
        gram = gram / torch.outer(norms, norms)
    return gram


def brute_force_min_norm(gram: np.ndarray) -> float:
    """min_{α∈Δ} αᵀDα by enumerating supports: each one's affine minimiser, kept if feasible."""
    k = gram.shape[0]
    best = math.inf
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            kkt = np.ones((size + 1, size + 1))
            kkt[:size, :size] = gram[np.ix_(idx, idx)]
            kkt[size, size] = 0.0
            rhs = np.zeros(size + 1)
            rhs[size] = 1.0
            beta = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:size]
            if (beta >= -1e-12).all():
                beta = np.clip(beta, 0, None) / np.clip(beta, 0, None).sum()
                best = min(best, float(beta @ gram[np.ix_(idx, idx)] @ beta))
    return best


# --- MGDA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalization", ["none", "l2"])
@SETTINGS
@given(jacobian=matrices())
def test_mgda_weights_meet_the_kkt_conditions_on_the_simplex(normalization, jacobian):
    alpha = MGDA(normalization).weights(jacobian)
    gram = normalized_gram(jacobian, normalization)
    tol = 1e-9 * gram.diagonal().max()
    assert (alpha >= 0).all() and alpha.sum().item() == pytest.approx(1.0, abs=1e-12)
    v = gram @ alpha
    value = alpha @ v
    assert (v >= value - tol).all()
    torch.testing.assert_close(
        v[alpha > 1e-6], value.expand((alpha > 1e-6).sum()), rtol=0, atol=tol
    )


@pytest.mark.parametrize("normalization", ["none", "l2"])
@SETTINGS
@given(jacobian=matrices(k_max=5))
def test_mgda_matches_a_brute_force_minimum(normalization, jacobian):
    alpha = MGDA(normalization).weights(jacobian)
    gram = normalized_gram(jacobian, normalization)
    scale = gram.diagonal().max().item()
    reference = brute_force_min_norm(gram.numpy() / scale)
    assert (alpha @ gram @ alpha).item() / scale == pytest.approx(reference, rel=1e-8, abs=1e-12)


@SETTINGS
@given(jacobian=matrices(k_max=5, full_rank=True))
def test_mgda_weights_are_the_unique_minimiser_for_full_rank_rows(jacobian):
    """Compared with a solve on the support that brute force finds optimal."""
    gram = (jacobian @ jacobian.T).numpy()
    gram = gram / gram.diagonal().max()
    alpha = MGDA().weights(jacobian).numpy()
    best, best_alpha = math.inf, None
    k = gram.shape[0]
    for size in range(1, k + 1):
        for support in itertools.combinations(range(k), size):
            idx = list(support)
            sub = np.linalg.inv(gram[np.ix_(idx, idx)])
            beta = sub.sum(1) / sub.sum()  # affine minimiser for a non-singular block
            value = beta @ gram[np.ix_(idx, idx)] @ beta
            if (beta >= 0).all() and value < best:
                best, best_alpha = value, np.zeros(k)
                best_alpha[idx] = beta
    np.testing.assert_allclose(alpha, best_alpha, atol=1e-6)


@pytest.mark.parametrize("normalization", ["none", "l2"])
@SETTINGS
@given(jacobian=matrices())
def test_mgda_direction_conflicts_with_no_task(normalization, jacobian):
    mgda = MGDA(normalization)
    direction = mgda(jacobian)
    if normalization == "none":
        dots, sq_norms = jacobian @ direction, jacobian.pow(2).sum(1)
    else:  # the guarantee holds for the normalised rows u_t, whose hull MGDA searches
        u = jacobian / jacobian.norm(dim=1, keepdim=True)
        dots, sq_norms = u @ (mgda.weights(jacobian) @ u), torch.ones(len(u), dtype=u.dtype)
    assert (dots >= -1e-9 * sq_norms.max()).all()


@SETTINGS
@given(jacobian=matrices(), seed=st.integers(0, 1000))
def test_mgda_is_permutation_equivariant(jacobian, seed):
    perm = torch.randperm(len(jacobian), generator=torch.Generator().manual_seed(seed))
    mgda = MGDA()
    tol = 1e-6 * jacobian.norm(dim=1).max()
    # the min-norm point is unique even when α is not (rank-deficient J)
    torch.testing.assert_close(mgda(jacobian[perm]), mgda(jacobian), rtol=0, atol=tol)


@SETTINGS
@given(jacobian=matrices(full_rank=True), seed=st.integers(0, 1000))
def test_mgda_weights_are_permutation_equivariant_for_full_rank_rows(jacobian, seed):
    perm = torch.randperm(len(jacobian), generator=torch.Generator().manual_seed(seed))
    mgda = MGDA("l2")
    torch.testing.assert_close(mgda.weights(jacobian[perm]), mgda.weights(jacobian)[perm])


@SETTINGS
@given(jacobian=matrices(), exponent=st.floats(-140, 160))
def test_mgda_weights_are_scale_invariant(jacobian, exponent):
    """Also when ``J Jᵀ`` overflows float64 (rows past 1e154): the Gramian is rescaled."""
    mgda = MGDA()
    scaled = mgda.weights(jacobian * 10.0**exponent)
    assert torch.isfinite(scaled).all()
    gram = jacobian @ jacobian.T
    values = [
        (a @ gram @ a).item() / gram.diagonal().max().item()
        for a in (scaled, mgda.weights(jacobian))
    ]
    assert values[0] == pytest.approx(values[1], abs=1e-9)


def test_mgda_golden_values():
    # normalization="none": D = J Jᵀ = [[18, -22], [-22, 38]]. No clamp applies
    # (D12 < D11, D12 < D22), so γ = (D22 - D12) / (D11 + D22 - 2 D12) = 60 / 100 = 0.6:
    # α = (0.6, 0.4), direction 0.6 (-4, 1, 1) + 0.4 (6, 1, 1) = (0, 1, 1).
    for exact in (True, False):
        mgda = MGDA(exact=exact)
        alpha = mgda.weights(J_GOLDEN)
        torch.testing.assert_close(alpha, torch.tensor([0.6, 0.4], dtype=torch.float64))
        torch.testing.assert_close(
            mgda(J_GOLDEN), torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12
        )
    # normalization="l2": D = [[1, c], [c, 1]] with c = -22 / sqrt(18·38), so γ = 1/2 and the
    # direction uses the raw rows: 0.5 (-4, 1, 1) + 0.5 (6, 1, 1) = (1, 1, 1).
    mgda = MGDA("l2")
    torch.testing.assert_close(mgda.weights(J_GOLDEN), torch.tensor([0.5, 0.5]).double())
    torch.testing.assert_close(mgda(J_GOLDEN), torch.ones(3, dtype=torch.float64))


def test_mgda_official_clamp_and_exact_vertex_for_two_tasks():
    # g_2 = 10 g_1: D = [[1, 10], [10, 100]], D12 >= D11, so the official rule clamps γ = 0.999.
    jacobian = torch.tensor([[1.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    official = MGDA(exact=False).weights(jacobian)
    torch.testing.assert_close(official, torch.tensor([0.999, 0.001], dtype=torch.float64))
    torch.testing.assert_close(MGDA().weights(jacobian), torch.tensor([1.0, 0.0]).double())


def test_mgda_exact_is_never_worse_than_the_official_solver():
    rng = np.random.default_rng(0)
    for _ in range(50):
        k = int(rng.integers(3, 12))
        jacobian = torch.from_numpy(rng.standard_normal((k, 2)) @ rng.standard_normal((2, 6)))
        gram = jacobian @ jacobian.T
        exact, official = MGDA().weights(jacobian), MGDA(exact=False).weights(jacobian)
        assert exact @ gram @ exact <= official @ gram @ official + 1e-12 * gram.max()


def test_mgda_edge_cases_and_validation():
    one = torch.tensor([[3.0, -4.0]])
    torch.testing.assert_close(MGDA().weights(one), torch.ones(1))
    torch.testing.assert_close(MGDA()(one), one[0])

    # a zero row under "l2": warned, kept at zero, and the min-norm point is that zero vector
    jacobian = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]).double()
    with pytest.warns(RuntimeWarning, match="zero"):
        alpha = MGDA("l2").weights(jacobian)
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0, 0.0]).double())

    j32 = J_GOLDEN.float()
    assert MGDA().weights(j32).dtype == torch.float32 and MGDA()(j32).dtype == torch.float32
    assert MGDA()(J_GOLDEN.to(torch.bfloat16)).dtype == torch.bfloat16
    nan = J_GOLDEN.clone()
    nan[0, 0] = math.nan
    assert MGDA().weights(nan).isnan().all()

    for needs in ("loss", "loss+"):
        with pytest.raises(ValueError, match="loss values"):
            MGDA(needs).weights(J_GOLDEN)  # no set_losses() and no optimizer
    with pytest.raises(ValueError, match="normalization"):
        MGDA("norm")
    with pytest.raises(ValueError, match="max_iter"):
        MGDA(max_iter=-1)
    assert repr(MGDA("l2")) == "MGDA(normalization='l2', max_iter=250, tol=1e-05, exact=True)"


def test_mgda_always_terminates_within_max_iter():
    rng = np.random.default_rng(1)
    jacobian = torch.from_numpy(rng.standard_normal((30, 3)) @ rng.standard_normal((3, 40)))
    for max_iter in (0, 1, 5):
        alpha = MGDA(max_iter=max_iter).weights(jacobian)
        assert (alpha >= 0).all() and alpha.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("norm", ["loss", "loss+"])
def test_mgda_loss_normalisations_golden(norm):
    # g1 = (-4, 1, 1), g2 = (6, 1, 1); losses L = (2, 3); ‖g1‖² = 18, ‖g2‖² = 38, g1·g2 = -22.
    # u_t = g_t / n_t with n = L ("loss") or n = L·‖g‖ ("loss+"); for K = 2 the min-norm point of
    # the segment is γ u1 + (1-γ) u2 with γ = (D22 - D12) / (D11 + D22 - 2 D12), D = U Uᵀ.
    losses = torch.tensor([2.0, 3.0], dtype=torch.float64)
    n = losses if norm == "loss" else losses * torch.tensor([18.0, 38.0]).sqrt()
    d11, d22, d12 = 18 / n[0] ** 2, 38 / n[1] ** 2, -22 / (n[0] * n[1])
    gamma = float((d22 - d12) / (d11 + d22 - 2 * d12))
    agg = MGDA(norm)
    agg.set_losses(losses)
    w = agg.weights(J_GOLDEN)
    torch.testing.assert_close(w, torch.tensor([gamma, 1 - gamma], dtype=torch.float64))


def test_mgda_loss_normalisation_gets_the_losses_from_the_optimizer():
    from mtl_optim import MTLOptimizer

    model = make_model(2)
    x, ys = batches(2, 1)[0]
    agg = MGDA("loss")
    opt = MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=agg)
    losses = model.losses(x, ys)
    opt.backward(losses)
    shared = list(model.trunk.parameters())
    jac = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, shared, retain_graph=True)])
            for v in model.losses(x, ys)
        ]
    )
    ref = MGDA("loss")
    ref.set_losses(torch.stack([v.detach() for v in losses]))
    torch.testing.assert_close(opt.last_weights, ref.weights(jac))
