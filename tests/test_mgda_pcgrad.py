"""MGDA and PCGrad: guarantees on sampled matrices, golden values, training.

The decisions tested are in docs/methods/aggregators.md ("MGDA", "PCGrad").
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import J_GOLDEN, batches, examples, make_model, matrices, train_two_task
from hypothesis import given, settings
from hypothesis import strategies as st

import mtl_optim
from mtl_optim.aggregators._mgda import MGDA
from mtl_optim.aggregators._pcgrad import PCGrad

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


# --- PCGrad ----------------------------------------------------------------------------------
def pcgrad_reference(jacobian: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """The paper's loop, one vector at a time, with ``orders[i]`` the visiting order of task i."""
    rows = []
    for i, order in enumerate(orders):
        g = jacobian[i].clone()
        for j in order:
            dot = g @ jacobian[j]
            if dot < 0:
                g = g - dot / jacobian[j].pow(2).sum() * jacobian[j]
        rows.append(g)
    return torch.stack(rows)


def closed_form_two_tasks(jacobian: torch.Tensor) -> torch.Tensor:
    g1, g2 = jacobian
    dot = g1 @ g2
    return torch.stack([g1 - dot / (g2 @ g2) * g2, g2 - dot / (g1 @ g1) * g1])


@SETTINGS
@given(jacobian=matrices(k_max=4), seed=st.integers(0, 2**31))
def test_pcgrad_rows_follow_the_sequential_projections_in_some_order(jacobian, seed):
    rows = PCGrad(seed=seed).transform(jacobian)
    k = len(jacobian)
    tol = 1e-9 * jacobian.norm(dim=1).max()
    for i in range(k):
        others = [j for j in range(k) if j != i]
        candidates = [
            pcgrad_reference(jacobian[[i, *order]], [list(range(1, k))])[0]
            for order in itertools.permutations(others)
        ]
        assert any((rows[i] - c).abs().max() <= tol for c in candidates)


@SETTINGS
@given(jacobian=matrices(k_max=8), seed=st.integers(0, 2**31))
def test_pcgrad_without_conflict_is_exactly_the_sum_in_any_order(jacobian, seed):
    jacobian = jacobian.abs()  # non-negative entries: every pairwise dot is >= 0
    perm = torch.randperm(len(jacobian), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(PCGrad(seed=seed)(jacobian), jacobian.sum(0))
    assert torch.equal(PCGrad(seed=seed + 1)(jacobian[perm]), jacobian[perm].sum(0))
    assert torch.equal(PCGrad(seed=seed).transform(jacobian), jacobian)


@SETTINGS
@given(jacobian=matrices(k_min=2, k_max=2, full_rank=True), seed=st.integers(0, 2**31))
def test_pcgrad_two_tasks_is_the_closed_form_whatever_the_order(jacobian, seed):
    if jacobian[0] @ jacobian[1] >= 0:
        jacobian[1] = (
            jacobian[1] - 2 * (jacobian[0] @ jacobian[1]) / jacobian[0].pow(2).sum() * (jacobian[0])
        )  # reflect the component along g_1, so the two now conflict
    expected = closed_form_two_tasks(jacobian)
    tol = 1e-9 * jacobian.norm(dim=1).max()
    for s in (seed, seed + 1):
        torch.testing.assert_close(PCGrad(seed=s).transform(jacobian), expected, rtol=0, atol=tol)
        torch.testing.assert_close(
            PCGrad(seed=s).transform(jacobian.flip(0)), expected.flip(0), rtol=0, atol=tol
        )


def test_pcgrad_golden_values():
    # g_1·g_2 = -22 < 0, ‖g_1‖² = 18, ‖g_2‖² = 38, so both project:
    # ĝ_1 = g_1 + 22/38 g_2 = (-4 + 66/19, 1 + 11/19, 1 + 11/19) = (-10/19, 30/19, 30/19)
    # ĝ_2 = g_2 + 22/18 g_1 = (6 - 44/9, 1 + 11/9, 1 + 11/9)    = (10/9, 20/9, 20/9)
    # Σ ĝ_i = (-10/19 + 10/9, 30/19 + 20/9, ...) = (100/171, 650/171, 650/171)
    rows = torch.tensor([[-10 / 19, 30 / 19, 30 / 19], [10 / 9, 20 / 9, 20 / 9]]).double()
    pcgrad = PCGrad(seed=0)
    torch.testing.assert_close(pcgrad.transform(J_GOLDEN), rows)
    torch.testing.assert_close(pcgrad(J_GOLDEN), torch.tensor([100, 650, 650]).double() / 171)
    torch.testing.assert_close(PCGrad("mean", seed=0)(J_GOLDEN), rows.mean(0))


def test_pcgrad_zero_row_never_projects():
    # g_1 = 0 conflicts with nothing; g_2, g_3 conflict as in the golden matrix
    jacobian = torch.cat([torch.zeros(1, 3, dtype=torch.float64), J_GOLDEN])
    for seed in range(5):
        rows = PCGrad(seed=seed).transform(jacobian)
        assert torch.isfinite(rows).all()
        assert torch.equal(rows[0], torch.zeros(3, dtype=torch.float64))
        torch.testing.assert_close(rows[1:], closed_form_two_tasks(J_GOLDEN))


def _conflicting(k: int = 6, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_pcgrad_seeding_and_state_dict_round_trip():
    jacobian = _conflicting()
    outputs = {tuple(PCGrad(seed=s)(jacobian).tolist()) for s in range(8)}
    assert len(outputs) > 1  # the order matters for this J
    assert torch.equal(PCGrad(seed=3)(jacobian), PCGrad(seed=3)(jacobian))

    first = PCGrad(seed=3)
    for _ in range(4):
        first(jacobian)
    state = first.state_dict()
    resumed = PCGrad(seed=11)
    resumed.load_state_dict(state)
    for _ in range(5):
        assert torch.equal(first(jacobian), resumed(jacobian))
    with pytest.raises(ValueError, match="generator"):
        resumed.load_state_dict({})


def test_pcgrad_reductions_and_validation():
    jacobian = _conflicting()
    total = PCGrad(seed=1)(jacobian)
    mean = PCGrad("mean", seed=1)
    torch.testing.assert_close(mean(jacobian), total / len(jacobian))
    for pcgrad in (PCGrad(seed=2), PCGrad("mean", seed=2)):  # rows sum to the direction
        rows = pcgrad.transform(jacobian)
        pcgrad.load_state_dict(PCGrad(seed=2).state_dict())
        torch.testing.assert_close(rows.sum(0), pcgrad(jacobian))
    with pytest.raises(ValueError, match="reduction"):
        PCGrad("max")
    assert repr(PCGrad("mean", seed=4)) == "PCGrad(reduction='mean', seed=4)"
    assert PCGrad()(jacobian.float()).dtype == torch.float32
    single = jacobian[:1]
    assert torch.equal(PCGrad()(single), single[0])


# --- training --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "aggregator", [MGDA(), MGDA("l2"), PCGrad(seed=0), PCGrad("mean", seed=0)], ids=repr
)
def test_training_decreases_both_losses(aggregator):
    def make_opt(model):
        return mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=aggregator
        )

    _, start, end = train_two_task(make_opt, nonlinear=False, steps=100)
    assert all(e < 0.1 * s for s, e in zip(start, end)), (start, end)


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
