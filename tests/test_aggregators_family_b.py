"""ConFIG, FairGrad, MoCo, SDMGrad and ExcessMTL: golden values, properties, state, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import J_GOLDEN, batches, clone, examples, make_model, train_two_task
from conftest import matrices as _matrices
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mtl_optim
from mtl_optim.aggregators._config import ConFIG
from mtl_optim.aggregators._excess_mtl import ExcessMTL
from mtl_optim.aggregators._fairgrad import FairGrad
from mtl_optim.aggregators._mgda import MGDA
from mtl_optim.aggregators._moco import MoCo
from mtl_optim.aggregators._nash_mtl import NashMTL
from mtl_optim.aggregators._sdmgrad import SDMGrad
from mtl_optim.aggregators._simplex import project_to_simplex, simplex_projection

F64 = torch.float64
SETTINGS = settings(max_examples=examples(40))
S19 = math.sqrt(19.0)
# J_GOLDEN: g_1 = (-4, 1, 1), g_2 = (6, 1, 1); M = [[18, -22], [-22, 38]], ‖g_1‖ = 3√2,
# ‖g_2‖ = √2·√19, cos(g_1, g_2) = -22/√684 = -11/(3√19).


def matrices(k_min: int = 2, k_max: int = 6, full_rank: bool = False):
    """The shared sampler with this file's ranges: K <= 6, d <= 10, scale 10^±6."""
    return _matrices(k_min, k_max, full_rank, d_max=10, exponent=6.0)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _permutation(k: int, seed: int) -> torch.Tensor:
    return torch.randperm(k, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- ConFIG


def test_config_golden():
    # Unit rows u_1 = g_1/(3√2), u_2 = g_2/(√2√19); UUᵀ = [[1, c], [c, 1]] with
    # c = -11/(3√19), so (UUᵀ)⁻¹1 = 1/(1 + c) and x = (u_1 + u_2)/(1 + c): u_i·x = 1.
    # ‖u_1 + u_2‖² = 2(1 + c) and Σ_i g_i·(u_1 + u_2) = (18 - 22)/(3√2) + (38 - 22)/(√2√19),
    # so d = ℓ x̂ = [Σ_i g_i·(u_1 + u_2)] / [2(1 + c)] · (u_1 + u_2) = f (u_1 + u_2) with
    # f = (24 - 2√19) / (√2 (3√19 - 11)) ≈ 5.20351, i.e. w = f (1/(3√2), 1/(√2√19)).
    f = (24 - 2 * S19) / (math.sqrt(2) * (3 * S19 - 11))
    expected = torch.tensor([f / (3 * math.sqrt(2)), f / (math.sqrt(2) * S19)], dtype=F64)
    torch.testing.assert_close(ConFIG().weights(J_GOLDEN), expected, rtol=1e-12, atol=0)
    d = ConFIG()(J_GOLDEN)
    torch.testing.assert_close(d, expected @ J_GOLDEN, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        d, torch.tensor([0.158809, 2.070607, 2.070607], dtype=F64), rtol=0, atol=1e-6
    )
    cosines = J_GOLDEN @ d / J_GOLDEN.norm(dim=1)
    torch.testing.assert_close(cosines[0], cosines[1], rtol=1e-12, atol=0)  # equal angles


@SETTINGS
@given(matrices(full_rank=True), st.sampled_from(["min", "max", "geometric", "harmonic"]))
def test_config_non_conflicting_equal_cosines_and_lengths(jacobian, length):
    out = ConFIG()(jacobian)
    norms = jacobian.norm(dim=1)
    cosines = jacobian @ out / norms
    assert (cosines > 0).all()  # full row rank: no task is hurt
    torch.testing.assert_close(cosines, cosines.mean().expand_as(cosines), rtol=1e-6, atol=0)
    # With equal cosines the projection length is Σ‖g_i‖·cos, the track lengths τ·K·cos, so
    # a track model rescales the projection direction by τ / mean‖g_i‖.
    tau = {
        "min": norms.min(),
        "max": norms.max(),
        "geometric": norms.log().mean().exp(),
        "harmonic": len(norms) / (1 / norms).sum(),
    }[length]
    scale = out.norm()
    torch.testing.assert_close(
        ConFIG(length=length)(jacobian), out * tau / norms.mean(), rtol=1e-6, atol=1e-9 * scale
    )
    arithmetic = ConFIG(length="arithmetic")(jacobian)
    torch.testing.assert_close(arithmetic, out, rtol=1e-6, atol=1e-9 * scale)


@SETTINGS
@given(matrices(), st.integers(0, 2**16))
def test_config_permutation_invariant_and_homogeneous(jacobian, seed):
    out = ConFIG()(jacobian)
    perm = _permutation(jacobian.shape[0], seed)
    scale = jacobian.norm(dim=1).sum()
    torch.testing.assert_close(ConFIG()(jacobian[perm]), out, rtol=1e-6, atol=1e-9 * scale)
    torch.testing.assert_close(ConFIG()(-3.0 * jacobian), -3.0 * out, rtol=1e-9, atol=1e-12 * scale)


def test_config_pref_vector_sets_the_cosines():
    jacobian = _randn(0, 3, 7)
    pref = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    out = ConFIG(pref)(jacobian)
    cosines = jacobian @ out / jacobian.norm(dim=1)
    torch.testing.assert_close(cosines / cosines[0], pref, rtol=1e-10, atol=0)
    torch.testing.assert_close(ConFIG(7.0 * pref)(jacobian), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ConFIG([1.0, 1.0, 1.0])(jacobian), ConFIG()(jacobian))
    with pytest.raises(ValueError, match="pref_vector"):
        ConFIG(pref)(jacobian[:2])


def test_config_degenerate_rows():
    g = J_GOLDEN[0]
    torch.testing.assert_close(ConFIG()(g[None]), g)  # K = 1: the gradient itself
    # two equal rows: U⁺1 = u, and ℓ = 2‖g‖, so the direction is the sum 2g
    torch.testing.assert_close(ConFIG()(torch.stack([g, g])), 2 * g)
    # a zero row gets weight 0 and the other rows are combined as without it
    with_zero = torch.cat([J_GOLDEN[:1], torch.zeros(1, 3, dtype=F64), J_GOLDEN[1:]])
    w = ConFIG().weights(with_zero)
    assert w[1] == 0
    torch.testing.assert_close(w[[0, 2]], ConFIG().weights(J_GOLDEN))
    assert torch.equal(ConFIG()(torch.zeros(3, 4, dtype=F64)), torch.zeros(4, dtype=F64))
    # exactly opposed rows (Pareto stationary): 1 ⟂ range(UUᵀ), no direction has equal cosines
    opposed = torch.tensor([[0.8, 0.1, -0.7], [-1.6, -0.2, 1.4]], dtype=F64)
    assert torch.equal(ConFIG()(opposed), torch.zeros(3, dtype=F64))
    assert ConFIG()(J_GOLDEN.float()).dtype == torch.float32


def test_config_validation_and_repr():
    for bad in (dict(length="mean"), dict(rcond=0.0), dict(rcond=1.0), dict(pref_vector=[1, -1])):
        with pytest.raises(ValueError):
            ConFIG(**bad)
    assert repr(ConFIG([1, 2], length="min")) == (
        "ConFIG(pref_vector=[1.0, 2.0], length='min', rcond=1e-06)"
    )


# --------------------------------------------------------------------------------- FairGrad


def test_fairgrad_golden_alpha_1():
    # α = 1: 18a - 22b = 1/a and -22a + 38b = 1/b. Multiplying by a and b and subtracting
    # gives 18a² = 38b², a = b√19/3; then b²(38 - 22√19/3) = 1, b = √(3/(114 - 22√19)).
    # scale_by_k (official) doubles them: w = 2(a, b) ≈ (1.182922, 0.814143).
    b = math.sqrt(3 / (114 - 22 * S19))
    a = b * S19 / 3
    w = FairGrad(scale_by_k=False).weights(J_GOLDEN)
    torch.testing.assert_close(w, torch.tensor([a, b], dtype=F64), rtol=1e-10, atol=0)
    torch.testing.assert_close(FairGrad().weights(J_GOLDEN), 2 * w, rtol=0, atol=0)
    torch.testing.assert_close(w, torch.tensor([0.591461, 0.407071], dtype=F64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_orthogonal_rows(alpha):
    # M = diag(n_i²): n_i² w_i = w_i^(-1/α), so w_i = n_i^(-2α/(1+α)).
    q, _ = torch.linalg.qr(_randn(1, 8, 3))
    norms = torch.tensor([1e-3, 1.0, 40.0], dtype=F64)
    w = FairGrad(alpha, scale_by_k=False).weights(norms[:, None] * q.T)
    torch.testing.assert_close(w, norms ** (-2 * alpha / (1 + alpha)), rtol=1e-9, atol=0)


@SETTINGS
@given(matrices(full_rank=True), st.floats(0.5, 5.0))
def test_fairgrad_solves_its_optimality_equation(jacobian, alpha):
    assume(torch.linalg.cond(jacobian) < 1e4)
    w = FairGrad(alpha, scale_by_k=False).weights(jacobian)
    assert (w > 0).all()
    # (Mw)_i = w_i^(-1/α), to 1e-6 relative
    relative = w ** (1 / alpha) * (jacobian @ (w @ jacobian)) - 1
    assert relative.abs().max() <= 1e-6


@SETTINGS
@given(matrices(full_rank=True), st.integers(0, 2**16))
def test_fairgrad_alpha_1_is_nash_mtl_and_permutation_equivariant(jacobian, seed):
    assume(torch.linalg.cond(jacobian) < 1e4)
    w = FairGrad(scale_by_k=False).weights(jacobian)
    torch.testing.assert_close(w, NashMTL().weights(jacobian), rtol=1e-8, atol=0)
    perm = _permutation(jacobian.shape[0], seed)
    torch.testing.assert_close(
        FairGrad(2.0).weights(jacobian[perm]),
        FairGrad(2.0).weights(jacobian)[perm],
        rtol=1e-8,
        atol=0,
    )


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_fairgrad_scaling(alpha):
    # M → cM maps w → c^(-α/(1+α)) w
    jacobian = _randn(2, 4, 9)
    w = FairGrad(alpha).weights(jacobian)
    for c in (1e-8, 1e-2, 30.0, 1e8):
        expected = w * c ** (-alpha / (1 + alpha))
        torch.testing.assert_close(FairGrad(alpha).weights(math.sqrt(c) * jacobian), expected)


def test_fairgrad_fallbacks_and_state():
    # exactly opposed rows: no solution, the previous weights (ones at first) are kept
    opposed = torch.tensor([[1.0, 2.0], [-2.0, -4.0]], dtype=F64)
    fairgrad = FairGrad(scale_by_k=False)
    assert torch.equal(fairgrad.weights(opposed), torch.ones(2, dtype=F64))
    solved = fairgrad.weights(J_GOLDEN)
    assert torch.equal(fairgrad.weights(opposed), solved)
    # a zero row keeps its previous weight; the other rows are solved among themselves
    with_zero = torch.cat([J_GOLDEN[:1], torch.zeros(1, 3, dtype=F64), J_GOLDEN[1:]])
    w = FairGrad(scale_by_k=False).weights(with_zero)
    assert w[1] == 1.0
    torch.testing.assert_close(w[[0, 2]], solved)
    nan = FairGrad().weights(torch.tensor([[math.nan, 1.0], [1.0, 2.0]]))
    assert torch.equal(nan, torch.full((2,), 2.0))  # ones, times K
    # the number of tasks is fixed by the first call
    with pytest.raises(ValueError, match="2 tasks"):
        fairgrad.weights(_randn(0, 3, 4))


def test_fairgrad_warm_start_and_syncless_mode():
    jacobian = _randn(3, 4, 10)
    cold = FairGrad().weights(jacobian)
    warm = FairGrad()
    warm.weights(jacobian + 0.1 * _randn(4, 4, 10))
    torch.testing.assert_close(warm.weights(jacobian), cold, rtol=1e-10, atol=0)
    no_sync = FairGrad(check_every=None, max_iter=30).weights(jacobian)
    torch.testing.assert_close(no_sync, cold, rtol=1e-10, atol=0)


def test_fairgrad_validation_and_repr():
    for bad in (
        dict(alpha=0.0),
        dict(alpha=math.inf),
        dict(max_iter=0),
        dict(tol=0.0),
        dict(max_norm=-1.0),
        dict(check_every=0),
    ):
        with pytest.raises(ValueError):
            FairGrad(**bad)
    assert FairGrad(max_norm=None).max_norm is None
    assert repr(FairGrad()).startswith("FairGrad(alpha=1.0, scale_by_k=True, max_norm=1.0,")
    with pytest.raises(ValueError, match="key 'w'"):
        FairGrad().load_state_dict({})


# ------------------------------------------------------------------------------------- MoCo


def test_moco_golden_first_two_steps():
    moco = MoCo()
    # t = 1: β_1 = 0.5, y_1 = 0 - 0.5(0 - J) = J/2, Y Yᵀ = M/4 = [[4.5, -5.5], [-5.5, 9.5]].
    # λ_0 = (1/2, 1/2): YYᵀλ_0 = (-0.5, 2), λ_0 - 0.1·(-0.5, 2) = (0.55, 0.3); the projection
    # adds (1 - 0.85)/2 = 0.075 to both: λ_1 = (0.625, 0.375), and
    # d_1 = (0.625 g_1 + 0.375 g_2)/2 = (-0.25, 1, 1)/2.
    d1 = moco(J_GOLDEN)
    torch.testing.assert_close(d1, torch.tensor([-0.125, 0.5, 0.5], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(moco.state_dict()["lambda"], torch.tensor([0.625, 0.375], dtype=F64))
    # t = 2 on the same J: β_2 = 0.5/√2, y_2 = J/2 + β_2 J/2 = c J with c = (1 + β_2)/2;
    # γ_2 = 0.1/√2 and YYᵀλ_1 = c² M λ_1 = c² (3, 0.5); the projection shifts both by half the
    # missing mass.
    c = (1 + 0.5 / math.sqrt(2)) / 2
    step = 0.1 / math.sqrt(2) * c * c * torch.tensor([3.0, 0.5], dtype=F64)
    lam = torch.tensor([0.625, 0.375], dtype=F64) - step
    lam = lam + (1 - lam.sum()) / 2
    rows = moco.transform(J_GOLDEN)
    torch.testing.assert_close(moco.state_dict()["lambda"], lam, rtol=1e-14, atol=0)
    torch.testing.assert_close(rows, c * lam[:, None] * J_GOLDEN, rtol=1e-14, atol=1e-15)


def test_moco_libmtl_variant_golden():
    # LibMTL: h_i = L_i g_i/(‖g_i‖ + 1e-8) and a softmax. With L = (3√2, √2√19) = (‖g_1‖,
    # ‖g_2‖), h ≈ J (to 1e-8 relative), so λ_1 = softmax((0.55, 0.3)) = (σ(0.25), σ(-0.25)).
    moco = MoCo(normalization="loss", lambda_update="softmax")
    assert moco.needs_losses
    with pytest.raises(ValueError, match="loss values"):
        moco(J_GOLDEN)
    moco.set_losses(J_GOLDEN.norm(dim=1))
    sig = 1 / (1 + math.exp(-0.25))
    expected = 0.5 * (sig * J_GOLDEN[0] + (1 - sig) * J_GOLDEN[1])
    torch.testing.assert_close(moco(J_GOLDEN), expected, rtol=1e-8, atol=0)
    # "l2": unit rows, so the result is invariant to the rows' scales
    scaled = J_GOLDEN * torch.tensor([[1e2], [1e4]], dtype=F64)  # ‖g‖ ≫ 1e-8
    torch.testing.assert_close(
        MoCo(normalization="l2")(scaled),
        MoCo(normalization="l2")(J_GOLDEN / J_GOLDEN.norm(dim=1, keepdim=True)),
    )


@pytest.mark.parametrize("rho", [0.0, 2.0])
def test_moco_with_exact_tracking_converges_to_mgda(rho):
    # β = 1, no decay: y_t = J, and the λ update is projected gradient descent on
    # ½λᵀ(M + ρI)λ over the simplex, whose minimiser is MGDA's weights for the Gramian M + ρI,
    # i.e. for the rows of [J, √ρ I].
    jacobian = _randn(5, 3, 6)
    gram = jacobian @ jacobian.T + rho * torch.eye(3, dtype=F64)
    gamma = 1.0 / torch.linalg.eigvalsh(gram)[-1].item()
    moco = MoCo(beta=1.0, beta_sigma=0.0, gamma=gamma, gamma_sigma=0.0, rho=rho)
    for _ in range(3000):
        out = moco(jacobian)
    augmented = torch.cat([jacobian, math.sqrt(rho) * torch.eye(3, dtype=F64)], dim=1)
    mgda = MGDA().weights(augmented)
    torch.testing.assert_close(moco.state_dict()["lambda"], mgda, rtol=0, atol=1e-9)
    torch.testing.assert_close(out, mgda @ jacobian, rtol=0, atol=1e-9)


@SETTINGS
@given(matrices(), st.integers(0, 2**16))
def test_moco_transform_sums_to_forward_and_is_permutation_equivariant(jacobian, seed):
    k = jacobian.shape[0]
    perm = _permutation(k, seed)
    a, b, c = MoCo(), MoCo(), MoCo()
    scale = jacobian.norm(dim=1).max()
    for _ in range(3):
        rows = a.transform(jacobian)
        rows_p = b.transform(jacobian[perm])
        out = c(jacobian)
        torch.testing.assert_close(rows_p, rows[perm], rtol=1e-9, atol=1e-12 * scale)
        torch.testing.assert_close(rows.sum(0), out, rtol=0, atol=0)
        lam = c.state_dict()["lambda"]
        assert (lam >= 0).all() and abs(lam.sum().item() - 1) < 1e-12


def test_moco_validation_and_shapes():
    for bad in (
        dict(beta=0.0),
        dict(beta=1.5),
        dict(gamma=0.0),
        dict(beta_sigma=-1.0),
        dict(rho=math.nan),
        dict(normalization="loss+"),
        dict(lambda_update="exp"),
    ):
        with pytest.raises(ValueError):
            MoCo(**bad)
    moco = MoCo()
    moco(J_GOLDEN)
    with pytest.raises(ValueError, match="shape"):
        moco(J_GOLDEN[:, :2])
    assert moco(J_GOLDEN.float()).dtype == torch.float32
    assert "lambda_update='projection'" in repr(moco)
    with pytest.raises(ValueError, match="keys"):
        moco.load_state_dict({"y": None})


# ---------------------------------------------------------------------------------- SDMGrad


def test_sdmgrad_golden():
    # s = mean(√(18 + 1e-4), √(38 + 1e-4)) ≈ 5.2035, M̂ = M/s², and at w_0 = (1/2, 1/2) the
    # inner gradient is M̂w_0 + λM̂1/2 = 1.3·(-4, 16)/2/s² ≈ (-0.096, 0.384): the step of 10
    # overshoots, (1.46, -3.34) projects to the vertex e_1. From a vertex the (momentum) step
    # always overshoots back, so the iterates alternate e_1, e_2, e_1, ... and the official
    # niter = 20 ends at e_2. The row weights are (w + λ/K)·K/(1 + λ).
    lam = 0.3
    first = SDMGrad(niter=1)
    torch.testing.assert_close(
        first.weights(J_GOLDEN), torch.tensor([1.15, 0.15], dtype=F64) * 2 / 1.3
    )
    assert torch.equal(first.state_dict()["w"], torch.tensor([1.0, 0.0], dtype=F64))
    for niter in (2, 3, 4):
        w = SDMGrad(niter=niter)
        w.weights(J_GOLDEN)
        assert torch.equal(w.state_dict()["w"], torch.eye(2, dtype=F64)[(niter + 1) % 2])
    sdm = SDMGrad()
    expected = torch.tensor([lam / 2, 1 + lam / 2], dtype=F64) * 2 / (1 + lam)
    torch.testing.assert_close(sdm.weights(J_GOLDEN), expected, rtol=1e-15, atol=0)
    # d = K(g_2 + λḡ)/(1 + λ) = 2((6, 1, 1) + 0.3(1, 1, 1))/1.3
    torch.testing.assert_close(
        SDMGrad()(J_GOLDEN), torch.tensor([6.3, 1.3, 1.3], dtype=F64) * 2 / 1.3
    )


@SETTINGS
@given(matrices(k_min=2, k_max=2), st.floats(0.0, 2.0))
def test_sdmgrad_inner_loop_minimises_its_objective(jacobian, lam):
    # K = 2, w = (t, 1 - t): the objective ½‖g_2 + λḡ + t(g_1 - g_2)‖²/s² has curvature
    # κ = ‖g_1 - g_2‖²/s² and its minimiser over [0, 1] is the clipped
    # t* = -(g_2 + λḡ)·(g_1 - g_2)/‖g_1 - g_2‖². A projected step w - η∇ moves t by -η f'(t)/2,
    # so with η = 1/κ and no momentum every step halves t - t*: 200 steps reach it.
    g1, g2 = jacobian
    diff = g1 - g2
    assume(diff.norm() > 1e-2 * jacobian.norm())
    s2 = torch.sqrt(jacobian.square().sum(1) + 1e-4).mean() ** 2
    kappa = (diff.square().sum() / s2).item()
    t_star = (-(g2 + lam * jacobian.mean(0)) @ diff / diff.square().sum()).clamp(0, 1)
    sdm = SDMGrad(lam, niter=200, w_lr=1 / kappa, w_momentum=0.0)
    sdm.weights(jacobian)
    expected = torch.stack([t_star, 1 - t_star])
    torch.testing.assert_close(sdm.state_dict()["w"], expected, rtol=0, atol=1e-9)


def test_sdmgrad_warm_start_and_limits():
    jacobian = _randn(6, 3, 5)
    # the weights persist between calls while the momentum restarts: without momentum, two
    # calls of one step each equal one call of two steps
    two_calls = SDMGrad(niter=1, w_lr=0.5, w_momentum=0.0)
    two_calls.weights(jacobian)
    two_calls.weights(jacobian)
    one_call = SDMGrad(niter=2, w_lr=0.5, w_momentum=0.0)
    one_call.weights(jacobian)
    torch.testing.assert_close(
        two_calls.state_dict()["w"], one_call.state_dict()["w"], rtol=1e-15, atol=1e-16
    )
    # momentum: the second step moves along 0.5∇_1 + ∇_2; small steps stay inside the simplex,
    # where the projection subtracts the mean of the step
    gram = jacobian @ jacobian.T
    m = gram / torch.sqrt(gram.diagonal() + 1e-4).mean() ** 2

    def grad(v):
        return m @ v + 0.3 * m.mean(1)

    w0 = torch.full((3,), 1 / 3, dtype=F64)
    w1 = w0 - 0.01 * (grad(w0) - grad(w0).mean())
    buf = 0.5 * grad(w0) + grad(w1)
    w2 = w1 - 0.01 * (buf - buf.mean())
    assert (w2 > 0).all()
    sdm = SDMGrad(niter=2, w_lr=0.01)
    sdm.weights(jacobian)
    torch.testing.assert_close(sdm.state_dict()["w"], w2, rtol=1e-14, atol=1e-15)
    # λ → ∞ tends to the mean gradient (times K): weights → 1; λ = 0, niter = 0: w_0 = 1/K
    torch.testing.assert_close(
        SDMGrad(1e9).weights(jacobian), torch.ones(3, dtype=F64), rtol=1e-8, atol=0
    )
    torch.testing.assert_close(
        SDMGrad(0.0, niter=0, scale_by_k=False).weights(jacobian),
        torch.full((3,), 1 / 3, dtype=F64),
    )
    with pytest.raises(ValueError, match="3 tasks"):
        two_calls.weights(J_GOLDEN)


@SETTINGS
@given(matrices(), st.integers(0, 2**16))
def test_sdmgrad_permutation_equivariant(jacobian, seed):
    perm = _permutation(jacobian.shape[0], seed)
    a, b = SDMGrad(w_lr=0.5), SDMGrad(w_lr=0.5)
    for _ in range(2):
        torch.testing.assert_close(
            b.weights(jacobian[perm]), a.weights(jacobian)[perm], rtol=1e-9, atol=1e-12
        )


@SETTINGS
@given(st.integers(1, 9), st.integers(1, 5), st.floats(-3, 3), st.integers(0, 2**16))
def test_simplex_projection_matches_the_numpy_reference(k, batch, log_scale, seed):
    v = _randn(seed, batch, k) * 10.0**log_scale
    out = simplex_projection(v)
    expected = np.stack([project_to_simplex(row) for row in v.numpy()])
    torch.testing.assert_close(out, torch.from_numpy(expected), rtol=1e-12, atol=1e-15)


def test_sdmgrad_validation_and_repr():
    for bad in (
        dict(lamda=-0.1),
        dict(niter=-1),
        dict(w_lr=0.0),
        dict(w_momentum=1.0),
        dict(max_norm=0.0),
    ):
        with pytest.raises(ValueError):
            SDMGrad(**bad)
    assert repr(SDMGrad()) == (
        "SDMGrad(lamda=0.3, niter=20, w_lr=10.0, w_momentum=0.5, scale_by_k=True, max_norm=1.0)"
    )


# -------------------------------------------------------------------------------- ExcessMTL


def test_excess_mtl_golden():
    excess = ExcessMTL()
    # First call: only the reference estimates e_1,i = Σ_j g_ij² / √(g_ij² + 1e-7) ≈ Σ_j |g_ij|
    # are recorded; the weights stay ones and the direction is the sum (2, 2, 2).
    torch.testing.assert_close(excess(J_GOLDEN), torch.full((3,), 2.0, dtype=F64))
    # Second call with g_2 doubled: S_1 = g_1² + g_1² = 2g_1², S_2 = g_2² + 4g_2² = 5g_2², so
    # e_2,1 = Σ g_1² / √(2g_1² + ε) ≈ e_1,1/√2 and e_2,2 = Σ 4g_2² / √(5g_2² + ε) ≈ 4e_1,2/√5;
    # w ∝ exp(0.01·ratio), normalised to sum 2.
    eps = 1e-7
    g1, g2 = J_GOLDEN
    ratio1 = (g1**2 / (2 * g1**2 + eps).sqrt()).sum() / (g1**2 / (g1**2 + eps).sqrt()).sum()
    ratio2 = (4 * g2**2 / (5 * g2**2 + eps).sqrt()).sum() / (g2**2 / (g2**2 + eps).sqrt()).sum()
    assert (
        abs(ratio1.item() - 1 / math.sqrt(2)) < 1e-7
        and abs(ratio2.item() - 4 / math.sqrt(5)) < 1e-7
    )
    expected = torch.stack([ratio1, ratio2]).mul(0.01).exp()
    expected = 2 * expected / expected.sum()
    doubled = J_GOLDEN * torch.tensor([[1.0], [2.0]], dtype=F64)
    torch.testing.assert_close(excess.weights(doubled), expected, rtol=1e-14, atol=0)
    assert expected[1] > 1 > expected[0]  # the task with more estimated excess risk gains


@SETTINGS
@given(matrices(), st.integers(0, 2**16))
def test_excess_mtl_weights_sum_to_k_and_are_permutation_equivariant(jacobian, seed):
    k = jacobian.shape[0]
    perm = _permutation(k, seed)
    a, b = ExcessMTL(robust_step_size=0.5), ExcessMTL(robust_step_size=0.5)
    for t in range(1, 4):
        step = jacobian * torch.linspace(1, t, k, dtype=F64)[:, None]  # uneven growth
        w = a.weights(step)
        torch.testing.assert_close(b.weights(step[perm]), w[perm], rtol=1e-12, atol=0)
        assert (w > 0).all() and abs(w.sum().item() - k) < 1e-12


def test_excess_mtl_zero_reference_and_validation():
    # a zero row at the first call: its reference is taken later, its weight stays finite
    excess = ExcessMTL()
    with_zero = J_GOLDEN.clone()
    with_zero[1] = 0
    excess.weights(with_zero)
    w = excess.weights(J_GOLDEN)  # the zero-reference task's exponent stays 0 this time
    torch.testing.assert_close(
        w,
        2 * torch.softmax(torch.tensor([0.01 / math.sqrt(2), 0.0], dtype=F64), 0),
        rtol=1e-8,
        atol=0,
    )
    # third call: S = (3g_1², 2g_2²), so the ratios are ≈ (1/√3, 1/√2), the second task's
    # reference now being its estimate of the second call
    ratios = torch.tensor([1 / math.sqrt(3), 1 / math.sqrt(2)], dtype=F64)
    expected = w * torch.exp(0.01 * ratios)
    torch.testing.assert_close(
        excess.weights(J_GOLDEN), 2 * expected / expected.sum(), rtol=1e-8, atol=0
    )
    with pytest.raises(ValueError, match="shape"):
        excess.weights(J_GOLDEN[:, :2])
    for bad in (dict(robust_step_size=0.0), dict(robust_step_size=math.inf), dict(eps=0.0)):
        with pytest.raises(ValueError):
            ExcessMTL(**bad)
    assert repr(ExcessMTL()) == "ExcessMTL(robust_step_size=0.01, eps=1e-07)"


# ------------------------------------------------------------------------------------ state

STATEFUL = {
    "FairGrad": lambda: FairGrad(2.0),
    "MoCo": lambda: MoCo(rho=0.1),
    "SDMGrad": lambda: SDMGrad(),
    "ExcessMTL": lambda: ExcessMTL(robust_step_size=0.3),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_dict_round_trip_continues_bit_identically(name):
    agg = STATEFUL[name]()
    mats = [_randn(10 + i, 3, 8) for i in range(6)]
    for j in mats[:3]:
        agg(j)
    state = agg.state_dict()
    snapshot = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    expected = [agg(j) for j in mats[3:]]
    for k, v in state.items():  # the state is a copy, untouched by the later calls
        assert torch.equal(v, snapshot[k]) if isinstance(v, torch.Tensor) else v == snapshot[k]
    resumed = STATEFUL[name]()
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed(j), e) for j, e in zip(mats[3:], expected))


@pytest.mark.parametrize("name", ["MoCo", "ExcessMTL"])
def test_optimizer_checkpoint_resumes_bit_identically(name):
    k = 3
    model = make_model(k)
    data = batches(k, 6)

    def make(m):
        return mtl_optim.MTLOptimizer(
            m.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=STATEFUL[name]()
        )

    def run(m, opt, chunk):
        for x, ys in chunk:
            opt.zero_grad()
            opt.backward(m.losses(x, ys))
            opt.step()

    opt = make(model)
    run(model, opt, data[:3])
    twin = clone(model)
    twin_opt = make(twin)
    twin_opt.load_state_dict(opt.state_dict())
    run(model, opt, data[3:])
    run(twin, twin_opt, data[3:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# --------------------------------------------------------------------------------- training

TRAINED = {
    "ConFIG": lambda: ConFIG(),
    "FairGrad": lambda: FairGrad(),
    "MoCo": lambda: MoCo(),
    "SDMGrad": lambda: SDMGrad(),
    "ExcessMTL": lambda: ExcessMTL(),
}


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_training_decreases_both_losses(name):
    def make_opt(model):
        return mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=TRAINED[name]()
        )

    _, start, end = train_two_task(make_opt, nonlinear=True, steps=100)
    assert all(e < 0.1 * s for s, e in zip(start, end)), (start, end)


@pytest.mark.parametrize("name", ["ConFIG", "FairGrad", "SDMGrad"])
def test_gramian_route_trains_like_the_jacobian_route(name):
    k = 3
    model = make_model(k)
    twin = clone(model)
    opts = [
        mtl_optim.MTLOptimizer(
            m.parameters(), base=torch.optim.SGD, lr=0.05, aggregator=TRAINED[name](), route=route
        )
        for m, route in ((model, "jacobian"), (twin, "gramian"))
    ]
    for x, ys in batches(k, 4):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            opt.backward(m.losses(x, ys))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-10)
        for opt in opts:
            opt.step()
