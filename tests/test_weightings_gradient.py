"""GradNorm, FAMO, STCH and DB-MTL: hand-computed values, properties, checkpoints, training."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    J_GOLDEN,
    TwoTask,
    assert_weighting_resumes,
    examples,
    jacobian,
    leaf,
    matrices,
    t,
    train_two_task,
    two_task_data,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import mtl_optim
from mtl_optim.aggregators import Mean
from mtl_optim.weighting._dbmtl import DBMTL
from mtl_optim.weighting._famo import FAMO
from mtl_optim.weighting._gradnorm import GradNorm
from mtl_optim.weighting._stch import STCH

F64 = torch.float64
SETTINGS = settings(max_examples=examples(40))
SQ18, SQ38 = math.sqrt(18.0), math.sqrt(38.0)  # the row norms of J_GOLDEN


def positive_floats(k: int, lo: float = 0.1, hi: float = 10.0):
    return st.lists(st.floats(lo, hi), min_size=k, max_size=k)


# --- GradNorm ----------------------------------------------------------------------------
def test_gradnorm_weight_gradient_by_hand_on_two_tasks():
    gn = GradNorm(2, dtype=F64)  # alpha = 1.5
    gn(leaf(2.0, 4.0))  # the first call fixes L(0)
    torch.testing.assert_close(gn.initial_losses, t(2.0, 4.0))
    with torch.no_grad():
        gn.loss_weights.copy_(t(0.5, 1.5))
    o = gn(leaf(1.0, 3.0))
    torch.testing.assert_close(o.detach(), t(0.5, 4.5))
    torch.testing.assert_close(gn.weights, t(0.5, 1.5))
    torch.testing.assert_close(jacobian(gn, t(1.0, 3.0)), torch.diag(t(0.5, 1.5)))
    j = t(0.5, 1.5)[:, None] * J_GOLDEN  # rows ∇(w_i L_i)
    assert gn.observe(j) is j  # the model's gradient is untouched
    # G = (0.5√18, 1.5√38) ≈ (2.12, 9.25); r = (0.5, 0.75) / 0.625 = (0.8, 1.2);
    # targets Ḡ r^1.5 ≈ (4.07, 7.47): task 1 is below its target, task 2 above
    g = [0.5 * SQ18, 1.5 * SQ38]
    targets = [(g[0] + g[1]) / 2 * r**1.5 for r in (0.8, 1.2)]
    assert g[0] < targets[0] and g[1] > targets[1]
    torch.testing.assert_close(gn.loss_weights.grad, t(-SQ18, SQ38))
    w = t(0.5, 1.5).requires_grad_(True)
    lgrad = (torch.linalg.vector_norm(w[:, None] * J_GOLDEN, dim=1) - t(*targets)).abs().sum()
    torch.testing.assert_close(gn.loss_weights.grad, torch.autograd.grad(lgrad, w)[0])


@SETTINGS
@given(j=matrices(exponent=4.0), data=st.data())
def test_gradnorm_gradient_is_the_autograd_gradient_of_lgrad(j, data):
    k = j.shape[0]
    magnitudes = data.draw(positive_floats(k, 0.1, 3.0))
    signs = data.draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=k, max_size=k))
    w = t(*[m * s for m, s in zip(magnitudes, signs)])
    l0, losses = t(*data.draw(positive_floats(k))), t(*data.draw(positive_floats(k)))
    alpha = data.draw(st.floats(0.0, 3.0))
    gn = GradNorm(k, alpha=alpha, dtype=F64)
    gn(l0.clone().requires_grad_(True))
    with torch.no_grad():
        gn.loss_weights.copy_(w)
    gn(losses.clone().requires_grad_(True))
    gn.observe(w[:, None] * j)
    wr = w.clone().requires_grad_(True)
    norms = torch.linalg.vector_norm(wr[:, None] * j, dim=1)
    ratio = losses / l0
    target = (norms.mean() * (ratio / ratio.mean()) ** alpha).detach()
    assume(bool(((norms.detach() - target).abs() > 1e-9 * norms.detach().max()).all()))
    (expected,) = torch.autograd.grad((norms - target).abs().sum(), wr)
    torch.testing.assert_close(gn.loss_weights.grad, expected, rtol=1e-10, atol=0)


def test_gradnorm_renormalises_after_each_step_and_clips():
    gn = GradNorm(3, dtype=F64)
    gn(leaf(1.0, 1.0, 1.0))
    with torch.no_grad():
        gn.loss_weights.copy_(t(0.5, 2.0, 1.5))
    gn.after_step()
    torch.testing.assert_close(gn.loss_weights.detach(), t(0.375, 1.5, 1.125))
    clipped = GradNorm(3, clip=(0.1, 10.0), dtype=F64)
    clipped(leaf(1.0, 1.0, 1.0))
    with torch.no_grad():
        clipped.loss_weights.copy_(t(-1.0, 2.0, 20.0))
    clipped.after_step()  # clamp to (0.1, 2, 10), then scale to sum 3
    torch.testing.assert_close(clipped.loss_weights.detach(), t(0.1, 2.0, 10.0) * 3 / 12.1)
    with torch.no_grad():
        gn.loss_weights.copy_(t(-2.0, 0.5, 0.5))
    with pytest.raises(RuntimeError, match="clip"):
        gn.after_step()


def test_gradnorm_epoch_mode_freezes_epoch_zero_and_uses_its_mean_losses():
    gn = GradNorm(2, initial="epoch", dtype=F64)
    for batch in ((2.0, 6.0), (4.0, 2.0)):
        gn(leaf(*batch))
        assert gn.observe(J_GOLDEN) is J_GOLDEN
        assert gn.loss_weights.grad is None  # w is not trained during epoch 0
        gn.after_step()
        torch.testing.assert_close(gn.weights, t(1.0, 1.0))
    assert gn.initial_losses is None
    gn.end_epoch()
    torch.testing.assert_close(gn.initial_losses, t(3.0, 4.0))
    # ratios (0.5, 1) -> r = (2/3, 4/3); G = (√18, √38) ≈ (4.24, 6.16), Ḡ ≈ 5.20;
    # targets ≈ (2.83, 8.01): task 1 above, task 2 below
    gn(leaf(1.5, 4.0))
    gn.observe(J_GOLDEN)
    torch.testing.assert_close(gn.loss_weights.grad, t(SQ18, -SQ38))
    gn.end_epoch()  # later epochs keep L(0)
    torch.testing.assert_close(gn.initial_losses, t(3.0, 4.0))


def test_gradnorm_guards_state_and_repr():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            GradNorm(2, alpha=bad)
    with pytest.raises(ValueError, match="lr"):
        GradNorm(2, lr=0.0)
    with pytest.raises(ValueError, match="initial"):
        GradNorm(2, initial="last")
    with pytest.raises(ValueError, match="clip"):
        GradNorm(2, clip=(0.0, 1.0))
    with pytest.raises(ValueError, match="num_tasks"):
        GradNorm(0)
    gn = GradNorm(2, dtype=F64)
    with pytest.raises(ValueError, match="2 tasks"):
        gn(leaf(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=">= 0"):
        gn(leaf(1.0, -2.0))
    assert GradNorm(2).param_group_options == {}
    assert GradNorm(2, lr=0.025).param_group_options == {"lr": 0.025}
    assert repr(GradNorm(2)) == "GradNorm(2, alpha=1.5, lr=None, initial='first')"
    assert repr(GradNorm(3, 0.1, clip=(0.1, 10.0))) == (
        "GradNorm(3, alpha=0.1, lr=None, initial='first', clip=(0.1, 10.0))"
    )
    gn(leaf(1.0, 2.0))
    restored = GradNorm(2, dtype=F64)
    restored.load_state_dict(gn.state_dict())
    torch.testing.assert_close(restored.initial_losses, t(1.0, 2.0))
    with pytest.raises(ValueError, match="initial_losses"):
        restored.load_state_dict({})


# --- FAMO --------------------------------------------------------------------------------
def test_famo_objectives_give_a_convex_combination_by_hand():
    famo = FAMO(2, dtype=F64)
    with torch.no_grad():
        famo.logits.copy_(t(0.0, math.log(3.0)))  # z = (1/4, 3/4)
    losses = t(1.0, 3.0)
    d = losses + 1e-8
    c = 1 / (0.25 / d[0] + 0.75 / d[1])  # ≈ 2
    o = famo(losses.clone().requires_grad_(True))
    torch.testing.assert_close(o.detach(), c * t(0.25, 0.75) * torch.log(d))
    torch.testing.assert_close(famo.weights, t(0.25, 0.75))
    mix = jacobian(famo, losses)
    torch.testing.assert_close(mix, torch.diag(c * t(0.25, 0.75) / d))  # ≈ diag(1/2, 1/2)
    assert mix.sum().item() == pytest.approx(1.0, abs=1e-12)


@SETTINGS
@given(data=st.data(), k=st.integers(2, 6))
def test_famo_gradient_weights_are_convex_for_any_logits_and_losses(data, k):
    famo = FAMO(k, dtype=F64)
    with torch.no_grad():
        famo.logits.copy_(t(*data.draw(st.lists(st.floats(-5, 5), min_size=k, max_size=k))))
    losses = t(*data.draw(positive_floats(k, 1e-3, 1e3)))
    mix = jacobian(famo, losses)
    assert torch.equal(mix, torch.diag(torch.diagonal(mix)))
    assert (torch.diagonal(mix) > 0).all()
    assert mix.sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(famo.weights.sum(), t(1.0)[0])


def test_famo_weight_steps_follow_the_formula_with_adam():
    lr, gamma, eps = 0.025, 0.001, 1e-8
    famo = FAMO(3, dtype=F64)
    before, after = t(1.0, 2.0, 4.0), t(0.5, 1.8, 4.2)
    famo(before.clone().requires_grad_(True))
    famo.after_step()
    famo.post_step(after)
    # δ = J_softmax(0)ᵀ Δ = (Δ - mean Δ) / 3; Adam's first step is lr·δ/(|δ| + eps)
    delta = torch.log(before + eps) - torch.log(after + eps)
    g1 = (delta - delta.mean()) / 3
    xi1 = -lr * g1 / (g1.abs() + eps)
    torch.testing.assert_close(famo.logits.detach(), xi1, rtol=1e-12, atol=0)
    assert famo.logits.grad is None
    # a second step, now with the weight decay γξ added to the gradient
    later = t(0.4, 1.7, 4.0)
    famo(after.clone().requires_grad_(True))
    famo.after_step()
    famo.post_step(later)
    z = torch.softmax(xi1, 0)
    delta = torch.log(after + eps) - torch.log(later + eps)
    g2 = z * (delta - (z * delta).sum()) + gamma * xi1
    m = 0.9 * 0.1 * g1 + 0.1 * g2
    v = 0.999 * 0.001 * g1**2 + 0.001 * g2**2
    xi2 = xi1 - lr * (m / (1 - 0.9**2)) / ((v / (1 - 0.999**2)).sqrt() + eps)
    torch.testing.assert_close(famo.logits.detach(), xi2, rtol=1e-12, atol=0)


def test_famo_weight_step_guards():
    famo = FAMO(2, dtype=F64)
    with pytest.raises(RuntimeError, match="backward"):
        famo.post_step(t(1.0, 1.0))
    famo(leaf(1.0, 2.0))  # no optimizer step follows (e.g. a skipped batch)
    with pytest.warns(RuntimeWarning, match="no optimizer step"):
        famo.post_step(t(0.5, 1.0))
    assert torch.equal(famo.logits.detach(), torch.zeros(2, dtype=F64))
    famo.after_step()
    famo.post_step(t(0.5, 1.0))
    with pytest.raises(RuntimeError, match="backward"):  # one weight step per model step
        famo.post_step(t(0.5, 1.0))
    floored = FAMO(2, min_losses=(0.5, 0.0), dtype=F64)
    with pytest.raises(ValueError, match="min_losses"):
        floored(leaf(0.4, 1.0))
    # D = L - ℓ* + ε = (1 + ε, 1 + ε): the objectives are ≈ 0 and the weights equal
    torch.testing.assert_close(floored(leaf(1.5, 1.0)).detach(), t(0.0, 0.0), rtol=0, atol=1e-7)
    torch.testing.assert_close(jacobian(floored, t(1.5, 1.0)), torch.diag(t(0.5, 0.5)))
    for kwargs, match in [
        ({"gamma": -1.0}, "gamma"),
        ({"w_lr": 0.0}, "w_lr"),
        ({"max_norm": 0.0}, "max_norm"),
        ({"min_losses": (0.0,)}, "min_losses"),
        ({"eps": 0.0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            FAMO(2, **kwargs)
    assert FAMO(2).max_norm == 1.0 and FAMO(2, max_norm=None).max_norm is None
    assert repr(FAMO(2)) == "FAMO(2, gamma=0.001, w_lr=0.025, max_norm=1.0)"
    assert repr(floored).endswith("min_losses=[0.5, 0.0])")


def test_famo_state_round_trip_continues_bit_identically():
    gen = torch.Generator().manual_seed(3)
    seq = [torch.rand(3, generator=gen, dtype=F64) + 0.1 for _ in range(12)]

    def run(famo, pairs):
        out = []
        for before, after in pairs:
            famo(before.clone().requires_grad_(True))
            famo.after_step()
            famo.post_step(after)
            out.append(famo.logits.detach().clone())
        return out

    pairs = list(zip(seq[::2], seq[1::2]))
    a = FAMO(3, dtype=F64)
    run(a, pairs[:3])
    b = FAMO(3, dtype=F64)
    b.load_state_dict(a.state_dict())
    ref, got = run(a, pairs[3:]), run(b, pairs[3:])
    for x, y in zip(ref, got):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="logits"):
        b.load_state_dict({})


# --- STCH --------------------------------------------------------------------------------
def stch_scalar(losses, nadir, mu, lam=None):
    """The official objective ``K μ log Σ exp(λ (log L - log L̄) / μ)``."""
    lam = torch.ones_like(losses) if lam is None else lam
    u = lam * (torch.log(losses) - torch.log(nadir)) / mu
    return losses.numel() * mu * torch.logsumexp(u, 0)


def test_stch_warms_up_on_log_losses_then_weights_are_k_softmax():
    stch = STCH(mu=0.5, warmup_epoch=1)
    for epoch in ([(1.0, 2.0)], [(2.0, 8.0), (4.0, 4.0)]):
        for batch in epoch:
            o = stch(leaf(*batch))
            torch.testing.assert_close(o.detach(), torch.log(t(*batch)))
            torch.testing.assert_close(stch.weights, t(1.0, 1.0))
        assert stch.nadir is None
        stch.end_epoch()
    torch.testing.assert_close(stch.nadir, t(3.0, 6.0))  # epoch 1's means, not epoch 0's
    # log(L / L̄) = (log 1/2, log 3/2); softmax(./0.5) = (1/4, 9/4) / (10/4) = (0.1, 0.9)
    losses = t(1.5, 9.0)
    o = stch(losses.clone().requires_grad_(True))
    torch.testing.assert_close(stch.weights, t(0.2, 1.8))
    torch.testing.assert_close(o.detach(), t(0.2 * math.log(0.5), 1.8 * math.log(1.5)))
    mix = jacobian(stch, losses)
    torch.testing.assert_close(mix, torch.diag(t(0.2 / 1.5, 1.8 / 9.0)))
    x = losses.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(stch_scalar(x, t(3.0, 6.0), 0.5), x)
    torch.testing.assert_close(mix.sum(0), expected)
    stch.end_epoch()
    stch.end_epoch()
    torch.testing.assert_close(stch.nadir, t(3.0, 6.0))


@SETTINGS
@given(data=st.data(), k=st.integers(2, 6), mu=st.floats(0.05, 20.0))
def test_stch_gradient_is_that_of_the_scalarization_and_scale_free(data, k, mu):
    losses, nadir = t(*data.draw(positive_floats(k))), t(*data.draw(positive_floats(k)))
    lam = data.draw(st.none() | positive_floats(k, 0.2, 5.0))
    stch = STCH(mu=mu, warmup_epoch=0, preference=lam)
    stch.nadir = nadir
    lam_t = None if lam is None else t(*lam)
    x = losses.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(stch_scalar(x, nadir, mu, lam_t), x)
    torch.testing.assert_close(jacobian(stch, losses).sum(0), expected)
    w = stch.weights.clone()
    if lam is None:  # K times a softmax, monotone in the normalised log loss
        assert w.sum().item() == pytest.approx(k)
        f = torch.log(losses) - torch.log(nadir)
        assert (w[:, None] >= w[None, :])[f[:, None] > f[None, :]].all()
    scale = data.draw(st.floats(1e-3, 1e3))
    stch.nadir = nadir * scale
    stch(losses * scale)  # multiplying the losses and L̄ by one constant changes nothing
    torch.testing.assert_close(stch.weights, w)


def test_stch_mu_interpolates_between_tchebycheff_and_equal_weights():
    losses, nadir = t(1.0, 4.0, 2.0), t(1.0, 2.0, 1.5)
    sharp = STCH(mu=1e-3, warmup_epoch=0)
    sharp.nadir = nadir
    sharp(losses)
    torch.testing.assert_close(sharp.weights, t(0.0, 3.0, 0.0))  # the worst task only
    flat = STCH(mu=1e6, warmup_epoch=0)
    flat.nadir = nadir
    flat(losses)
    torch.testing.assert_close(flat.weights, t(1.0, 1.0, 1.0), rtol=0, atol=1e-5)


def test_stch_guards_state_and_repr():
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="mu"):
            STCH(mu=bad)
    with pytest.raises(ValueError, match="warmup_epoch"):
        STCH(warmup_epoch=-1)
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="warmup_epoch"):
            STCH(warmup_epoch=bad)
    with pytest.raises(ValueError, match="preference"):
        STCH(preference=(1.0, 0.0))
    stch = STCH(warmup_epoch=0, preference=(1.0, 2.0))
    with pytest.raises(ValueError, match=">= 0"):
        stch(leaf(-1.0, 1.0))
    o = stch(leaf(0.0, 1.0))  # a zero loss is floored, not -inf
    assert torch.isfinite(o).all()
    stch.end_epoch()
    with pytest.raises(ValueError, match="2 warm-up losses, got 3"):
        stch(leaf(1.0, 1.0, 1.0))
    other = STCH(preference=(1.0, 2.0))
    other.nadir = t(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="2 preferences, got 3"):
        other(leaf(1.0, 1.0, 1.0))
    restored = STCH(warmup_epoch=0, preference=(1.0, 2.0))
    restored.load_state_dict(stch.state_dict())
    torch.testing.assert_close(restored.nadir, stch.nadir)
    restored(leaf(0.3, 0.7))
    stch(leaf(0.3, 0.7))
    torch.testing.assert_close(restored.weights, stch.weights, rtol=0, atol=0)
    with pytest.raises(ValueError, match="nadir"):
        restored.load_state_dict({})
    assert repr(STCH()) == "STCH(mu=1.0, warmup_epoch=4, eps=1e-08)"
    assert repr(stch) == "STCH(mu=1.0, warmup_epoch=0, preference=[1.0, 2.0], eps=1e-08)"


# --- DB-MTL ------------------------------------------------------------------------------
def test_dbmtl_log_objectives_ema_and_max_norm_rescaling_by_hand():
    db = DBMTL()  # beta = 0.9, beta_sigma = 0
    o = db(leaf(2.0, 0.5))
    torch.testing.assert_close(o.detach(), torch.log(t(2.0, 0.5)))
    torch.testing.assert_close(db.weights, t(1.0, 1.0))
    torch.testing.assert_close(jacobian(db, t(2.0, 0.5)), torch.diag(t(0.5, 2.0)))
    # step 1: ĝ = 0.1 J; both rows rescaled to the larger norm 0.1√38
    out = db.observe(J_GOLDEN)
    torch.testing.assert_close(out, 0.1 * torch.stack([J_GOLDEN[0] * SQ38 / SQ18, J_GOLDEN[1]]))
    torch.testing.assert_close(db.scales, t(SQ38 / SQ18, 1.0))
    db.after_step()
    assert db.steps == 1
    # step 2: ĝ = 0.9 ĝ_1 + 0.1 J_2
    j2 = t(1.0, 0.0, 0.0, 0.0, 2.0, 0.0).view(2, 3)
    ema = 0.09 * J_GOLDEN + 0.1 * j2  # rows (-0.26, .09, .09), (.54, .29, .09)
    n = torch.linalg.vector_norm(ema, dim=1)
    out = db.observe(j2)
    torch.testing.assert_close(out, ema * (n.max() / n)[:, None])
    torch.testing.assert_close(torch.linalg.vector_norm(out, dim=1), n.max().expand(2))


def test_dbmtl_beta_decays_with_sigma_and_advances_once_per_step():
    db = DBMTL(beta=0.5, beta_sigma=0.5)
    j = J_GOLDEN
    db.observe(j)
    db.observe(2 * j)  # a second backward in the same window replaces the first average
    db.after_step()
    torch.testing.assert_close(db.average, 0.5 * 2 * j)  # β_1 = 0.5
    db.observe(5 * j)  # a skipped step: no after_step, nothing committed
    db.observe(torch.zeros_like(j))
    db.after_step()
    db.after_step()  # a step without backward changes nothing
    assert db.steps == 2
    # β_2 = 0.5/√2 applied to the committed average j (the 5 j window was dropped)
    torch.testing.assert_close(db.average, 0.5 / math.sqrt(2) * j)
    half = J_GOLDEN * t(0.0, 1.0)[:, None]  # a zero row stays zero, the other keeps its norm
    torch.testing.assert_close(DBMTL().observe(half), 0.1 * half)
    with pytest.raises(ValueError, match="shape"):
        db.observe(torch.zeros(2, 4, dtype=F64))


@SETTINGS
@given(j=matrices(exponent=8.0), beta=st.floats(0.0, 0.99))
def test_dbmtl_rows_have_the_max_norm_and_keep_their_directions(j, beta):
    db = DBMTL(beta=beta)
    out = db.observe(j)
    ema = (1 - beta) * j
    norms = torch.linalg.vector_norm(ema, dim=1)
    torch.testing.assert_close(
        torch.linalg.vector_norm(out, dim=1), norms.max().expand_as(norms), rtol=1e-12, atol=0
    )
    unit = ema / norms[:, None]  # every row a positive multiple of its average
    torch.testing.assert_close(out / norms.max(), unit, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(DBMTL(beta=beta).observe(3.0 * j), 3.0 * out, rtol=1e-12, atol=0)


def test_dbmtl_guards_state_and_repr():
    for kwargs, match in [
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta_sigma": -1.0}, "beta_sigma"),
        ({"eps": 0.0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            DBMTL(**kwargs)
    db = DBMTL()
    with pytest.raises(ValueError, match=">= 0"):
        db(leaf(1.0, -1.0))
    db.observe(J_GOLDEN)
    db.after_step()
    restored = DBMTL()
    restored.load_state_dict(db.state_dict())
    assert restored.steps == 1
    j2 = J_GOLDEN.flip(0)
    torch.testing.assert_close(restored.observe(j2), db.observe(j2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="average"):
        restored.load_state_dict({})
    assert repr(DBMTL()) == "DBMTL(beta=0.9, beta_sigma=0.0, eps=1e-08)"


# --- all four ----------------------------------------------------------------------------
def _active_stch() -> STCH:
    stch = STCH(mu=0.7, warmup_epoch=0)
    stch.nadir = t(2.0, 1.0, 0.5)
    return stch


@pytest.mark.parametrize(
    "make",
    [lambda: GradNorm(3, dtype=F64), lambda: FAMO(3, dtype=F64), _active_stch, DBMTL],
    ids=["GradNorm", "FAMO", "STCH", "DBMTL"],
)
def test_separable_objectives_have_a_diagonal_loss_jacobian(make):
    weighting = make()
    assert weighting.separable  # the optimizer then takes ∂o/∂L from one reverse pass
    mix = jacobian(weighting, t(0.3, 1.7, 4.0))
    assert torch.equal(mix, torch.diag(torch.diagonal(mix)))
    assert (torch.diagonal(mix) > 0).all()


# --- through the optimizer ---------------------------------------------------------------
def train(make_opt):
    """A 150-step run of the nonlinear two-task problem, epochs of 10 steps."""
    return train_two_task(make_opt, nonlinear=True, steps=150, epoch_every=10)


MAKERS = {
    "GradNorm": lambda: GradNorm(2, dtype=F64),
    "GradNorm-epoch": lambda: GradNorm(2, initial="epoch", dtype=F64),
    "FAMO": lambda: FAMO(2, dtype=F64),
    "STCH": lambda: STCH(warmup_epoch=1),
    "DBMTL": DBMTL,
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_training_through_the_optimizer_lowers_both_losses(name):
    weighting = MAKERS[name]()

    def make_opt(model):
        return mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.Adam, lr=1e-2, weighting=weighting
        )

    opt, first, last = train(make_opt)
    assert all(b < 0.5 * a for a, b in zip(first, last)), (first, last)
    assert opt.last_weights is not None and opt.last_weights.shape == (2,)
    if isinstance(weighting, (GradNorm, STCH)):
        assert not torch.allclose(opt.last_weights, torch.ones(2, dtype=F64))
    if isinstance(weighting, GradNorm):
        assert weighting.loss_weights.sum().item() == pytest.approx(2.0)
    if isinstance(weighting, FAMO):
        assert not torch.equal(weighting.logits, torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("composition", ["SGD", "Mean", "AdaTask"])
def test_gradnorm_composes_with_sgd_an_aggregator_and_adatask(composition):
    # with SGD's momentum on w the paper's unconstrained weights overshoot below 0: clip them
    clip = (0.1, 10.0) if composition == "SGD" else None
    weighting = GradNorm(2, lr=1e-2, clip=clip, dtype=F64)

    def make_opt(model):
        if composition == "AdaTask":
            return mtl_optim.AdaTask(model.parameters(), lr=1e-2, weighting=weighting)
        if composition == "Mean":
            return mtl_optim.MTLOptimizer(
                model.parameters(), lr=1e-2, aggregator=Mean(), weighting=weighting
            )
        return mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.SGD, lr=0.1, momentum=0.9, weighting=weighting
        )

    opt, first, last = train(make_opt)
    assert all(b < 0.5 * a for a, b in zip(first, last)), (first, last)
    assert opt.param_groups[-1]["params"] == [weighting.loss_weights]
    assert weighting.loss_weights.sum().item() == pytest.approx(2.0)
    assert not torch.allclose(weighting.loss_weights.detach(), torch.ones(2, dtype=F64))


def test_gradnorm_measures_the_representation_gradient_with_features():
    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    x, ys = two_task_data(nonlinear=True)
    gn = GradNorm(2, dtype=F64)
    opt = mtl_optim.MTLOptimizer(model.parameters(), lr=1e-2, weighting=gn)
    z = torch.tanh(model.trunk(x))
    losses = [((h(z).squeeze(-1) - y) ** 2).mean() for h, y in zip(model.heads, ys)]
    opt.backward(losses, features=z)
    # at the first step r = 1: every G_i is pulled to the mean, so the signs are opposite
    rows = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses]
    )
    norms = torch.linalg.vector_norm(rows, dim=1)
    expected = torch.sign(norms - norms.mean()) * norms
    torch.testing.assert_close(gn.loss_weights.grad, expected)


def test_famo_max_norm_clips_the_shared_gradient():
    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    x, ys = two_task_data(nonlinear=True)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.SGD, lr=0.0, weighting=FAMO(2, max_norm=1e-3)
    )
    opt.backward([((o - y) ** 2).mean() for o, y in zip(model(x), ys)])
    shared = opt.shared_params
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in shared])) > 1e-3
    opt.step()
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in shared]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-5)


def signature(weighting) -> torch.Tensor:
    """The state each method moves: learned weights, logits, rescaling factors."""
    if isinstance(weighting, GradNorm):
        return weighting.loss_weights.detach().clone()
    if isinstance(weighting, FAMO):
        return weighting.logits.detach().clone()
    if isinstance(weighting, DBMTL):
        return weighting.scales.clone()
    return weighting.weights.clone()


@pytest.mark.parametrize("name", list(MAKERS))
def test_optimizer_checkpoint_through_torch_save_resumes_bit_identically(name):
    assert_weighting_resumes(
        MAKERS[name], lambda opt: torch.cat([opt.last_weights, signature(opt.weighting)])
    )
