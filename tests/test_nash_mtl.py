"""Nash-MTL: the bargaining condition, invariances, fallback, state, cvxpy agreement.

The decisions tested are in docs/methods/aggregators.md, "Nash-MTL".
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from conftest import examples
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mtl_optim.aggregators import NashMTL

F64 = torch.float64
SETTINGS = settings(max_examples=examples(60))


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _residual(jac: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``α ⊙ Mα − 1`` with ``M = J Jᵀ`` (zero at the bargaining solution)."""
    return alpha * ((jac @ jac.T) @ alpha) - 1.0


# ----------------------------------------------------------------------------- 1. residual


@SETTINGS
@given(
    k=st.integers(2, 8),
    extra=st.integers(0, 42),
    u=st.floats(-8.0, 8.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_residual_full_row_rank(k, extra, u, seed):
    d = k + extra
    jac = _randn(seed, k, d) * 10.0**u
    assume(torch.linalg.cond(jac) < 1e4)  # numerically full row rank
    alpha = NashMTL().weights(jac)
    assert alpha.dtype == F64 and alpha.shape == (k,)
    assert torch.isfinite(alpha).all() and (alpha > 0).all()
    assert _residual(jac, alpha).norm() <= 1e-6


# ----------------------------------------------------------------------------- 2. invariance


@SETTINGS
@given(
    k=st.integers(2, 8),
    extra=st.integers(0, 30),
    logc=st.lists(st.floats(-3.0, 3.0), min_size=8, max_size=8),
    seed=st.integers(0, 2**31 - 1),
)
def test_loss_scale_invariance(k, extra, logc, seed):
    jac = _randn(seed, k, k + extra)
    assume(torch.linalg.cond(jac) < 1e4)
    c = 10.0 ** torch.tensor(logc[:k], dtype=F64)
    alpha = NashMTL().weights(jac)
    alpha_c = NashMTL().weights(c[:, None] * jac)
    torch.testing.assert_close(alpha_c, alpha / c, rtol=1e-6, atol=0.0)
    d, d_c = alpha @ jac, alpha_c @ (c[:, None] * jac)
    torch.testing.assert_close(d_c, d, rtol=1e-6, atol=1e-6 * d.norm().item())


def test_global_scale():
    """``M → cM`` gives ``α → α/√c`` (the scalar normalisation is undone exactly)."""
    jac = _randn(3, 4, 9)
    alpha = NashMTL().weights(jac)
    for c in (1e-12, 1e-3, 7.0, 1e10):
        torch.testing.assert_close(NashMTL().weights(math.sqrt(c) * jac), alpha / math.sqrt(c))


# ----------------------------------------------------------------------------- 3. closed forms


def test_single_task():
    g = _randn(0, 1, 7)
    alpha = NashMTL().weights(g)
    torch.testing.assert_close(alpha, 1.0 / g.norm(dim=1), rtol=1e-12, atol=0.0)
    torch.testing.assert_close(NashMTL()(g), g[0] / g.norm(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_orthogonal_rows(k):
    q, _ = torch.linalg.qr(_randn(k, 10, k))  # orthonormal columns
    norms = 10.0 ** torch.linspace(-3, 3, k, dtype=F64)
    jac = norms[:, None] * q.T
    alpha = NashMTL().weights(jac)
    torch.testing.assert_close(alpha, 1.0 / norms, rtol=1e-9, atol=0.0)


# ----------------------------------------------------------------------------- 4. permutation


@SETTINGS
@given(k=st.integers(2, 8), extra=st.integers(0, 20), seed=st.integers(0, 2**31 - 1))
def test_permutation_equivariance(k, extra, seed):
    jac = _randn(seed, k, k + extra)
    assume(torch.linalg.cond(jac) < 1e4)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    alpha = NashMTL().weights(jac)
    torch.testing.assert_close(NashMTL().weights(jac[perm]), alpha[perm], rtol=1e-9, atol=0.0)


# ----------------------------------------------------------------------------- 5. vs cvxpy


def test_newton_matches_official_cvxpy():
    """Newton and the official CCP (ECOS, official tolerances) agree on 100 random Gramians.

    The official CCP linearises at ones, which needs ``M·1 > 0``; a Gramian without it makes
    the first subproblem unbounded (the official code then keeps ones, tested below), so such
    draws are redrawn. Row norms vary over about a decade.
    """
    pytest.importorskip("cvxpy")
    gen = torch.Generator().manual_seed(1234)
    checked = 0
    while checked < 100:
        k = int(torch.randint(2, 11, (1,), generator=gen))
        d = int(torch.randint(k, 51, (1,), generator=gen))
        jac = torch.randn(k, d, generator=gen, dtype=F64)
        jac = jac + 0.5 * torch.randn(1, d, generator=gen, dtype=F64)
        jac = jac * torch.exp(0.5 * torch.randn(k, 1, generator=gen, dtype=F64))
        if not ((jac @ jac.T).sum(dim=1) > 0).all():
            continue
        a_newton = NashMTL().weights(jac)
        a_cvx = NashMTL(solver="cvxpy").weights(jac)
        rel = ((a_newton - a_cvx).norm() / a_newton.norm()).item()
        assert rel <= 1e-4, (checked, k, d, rel)
        checked += 1


def test_cvxpy_keeps_previous_alpha_on_failure(monkeypatch):
    cp = pytest.importorskip("cvxpy")
    # M·1 = (0, 2): the linearisation 1/(M̃α_p) at the ones start is undefined.
    jac = torch.tensor([[1.0, 1.0], [0.0, -2.0]], dtype=F64)
    torch.testing.assert_close(NashMTL(solver="cvxpy").weights(jac), torch.ones(2, dtype=F64))
    assert _residual(jac, NashMTL().weights(jac)).abs().max() <= 1e-9  # Newton solves it

    agg = NashMTL(solver="cvxpy")
    healthy = torch.tensor([[1.0, 0.2], [0.3, 2.0]], dtype=F64)
    previous = agg.weights(healthy)
    assert _residual(healthy, previous).abs().max() <= 1e-4

    def fail(*args, **kwargs):
        raise cp.SolverError("injected")

    monkeypatch.setattr(cp.Problem, "solve", fail)
    torch.testing.assert_close(agg.weights(healthy * 3.0), previous)


def test_cvxpy_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxpy", None)  # makes `import cvxpy` raise ImportError
    with pytest.raises(ImportError, match=r"mtl_optim\[solvers\]"):
        NashMTL(solver="cvxpy").weights(_randn(0, 2, 3))


# ----------------------------------------------------------------------------- 6. degenerate


def test_zero_row_keeps_previous_weight():
    jac = _randn(5, 3, 6)
    jac[1] = 0.0
    agg = NashMTL()
    alpha = agg.weights(jac)
    assert torch.isfinite(alpha).all()
    assert alpha[1] == 1.0  # the previous weight (ones before the first solve)
    # The other weights are the solution without the zero row.
    torch.testing.assert_close(alpha[[0, 2]], NashMTL().weights(jac[[0, 2]]))
    jac2 = jac.clone()
    jac2[1] = _randn(6, 6)
    agg.weights(jac2)
    assert agg.weights(jac)[1] == agg.state_dict()["alpha"][1]  # kept from the last call
    assert agg.weights(jac)[1] != 1.0


@pytest.mark.parametrize(
    "rows",
    [
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # all zero
        [[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]],  # exactly opposed
        [[1.0, 2.0, 3.0], [-2.0, -4.0, -6.0], [0.0, 1.0, 0.0]],  # opposed pair + a third
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.0]],  # 0 in the convex hull
        [[float("nan"), 1.0, 0.0], [0.0, 1.0, 0.0]],  # non-finite
    ],
)
def test_unbounded_falls_back_to_previous_alpha(rows):
    jac = torch.tensor(rows, dtype=F64)
    k = jac.shape[0]
    agg = NashMTL()
    torch.testing.assert_close(agg.weights(jac), torch.ones(k, dtype=F64))
    healthy = _randn(7, k, 3) + torch.tensor([0.0, 0.0, 3.0], dtype=F64)
    previous = agg.weights(healthy)
    assert not torch.equal(previous, torch.ones(k, dtype=F64))
    again = agg.weights(jac)
    torch.testing.assert_close(again, previous)
    assert torch.isfinite(again).all()
    assert torch.isfinite(agg.weights(jac.float())).all()


@pytest.mark.parametrize(
    "rows",
    [
        [[1.0, 2.0], [1.0, 2.0]],  # identical rows: bounded, α_i = 1/(√2‖g‖)
        [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],  # K > d, 0 not in the hull: bounded
        [[1.0, 0.0], [-1.0, 1e-3]],  # nearly opposed: large but finite weights
    ],
)
def test_rank_deficient_but_bounded(rows):
    jac = torch.tensor(rows, dtype=F64)
    alpha = NashMTL().weights(jac)
    assert torch.isfinite(alpha).all() and (alpha > 0).all()
    assert _residual(jac, alpha).abs().max() <= 1e-8


def test_float32_and_tiny_row():
    jac = _randn(8, 3, 40)
    jac[2] *= 1e-20
    alpha32 = NashMTL().weights(jac.float())
    assert alpha32.dtype == torch.float32 and torch.isfinite(alpha32).all()
    torch.testing.assert_close(alpha32.double(), NashMTL().weights(jac), rtol=1e-5, atol=0.0)


# ----------------------------------------------------------------------------- 7. state


def test_update_every_and_state_dict_round_trip():
    jacs = [_randn(20 + i, 4, 12) for i in range(8)]
    agg = NashMTL(update_weights_every=3)
    a0, a1, a2, a3 = (agg.weights(j) for j in jacs[:4])
    assert torch.equal(a1, a0) and torch.equal(a2, a0)  # reused on the 2nd and 3rd calls
    assert not torch.equal(a3, a0)  # solved on the 4th
    assert _residual(jacs[3], a3).abs().max() <= 1e-9

    sd = agg.state_dict()
    assert sd["step"] == 4 and torch.equal(sd["alpha"], a3)
    other = NashMTL(update_weights_every=3)
    other.load_state_dict(sd)
    assert other.state_dict()["step"] == 4 and torch.equal(other.state_dict()["alpha"], a3)
    for j in jacs[4:]:  # calls 5..8: reuse, solve (call 7, warm-started), reuse
        assert torch.equal(other.weights(j), agg.weights(j))

    fresh = NashMTL()
    assert fresh.state_dict() == {"alpha": None, "step": 0}
    fresh.load_state_dict({"alpha": None, "step": 0})
    with pytest.raises(ValueError):
        fresh.load_state_dict({"alpha": None})
    with pytest.raises(ValueError):
        fresh.load_state_dict({"alpha": None, "step": 0, "other": 1})


def test_warm_start_matches_cold_start():
    jac = _randn(30, 5, 20)
    agg = NashMTL()
    agg.weights(_randn(31, 5, 20))
    torch.testing.assert_close(agg.weights(jac), NashMTL().weights(jac), rtol=1e-9, atol=0.0)


def test_fixed_iterations_without_sync():
    jac = _randn(32, 6, 20)
    alpha = NashMTL(check_every=None, max_iter=15).weights(jac)
    assert _residual(jac, alpha).abs().max() <= 1e-9


def test_repr_and_arguments():
    agg = NashMTL(update_weights_every=2, max_norm=0.5)
    text = repr(agg)
    for part in ("solver='newton'", "update_weights_every=2", "optim_niter=20", "max_norm=0.5"):
        assert part in text
    assert NashMTL().max_norm == 1.0
    with pytest.raises(ValueError):
        NashMTL(solver="scs")
    with pytest.raises(ValueError):
        NashMTL(update_weights_every=0)
    with pytest.raises(ValueError):
        NashMTL(check_every=0)


def test_forward_and_transform():
    jac = _randn(40, 3, 5)
    alpha = NashMTL().weights(jac)
    torch.testing.assert_close(NashMTL()(jac), alpha @ jac)
    torch.testing.assert_close(NashMTL().transform(jac), alpha[:, None] * jac)


# ----------------------------------------------------------------------------- 8. golden value


def test_golden_two_tasks():
    # J = [[-4, 1, 1], [6, 1, 1]] gives M = J Jᵀ = [[18, -22], [-22, 38]] = [[a, b], [b, c]].
    # The conditions α_1 (Mα)_1 = 1 and α_2 (Mα)_2 = 1 read
    #     a α_1² + b α_1 α_2 = 1,    c α_2² + b α_1 α_2 = 1.
    # Subtracting: a α_1² = c α_2², so α_2 = √(a/c) α_1 (both positive): in the two-task case
    # the weighted gradients have equal norms, α_1‖g_1‖ = α_2‖g_2‖. Substituting back,
    #     α_1² (a + b √(a/c)) = 1  ⇒  α_1 = 1/√(a + b√(a/c)) = 1/√(18 − 66/√19),
    #     α_2 = (3/√19) α_1,
    # which needs a + b√(a/c) > 0, i.e. b > −√(ac) (the gradients are not exactly opposed).
    jac = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=F64)
    a, b, c = 18.0, -22.0, 38.0
    alpha1 = 1.0 / math.sqrt(a + b * math.sqrt(a / c))
    expected = torch.tensor([alpha1, math.sqrt(a / c) * alpha1], dtype=F64)
    assert abs(alpha1 - 1.0 / math.sqrt(18.0 - 66.0 / math.sqrt(19.0))) < 1e-15
    # rtol 1e-10: Newton stops at max_i |α_i (Mα)_i − 1| <= tol = 1e-10.
    torch.testing.assert_close(NashMTL().weights(jac), expected, rtol=1e-10, atol=0.0)
    direction = NashMTL()(jac)
    torch.testing.assert_close(direction, expected @ jac, rtol=1e-10, atol=0.0)
    # Each task's directional derivative is 1/α_i.
    torch.testing.assert_close(jac @ direction, 1.0 / expected, rtol=1e-10, atol=0.0)


def test_golden_two_tasks_cvxpy():
    pytest.importorskip("cvxpy")
    jac = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=F64)
    alpha1 = 1.0 / math.sqrt(18.0 - 66.0 / math.sqrt(19.0))
    expected = np.array([alpha1, 3.0 / math.sqrt(19.0) * alpha1])
    np.testing.assert_allclose(NashMTL(solver="cvxpy").weights(jac).numpy(), expected, rtol=1e-4)


def test_nash_mtl_trains_through_the_optimizer_and_clips_the_shared_gradient():
    from mtl_optim import MTLOptimizer
    from mtl_optim.aggregators import NashMTL as Exported

    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 6).double()
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1).double() for _ in range(2))
    params = list(trunk.parameters()) + list(heads.parameters())
    opt = MTLOptimizer(params, base=torch.optim.SGD, lr=0.05, aggregator=Exported(max_norm=0.5))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    ys = [x @ torch.randn(4, 1, generator=g, dtype=torch.float64) for _ in range(2)]
    first = last = None
    for _ in range(100):
        opt.zero_grad()
        z = trunk(x)
        losses = [((h(z) - y) ** 2).mean() for h, y in zip(heads, ys)]
        opt.backward(losses)
        opt.step()  # clips the shared gradient before the update
        norm = torch.cat([p.grad.reshape(-1) for p in trunk.parameters()]).norm()
        assert norm <= 0.5 + 1e-12
        first = first or [float(v.detach()) for v in losses]
        last = [float(v.detach()) for v in losses]
    assert all(b < a for a, b in zip(first, last))
    assert opt.last_weights.shape == (2,) and torch.all(opt.last_weights > 0)
