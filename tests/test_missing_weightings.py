"""Partial labels in the loss weightings: the optimizer calls a weighting with the ``(m,)`` losses
of the present tasks and ``present`` / ``all_tasks`` set. Every expected value below is written
out from the formula over the present tasks P (float64 where exactness is claimed).

The decisions tested are in docs/methods/weightings.md, "Partial labels".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch

from mtl_optim.weighting import (
    DBMTL,
    DWA,
    FAMO,
    GLS,
    IGB,
    IGBRL,
    RLW,
    STCH,
    ConstrainedUncertainty,
    Equal,
    GradNorm,
    GroupedUncertainty,
    ScaleInvariant,
    Uncertainty,
    Weighting,
)
from mtl_optim.weighting._constrained_uncertainty import bounded_rescale

F64 = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def call(w: Weighting, losses: torch.Tensor, present: Sequence[int] | None) -> torch.Tensor:
    """Call ``w`` as the optimizer does: the present tasks' losses with ``present`` set."""
    if present is None:
        return w(losses)
    w.present, w.all_tasks = torch.tensor(present, dtype=torch.int64), losses.numel()
    try:
        return w(losses[list(present)])
    finally:
        w.present, w.all_tasks = None, None


def post(w: FAMO, losses: torch.Tensor, present: Sequence[int] | None) -> None:
    """``update_weighting`` as the optimizer calls it."""
    if present is None:
        w.post_step(losses)
        return
    w.present, w.all_tasks = torch.tensor(present, dtype=torch.int64), losses.numel()
    try:
        w.post_step(losses[list(present)])
    finally:
        w.present, w.all_tasks = None, None


# --- which weightings support it ----------------------------------------------------------
SUPPORTED = [
    Equal,
    ScaleInvariant,
    RLW,
    DWA,
    IGB,
    FAMO,
    Uncertainty,
    GroupedUncertainty,
    ConstrainedUncertainty,
    GradNorm,
]


@pytest.mark.parametrize("cls", SUPPORTED, ids=lambda c: c.__name__)
def test_supported_weightings_declare_it(cls):
    assert cls.supports_missing is True
    assert "Partial labels" in (cls.__doc__ or "")


@pytest.mark.parametrize("cls", [IGBRL, GLS, STCH, DBMTL], ids=lambda c: c.__name__)
def test_unsupported_weightings_keep_false_and_say_why(cls):
    assert cls.supports_missing is False
    assert "Partial labels are not supported" in (cls.__doc__ or "")


# --- stateless ones -----------------------------------------------------------------------
def test_equal_and_scale_invariant_sum_over_present():
    losses = t(2.0, 0.5, 3.0, 1.5)
    eq = Equal()
    o = call(eq, losses, [0, 2])
    assert torch.equal(o, t(2.0, 3.0)) and torch.equal(eq.weights, t(1.0, 1.0))
    si = ScaleInvariant()
    o = call(si, losses, [1, 3])
    assert torch.equal(o, torch.log(t(0.5, 1.5))) and torch.equal(si.weights, t(1.0, 1.0))


@pytest.mark.parametrize("distribution", ["normal", "dirichlet"])
def test_rlw_draws_k_numbers_and_takes_the_present_ones(distribution):
    losses = t(1.0, 2.0, 3.0, 4.0)
    w = RLW(distribution, scale=2.0, seed=7)
    twin = RLW(distribution, scale=2.0, seed=7)
    g = torch.Generator().manual_seed(7)
    for present in ([0, 2], [1, 2, 3], None, [3]):
        o = call(w, losses, present)
        twin(losses)  # an all-present call advances the generator the same way
        assert torch.equal(w.generator.get_state(), twin.generator.get_state())
        idx = list(range(4)) if present is None else present
        if distribution == "normal":
            z = torch.randn(4, generator=g, dtype=F64)[idx]
            ref = 2.0 * torch.softmax(z, dim=0)
        else:
            e = torch.empty(4, dtype=F64).exponential_(1.0, generator=g)[idx]
            ref = 2.0 * e / e.sum()
        assert torch.equal(w.weights, ref)
        assert torch.equal(o, ref * losses[idx])
        assert w.weights.sum().item() == pytest.approx(2.0)


# --- epoch-based: DWA, IGB ----------------------------------------------------------------
def test_dwa_epoch_means_count_each_task_over_its_batches_and_carry_forward():
    w = DWA(temperature=2.0)
    # epoch 0: task 2 in one batch of three, task 1 in two
    epoch0 = [(t(1.0, 2.0, 4.0), None), (t(3.0, 6.0, 0.0), [0, 1]), (t(5.0, 0.0, 0.0), [0])]
    for losses, present in epoch0:
        o = call(w, losses, present)
        m = 3 if present is None else len(present)
        assert torch.equal(w.weights, torch.ones(m, dtype=F64))  # w = 1 before two epochs
        assert o.shape == (m,)
    w.end_epoch()
    mean0 = t(3.0, 4.0, 4.0)  # (1+3+5)/3, (2+6)/2, 4/1
    # epoch 1: task 2 absent all epoch: its mean is carried forward (ratio 1)
    for losses, present in [(t(1.5, 3.0, 0.0), [0, 1]), (t(3.0, 5.0, 0.0), [0, 1])]:
        call(w, losses, present)
    w.end_epoch()
    mean1 = t(2.25, 4.0, 4.0)
    history = w.state_dict()["history"]
    assert torch.equal(history[0], mean0) and torch.equal(history[1], mean1)
    r = mean1 / mean0
    o = call(w, t(1.0, 1.0, 2.0), [0, 2])
    ref = 2 * torch.softmax(r[[0, 2]] / 2.0, dim=0)
    torch.testing.assert_close(w.weights, ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(o, ref * t(1.0, 2.0), rtol=0, atol=1e-15)
    assert w.weights.sum().item() == pytest.approx(2.0)
    call(w, t(1.0, 1.0, 2.0), None)
    torch.testing.assert_close(w.weights, 3 * torch.softmax(r / 2.0, dim=0), rtol=0, atol=1e-15)


def test_dwa_task_without_two_means_keeps_weight_one_and_others_share_their_count():
    w = DWA(temperature=1.0)
    call(w, t(2.0, 4.0, 9.0), [0, 1])  # task 2 never seen in epoch 0
    w.end_epoch()
    call(w, t(1.0, 8.0, 3.0), None)
    w.end_epoch()
    # tasks 0, 1 have ratios 0.5 and 2; task 2 has one mean only
    o = call(w, t(1.0, 1.0, 1.0), None)
    ref = torch.cat([2 * torch.softmax(t(0.5, 2.0), dim=0), t(1.0)])
    torch.testing.assert_close(w.weights, ref, rtol=0, atol=1e-15)
    assert o.sum().item() == pytest.approx(3.0)
    call(w, t(1.0, 1.0, 1.0), [1, 2])
    torch.testing.assert_close(w.weights, t(1.0, 1.0), rtol=0, atol=0)  # one ratio: 1·softmax


def test_igb_base_loss_at_first_epoch_that_saw_the_task():
    w = IGB(base_epoch=1)
    call(w, t(9.0, 9.0, 9.0), None)
    w.end_epoch()  # epoch 0: before base_epoch
    for losses, present in [(t(2.0, 4.0, 0.0), [0, 1]), (t(4.0, 0.0, 0.0), [0])]:
        o = call(w, losses, present)
        assert torch.equal(w.weights, torch.ones(len(present), dtype=F64))
        assert torch.equal(o, torch.log(losses[present]))
    w.end_epoch()  # epoch 1: bases of tasks 0 (mean 3) and 1 (4); task 2 unseen
    base = w.base_losses
    assert torch.equal(base[:2], t(3.0, 4.0)) and math.isnan(base[2].item())
    o = call(w, t(1.5, 2.0, 5.0), [0, 2])
    # task 0 has a base (alone: 1 * softmax = 1), task 2 not (1)
    assert torch.equal(w.weights, t(1.0, 1.0))
    call(w, t(1.5, 2.0, 5.0), None)
    ref = torch.cat([2 * torch.softmax(t(1.5 / 3.0, 2.0 / 4.0), dim=0), t(1.0)])
    torch.testing.assert_close(w.weights, ref, rtol=0, atol=1e-15)
    w.end_epoch()  # epoch 2: task 2 appears for the first time: its base is this epoch's mean
    assert torch.equal(w.base_losses, t(3.0, 4.0, 5.0))
    o = call(w, t(1.0, 2.0, 2.5), [1, 2])
    ref = 2 * torch.softmax(t(2.0 / 4.0, 2.5 / 5.0), dim=0)
    torch.testing.assert_close(w.weights, ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(o, ref * torch.log(t(2.0, 2.5)), rtol=0, atol=1e-15)


# --- FAMO ---------------------------------------------------------------------------------
def _adam_state(w: FAMO) -> dict:
    state = w._adam.state[w.logits]
    return {k: v.clone() for k, v in state.items()}


def test_famo_model_step_over_present_tasks():
    w = FAMO(4, dtype=F64, min_losses=[0.1, 0.0, 0.2, 0.0])
    with torch.no_grad():
        w.logits.copy_(t(0.3, -0.2, 0.5, 0.1))
    losses = t(1.0, 2.0, 0.7, 3.0)
    o = call(w, losses, [0, 2, 3])
    z = torch.softmax(t(0.3, 0.5, 0.1), dim=0)
    d = t(1.0 - 0.1, 0.7 - 0.2, 3.0) + 1e-8
    c = 1 / (z / d).sum()
    torch.testing.assert_close(o, c * z * torch.log(d), rtol=0, atol=1e-15)
    assert torch.equal(w.weights, z)


def test_famo_masked_adam_moves_only_present_coordinates():
    w = FAMO(3, gamma=0.01, w_lr=0.1, dtype=F64)
    b1, b2, eps = 0.9, 0.999, 1e-8
    # one all-present weight step through torch.optim.Adam
    call(w, t(2.0, 1.0, 3.0), None)
    w.after_step()
    post(w, t(1.5, 0.9, 2.0), None)
    xi0, st0 = w.logits.detach().clone(), _adam_state(w)
    assert st0["step"].item() == 1.0
    # a weight step with task 1 missing
    before, after = t(2.0, 0.0, 3.0), t(1.0, 0.0, 2.5)
    call(w, before, [0, 2])
    w.after_step()
    post(w, after, [0, 2])
    st1 = _adam_state(w)
    xi1 = w.logits.detach()
    # the missing coordinate: value, moments and step count unchanged, bit for bit
    assert xi1[1] == xi0[1]
    assert st1["exp_avg"][1] == st0["exp_avg"][1]
    assert st1["exp_avg_sq"][1] == st0["exp_avg_sq"][1]
    assert torch.equal(w.state_dict()["coord_steps"], t(2.0, 1.0, 2.0))
    # the present ones: Adam (L2 decay in the gradient) on delta_P with step 2, written out
    idx = [0, 2]
    z = torch.softmax(xi0[idx], dim=0)
    delta = torch.log(before[idx] + 1e-8) - torch.log(after[idx] + 1e-8)
    g = z * (delta - (z * delta).sum()) + 0.01 * xi0[idx]
    m = b1 * st0["exp_avg"][idx] + (1 - b1) * g
    v = b2 * st0["exp_avg_sq"][idx] + (1 - b2) * g * g
    ref = xi0[idx] - 0.1 / (1 - b1**2) * m / (v.sqrt() / math.sqrt(1 - b2**2) + eps)
    torch.testing.assert_close(xi1[idx], ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(st1["exp_avg"][idx], m, rtol=0, atol=1e-15)
    torch.testing.assert_close(st1["exp_avg_sq"][idx], v, rtol=0, atol=1e-15)
    # an all-present step afterwards uses each coordinate's own count (3, 2, 3)
    call(w, t(1.0, 1.0, 2.0), None)
    w.after_step()
    post(w, t(0.9, 0.8, 1.9), None)
    assert torch.equal(w.state_dict()["coord_steps"], t(3.0, 2.0, 3.0))


def test_famo_update_weighting_with_other_tasks_raises_and_changes_nothing():
    w = FAMO(3, dtype=F64)
    call(w, t(2.0, 1.0, 3.0), [0, 2])
    w.after_step()
    state = w.state_dict()
    for present in (None, [0, 1], [2]):
        with pytest.raises(ValueError, match="same tasks"):
            post(w, t(1.0, 0.5, 2.0), present)
    after = w.state_dict()
    assert torch.equal(after["logits"], state["logits"]) and after["adam"] == state["adam"]
    assert torch.equal(after["log_d"], state["log_d"]) and after["stepped"] == state["stepped"]
    assert torch.equal(after["present"], t(0, 2).long())
    post(w, t(1.0, 0.5, 2.0), [0, 2])  # the right tasks go through
    assert w.logits[1].item() == 0.0 and w.logits[0].item() != 0.0


def test_famo_state_dict_round_trip_with_missing_tasks():
    a = FAMO(3, dtype=F64)
    call(a, t(2.0, 1.0, 3.0), [1, 2])
    a.after_step()
    post(a, t(1.0, 0.5, 2.0), [1, 2])
    call(a, t(2.0, 1.0, 3.0), [0, 1])
    a.after_step()
    b = FAMO(3, dtype=F64)
    b.load_state_dict(a.state_dict())
    for w in (a, b):
        post(w, t(1.5, 0.7, 2.0), [0, 1])
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.state_dict()["coord_steps"], b.state_dict()["coord_steps"])
    assert torch.equal(a.state_dict()["coord_steps"], t(1.0, 2.0, 1.0))


# --- the uncertainty family ---------------------------------------------------------------
def _grads(w: Weighting, losses: torch.Tensor, present: Sequence[int]) -> list:
    for p in w.parameters():
        p.grad = None
    call(w, losses, present).sum().backward()
    return [p.grad for p in w.parameters()]


def test_uncertainty_missing_parameter_gets_no_gradient_and_does_not_move():
    uw = Uncertainty(3, dtype=F64)
    uw.log_vars = t(0.2, -0.4, 1.0)
    losses = t(2.0, 0.5, 3.0)
    o = call(uw, losses, [0, 2])
    s = t(0.2, 1.0)
    torch.testing.assert_close(o, 0.5 * torch.exp(-s) * t(2.0, 3.0) + 0.5 * s, rtol=0, atol=0)
    torch.testing.assert_close(uw.weights, 0.5 * torch.exp(-s), rtol=0, atol=0)
    grads = _grads(uw, losses, [0, 2])
    assert grads[1] is None
    torch.testing.assert_close(
        torch.stack([grads[0], grads[2]]), 0.5 - 0.5 * torch.exp(-s) * t(2.0, 3.0)
    )
    # the base optimizer skips it: value and state untouched (Adam with weight decay)
    opt = torch.optim.Adam(uw.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        call(uw, losses, [0, 2]).sum().backward()
        opt.step()
    params = uw.parameters()
    assert params[1].item() == -0.4 and params[1] not in opt.state
    assert params[0].item() != 0.2 and params[2].item() != 1.0


def test_grouped_uncertainty_group_with_all_tasks_missing_gets_no_gradient():
    gu = GroupedUncertainty([[0, 2], [1, 3]], dtype=F64)
    gu.log_vars = t(0.5, -1.0)
    losses = t(1.0, 2.0, 3.0, 4.0)
    grads = _grads(gu, losses, [0, 2])  # only group 0's tasks
    assert grads[1] is None
    e = 0.5 * math.exp(-0.5)
    assert grads[0].item() == pytest.approx(2 * 0.5 - e * (1.0 + 3.0), abs=1e-14)
    grads = _grads(gu, losses, [2, 3])  # one task of each group
    assert grads[0].item() == pytest.approx(0.5 - e * 3.0, abs=1e-14)
    assert grads[1].item() == pytest.approx(0.5 - 0.5 * math.exp(1.0) * 4.0, abs=1e-13)


def test_grouped_uncertainty_automatic_grouping_with_missing_tasks():
    gu = GroupedUncertainty(num_tasks=3, n_groups=3, dtype=F64)
    call(gu, t(2.0, 2.0, 9.0), [0, 1])  # task 2 unseen in the first epoch
    gu.end_epoch()
    assert torch.isnan(gu.first_mean[2]) and torch.equal(gu.first_mean[:2], t(2.0, 2.0))
    call(gu, t(1.0, 3.0, 4.0), None)
    gu.end_epoch()
    # ratios 0.5, 1.5, and task 2's first mean is this epoch's (ratio 1)
    assert torch.equal(gu.first_mean, t(2.0, 2.0, 4.0))
    assert gu.groups == [[0], [2], [1]]
    call(gu, t(1.0, 0.0, 8.0), [0, 2])  # task 1 absent: its mean carried forward (ratio 1.5)
    gu.end_epoch()
    assert gu.groups == [[0], [1], [2]]  # ratios 0.5, 1.5 (carried), 2.0


def test_constrained_uncertainty_over_present_tasks():
    cu = ConstrainedUncertainty(3, bounds=(0.5, 1.5), dtype=F64)
    cu.log_vars = t(0.0, 2.0, -1.0)
    losses = t(1.0, 2.0, 0.5)
    o = call(cu, losses, [0, 2])
    u = 0.5 * torch.exp(-t(0.0, -1.0))
    w = bounded_rescale(u, 0.5, 1.5, 2.0)
    torch.testing.assert_close(cu.weights, w, rtol=0, atol=0)
    assert cu.weights.sum().item() == pytest.approx(2.0)
    ref = w * t(1.0, 0.5) + u * t(1.0, 0.5) + 0.5 * t(0.0, -1.0)
    torch.testing.assert_close(o, ref, rtol=0, atol=1e-15)
    assert _grads(cu, losses, [0, 2])[1] is None
    assert cu._dwa.present is None  # the inner DWA's present is reset after the call


# --- GradNorm -----------------------------------------------------------------------------
def test_gradnorm_initial_losses_at_first_appearance_and_balance_over_present():
    w = GradNorm(3, alpha=1.0, dtype=F64)
    call(w, t(2.0, 4.0, 9.0), [0, 1])
    assert torch.equal(w.initial_losses[:2], t(2.0, 4.0)) and torch.isnan(w.initial_losses[2])
    w.after_step()  # a step (w has no gradient yet: renormalising 1s changes nothing)
    call(w, t(1.0, 3.0, 6.0), [1, 2])
    assert torch.equal(w.initial_losses, t(2.0, 4.0, 6.0))  # task 1 keeps its first loss
    w.after_step()
    assert torch.equal(w.loss_weights.detach(), t(1.0, 1.0, 1.0))
    with torch.no_grad():
        w.loss_weights.copy_(t(0.5, 1.5, 1.0))
    losses = t(1.0, 3.0, 3.0)
    o = call(w, losses, [0, 2])
    torch.testing.assert_close(o, t(0.5, 1.0) * t(1.0, 3.0), rtol=0, atol=0)
    jac = torch.tensor([[0.3, 0.4], [1.0, 0.0]], dtype=F64)  # rows of w_i L_i, i in P
    w.observe(jac)
    norms = t(0.5, 1.0)
    ratio = t(1.0 / 2.0, 3.0 / 6.0)
    target = norms.mean() * ratio / ratio.mean()
    grad = torch.sign(norms - target) * norms / t(0.5, 1.0)
    assert torch.equal(w.loss_weights.grad, t(grad[0].item(), 0.0, grad[1].item()))
    # a step of the base optimizer (momentum moves every coordinate), then the renormalisation
    opt = torch.optim.SGD(w.parameters(), lr=0.1, momentum=0.9)
    opt.state[w.loss_weights]["momentum_buffer"] = t(0.2, 0.2, 0.2)
    opt.step()
    stepped = w.loss_weights.detach().clone()
    w.after_step()
    after = w.loss_weights.detach()
    assert after[1].item() == 1.5  # the absent task's weight did not move
    kept = stepped[[0, 2]]
    torch.testing.assert_close(after[[0, 2]], 2 * kept / kept.sum(), rtol=0, atol=1e-15)
    assert after[[0, 2]].sum().item() == pytest.approx(2.0)


def test_gradnorm_state_dict_round_trip_with_missing_tasks():
    a = GradNorm(3, dtype=F64)
    call(a, t(2.0, 4.0, 9.0), [0, 2])
    b = GradNorm(3, dtype=F64)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.initial_losses.isnan(), b.initial_losses.isnan())
    for w in (a, b):
        call(w, t(1.0, 3.0, 6.0), [1, 2])
    torch.testing.assert_close(a.initial_losses, b.initial_losses, equal_nan=True, rtol=0, atol=0)


# --- state dicts --------------------------------------------------------------------------
SEQUENCE = [
    (t(2.0, 1.0, 3.0), [0, 2]),
    (t(1.5, 2.0, 2.5), None),
    "end",
    (t(1.0, 1.5, 2.0), [1]),
    "end",
    (t(0.8, 1.2, 2.2), [0, 1]),
]


@pytest.mark.parametrize(
    "make",
    [
        lambda: DWA(),
        lambda: IGB(base_epoch=0),
        lambda: RLW(seed=3),
        lambda: GroupedUncertainty(num_tasks=3, n_groups=2, dtype=F64),
        lambda: ConstrainedUncertainty(3, dtype=F64),
    ],
    ids=["DWA", "IGB", "RLW", "GroupedUncertainty", "ConstrainedUncertainty"],
)
def test_state_dict_round_trip_after_missing_tasks(make):
    a = make()
    for item in SEQUENCE:
        if item == "end":
            a.end_epoch()
        else:
            call(a, *item)
    b = make()
    b.load_state_dict(a.state_dict())
    for item in [(t(1.0, 2.0, 3.0), [0, 2]), "end", (t(0.5, 2.5, 1.0), None), "end"] * 2:
        if item == "end":
            a.end_epoch()
            b.end_epoch()
            continue
        oa, ob = call(a, *item), call(b, *item)
        assert torch.equal(oa, ob) and torch.equal(a.weights, b.weights)


def test_epoch_state_saved_before_per_task_counts_still_loads():
    a = DWA()
    for _ in range(2):
        a(t(1.0, 2.0))
        a.end_epoch()
    a(t(3.0, 1.0))
    state = a.state_dict()
    old = {k: v for k, v in state.items() if k not in ("task_count", "last")}
    b = DWA()
    b.load_state_dict(old)
    b.end_epoch()
    a.end_epoch()
    assert torch.equal(a.state_dict()["history"][1], b.state_dict()["history"][1])
    call(a, t(1.0, 1.0), [0])
    call(b, t(1.0, 1.0), [0])
    a.end_epoch()
    b.end_epoch()  # task 1 absent: both carry its previous mean forward
    assert torch.equal(a.state_dict()["history"][1], b.state_dict()["history"][1])


def test_uncertainty_loads_a_state_with_one_vector_of_log_variances():
    uw = Uncertainty(3, dtype=F64)
    uw.load_state_dict({"parameters": [t(0.1, 0.2, 0.3)]})
    assert torch.equal(uw.log_vars, t(0.1, 0.2, 0.3))
    assert [p.shape for p in uw.parameters()] == [torch.Size([])] * 3
    with pytest.raises(ValueError, match="log-variances"):
        uw.log_vars = t(0.1, 0.2)
