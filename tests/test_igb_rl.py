"""IGBRL (IGB v2) and its SAC agent: reward, warm-up, schedule, log-prob, Polyak, training,
resume."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from conftest import batches, examples, jacobian, leaf, make_model, t
from hypothesis import given, settings
from hypothesis import strategies as st

import mtl_optim
from mtl_optim.weighting import IGBRL
from mtl_optim.weighting._sac import SAC, schedule

F64 = torch.float64


def generator_copy(g: torch.Generator) -> torch.Generator:
    copy_ = torch.Generator()
    copy_.set_state(g.get_state())
    return copy_


def small_agent(k: int, seed: int = 0, **kw) -> SAC:
    return SAC(k, torch.Generator().manual_seed(seed), hidden=(16, 16), **kw)


# --- reward, transitions, reward scale ---------------------------------------------------
def test_reward_and_transitions_on_scripted_losses():
    w = IGBRL(steps_per_epoch=2, seed=0)  # base_epoch 1
    param = torch.zeros(1, requires_grad=True)
    sgd = torch.optim.SGD([param], lr=1.0)
    w.attach(sgd)
    for epoch in ([(3.0, 3.0), (5.0, 5.0)], [(1.0, 6.0), (3.0, 2.0)]):
        for losses in epoch:
            w(leaf(*losses))
        assert w.agent.buffer.size == 0  # no transition before the base losses exist
        with pytest.raises(RuntimeError, match="base losses"):
            w.reward(t(1.0, 1.0), t(1.0, 1.0))
        w.end_epoch()
    torch.testing.assert_close(w.base_losses, t(2.0, 4.0))  # the means of epoch 1
    sgd.param_groups[0]["lr"] = 0.25  # the scheduler's decay, read at the next call: rho = 4
    w_prev = w.weights.clone()
    w(leaf(1.0, 3.0))
    assert w.reward_scale == 4.0
    # r = 4 * min((3 - 1) / 2, (2 - 3) / 4) = -1
    buf = w.agent.buffer
    assert buf.size == 1 and buf.reward[0].item() == -1.0
    torch.testing.assert_close(buf.state[0], torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(buf.action[0], w_prev.float(), rtol=0, atol=0)
    torch.testing.assert_close(buf.next_state[0], torch.tensor([1.0, 3.0]))
    sgd.param_groups[0]["lr"] = 0.5  # inside an epoch: rho stays
    w(leaf(0.5, 1.0))
    assert w.reward_scale == 4.0
    assert buf.reward[1].item() == 1.0  # 4 * min(0.5 / 2, 2 / 4)
    assert w.reward(t(1.0, 2.0), t(2.0, 2.0)) == 4.0 * (-1.0 / 2.0)
    w.end_epoch()  # rho = 1 / 0.5 at the next call, whichever of end_epoch / lr change came first
    w(leaf(0.5, 1.0))
    assert w.reward_scale == 2.0 and buf.reward[2].item() == 0.0


@settings(max_examples=examples(30))
@given(
    st.lists(st.floats(0.01, 100.0), min_size=2, max_size=5),
    st.lists(st.floats(0.01, 100.0), min_size=2, max_size=5),
    st.floats(1e-3, 1e3),
)
def test_reward_is_the_worst_normalised_improvement_and_scale_free(prev, cur, c):
    k = min(len(prev), len(cur))
    prev, cur = t(*prev[:k]), t(*cur[:k])
    w = IGBRL(steps_per_epoch=1, base_epoch=0, seed=0)
    w(prev.clone().requires_grad_(True))
    w.end_epoch()  # base = prev
    assert w.reward(prev, cur) == pytest.approx(min(1 - cur / prev).item(), rel=1e-12, abs=1e-12)
    scaled = IGBRL(steps_per_epoch=1, base_epoch=0, seed=0)
    scaled((c * prev).requires_grad_(True))
    scaled.end_epoch()
    assert scaled.reward(c * prev, c * cur) == pytest.approx(
        w.reward(prev, cur), rel=1e-9, abs=1e-9
    )


# --- warm-up, then the actor -------------------------------------------------------------
def test_warm_up_weights_are_k_softmax_of_generator_normals_then_actor_samples():
    w = IGBRL(steps_per_epoch=3, start_epoch=2, seed=3)
    x = t(0.5, 2.0, 4.0)
    w(x.clone().requires_grad_(True))  # builds the agent (its init draws one seed)
    for _ in range(1, 6):  # warm-up until step start_epoch * steps_per_epoch = 6
        g = generator_copy(w.generator)
        expected = (3 * torch.softmax(torch.randn(3, generator=g), dim=0)).double()
        jac = jacobian(w, x)
        torch.testing.assert_close(w.weights, expected, rtol=0, atol=0)
        # o_i = w_i log L_i with constant weights: d o_i / d L_i = w_i / L_i
        torch.testing.assert_close(jac, torch.diag(expected / x))
    g = generator_copy(w.generator)
    with torch.no_grad():
        mu, log_std = w.agent.actor(x.float().unsqueeze(0))
        u = mu + log_std.exp() * torch.randn(mu.shape, generator=g)
    o = w(x.clone().requires_grad_(True))
    expected = (3 * torch.softmax(u, dim=-1)).squeeze(0).double()
    torch.testing.assert_close(w.weights, expected, rtol=0, atol=0)
    torch.testing.assert_close(o.detach(), expected * torch.log(x))
    assert w.weights.sum().item() == pytest.approx(3.0, rel=1e-6)


# --- the training schedule ---------------------------------------------------------------
def test_schedule_golden_values():
    assert schedule(0, 10_000, 50, 256) == (25, 128)  # empty buffer
    assert schedule(10_000, 10_000, 50, 256) == (50, 256)  # full buffer
    assert schedule(5_000, 10_000, 50, 256) == (37, 192)  # kappa = 1.5


def run_standalone(w: IGBRL, steps: range, spe: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in steps:
        x = torch.rand(2, generator=gen, dtype=F64) + 0.5 / (1 + step)
        w(x.requires_grad_(True))
        out.append(w.weights.clone())
        if step % spe == spe - 1:
            w.end_epoch()
    return out


def test_which_calls_train_and_how_many_updates_of_what_batch():
    w = IGBRL(
        steps_per_epoch=4,
        base_epoch=0,
        update_every=6,
        buffer_size=10,
        batch_size=8,
        seed=0,
    )
    run_standalone(w, range(1), spe=4)
    calls = []
    update = w.agent.update
    w.agent.update = lambda n: (calls.append((w.step, n)), update(n))
    run_standalone(w, range(1, 31), spe=4)
    # Transitions from step 4 (base set after step 3); training at steps >= 3*4 with step % 6 == 0.
    # Step 12: |B| = 9 of 10, kappa = 1.9: 5 updates of 7. Later the buffer is full: 6 of 8.
    assert calls == [(12, 7)] * 5 + [(18, 8)] * 6 + [(24, 8)] * 6 + [(30, 8)] * 6
    assert w.sac_updates == 23 and w.last_update_seconds > 0
    assert (w.agent.buffer.size, w.agent.buffer.ptr) == (10, 27 % 10)
    # The base losses arrive too late for the first scheduled trainings: they are skipped.
    late = IGBRL(steps_per_epoch=4, base_epoch=3, update_every=6, buffer_size=10, seed=0)
    run_standalone(late, range(13), spe=4)
    assert (
        late.agent.buffer.size == 0 and late.sac_updates == 0 and late.last_update_seconds is None
    )
    run_standalone(late, range(13, 19), spe=4)
    assert late.agent.buffer.size == 3 and late.sac_updates == 3  # step 18: int(6 * 1.3 / 2)


# --- the SAC agent -----------------------------------------------------------------------
def test_log_prob_against_a_direct_computation():
    tanh, gauss = small_agent(3), small_agent(3, logprob="gaussian")
    g = torch.Generator().manual_seed(0)
    u, mu = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    log_std = torch.rand(5, 3, generator=g) - 1
    normal = torch.distributions.Normal(mu, log_std.exp()).log_prob(u).sum(-1, keepdim=True)
    torch.testing.assert_close(gauss.log_prob(u, mu, log_std), normal)
    squash = torch.log(1 - torch.tanh(u) ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(tanh.log_prob(u, mu, log_std), normal - squash)
    # by hand, u = (0, 1), mu = 0, sigma = 1: log N = -log(2 pi) - 1/2 and
    # log(1 - tanh^2 1) = -2 log cosh 1
    u, zero = torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2)
    hand = -math.log(2 * math.pi) - 0.5
    assert small_agent(2).log_prob(u, zero, zero).item() == pytest.approx(
        hand + 2 * math.log(math.cosh(1.0)), rel=1e-6
    )
    assert small_agent(2, logprob="gaussian").log_prob(u, zero, zero).item() == pytest.approx(
        hand, rel=1e-6
    )
    with pytest.raises(ValueError, match="logprob"):
        small_agent(2, logprob="exact")


@settings(max_examples=examples(25))
@given(st.integers(2, 6), st.floats(-6.0, 6.0), st.integers(0, 2**31))
def test_actions_are_weights_summing_to_k_for_losses_of_any_scale(k, exponent, seed):
    agent = small_agent(k, seed)
    g = torch.Generator().manual_seed(seed)
    states = 10.0**exponent * torch.rand(4, k, generator=g)
    a, logp = agent.policy(states)
    assert a.shape == (4, k) and logp.shape == (4, 1) and torch.isfinite(logp).all()
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.full((4,), float(k)))


def test_one_update_steps_every_network_and_polyak_averages_the_target():
    agent = small_agent(2, capacity=16)
    g = torch.Generator().manual_seed(1)
    for _ in range(16):
        s, s2 = torch.rand(2, generator=g), torch.rand(2, generator=g)
        agent.buffer.add(s, agent.act(s), torch.randn((), generator=g).item(), s2)
    critic0 = copy.deepcopy(agent.critic.state_dict())
    target0 = copy.deepcopy(agent.critic_target.state_dict())
    actor0 = copy.deepcopy(agent.actor.state_dict())
    log_alpha0 = agent.log_alpha.item()
    for key in critic0:  # the target starts as a copy of the critics
        torch.testing.assert_close(target0[key], critic0[key], rtol=0, atol=0)
    agent.update(8)
    critic1, target1 = agent.critic.state_dict(), agent.critic_target.state_dict()
    for key in critic0:
        assert not torch.equal(critic1[key], critic0[key])
        torch.testing.assert_close(target1[key], 0.995 * target0[key] + 0.005 * critic1[key])
    assert all(not torch.equal(v, actor0[key]) for key, v in agent.actor.state_dict().items())
    assert agent.log_alpha.item() != log_alpha0
    assert math.exp(log_alpha0) == pytest.approx(0.2)
    assert all(not p.requires_grad for p in agent.critic_target.parameters())


# --- through MTLOptimizer ------------------------------------------------------------------
K, SPE = 3, 4


def train(opt, model, data, epochs: range, sched=None) -> list[torch.Tensor]:
    weights = []
    for _ in epochs:
        for x, ys in data:
            opt.zero_grad()
            opt.backward(model.losses(x, ys))
            opt.step()
            weights.append(opt.last_weights.clone())
        opt.end_epoch()
        if sched is not None:
            sched.step()
    return weights


def mean_losses(model, data) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([torch.stack(model.losses(x, ys)) for x, ys in data]).mean(0)


def test_official_schedule_training_lowers_the_losses_and_is_reproducible():
    def run():
        model = make_model(K)
        igb = IGBRL(steps_per_epoch=SPE, buffer_size=64, seed=0)
        opt = mtl_optim.MTLOptimizer(model.parameters(), lr=1e-2, weighting=igb)
        data = batches(K, SPE)
        first = mean_losses(model, data)
        rng = torch.get_rng_state()
        weights = train(opt, model, data, range(26))  # 104 steps: SAC trains at 50 and 100
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never touched
        return igb, model, weights, first, mean_losses(model, data)

    igb, model, weights, first, last = run()
    assert (last < 0.9 * first).all(), (first, last)
    # Transitions from step 8 on: at step 50 |B| = 43 of 64, int(50 * (1 + 43/64) / 2) = 41
    # updates; at step 100 the buffer is full: 50.
    assert igb.sac_updates == 41 + 50
    assert igb.agent.buffer.size == 64 and igb.last_update_seconds > 0
    # The weights are K·softmax computed by the float32 agent, then cast to the losses' float64:
    # each entry carries a few float32 roundings (exp, the division, the product by K) relative
    # to its size, so their sum is K only up to a few K·eps(float32), not to float64 precision.
    eps32 = torch.finfo(torch.float32).eps
    sums = torch.stack(weights).sum(-1)
    assert ((sums - K).abs() <= 8 * K * eps32).all(), sums - K
    _, model2, weights2, _, _ = run()
    assert all(torch.equal(a, b) for a, b in zip(weights, weights2))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_checkpoint_through_torch_save_resumes_bit_identically():
    data = batches(K, SPE)

    def fresh():
        model = make_model(K)
        igb = IGBRL(steps_per_epoch=SPE, update_every=10, buffer_size=32, batch_size=16, seed=7)
        opt = mtl_optim.MTLOptimizer(model.parameters(), lr=1e-2, weighting=igb)
        return model, igb, opt, torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)

    model, igb, opt, sched = fresh()
    train(opt, model, data, range(8), sched)  # past the warm-up (step 20) and trainings at 20, 30
    assert igb.sac_updates > 0 and igb.reward_scale == 4.0
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    ref = train(opt, model, data, range(8, 14), sched)
    model2, igb2, opt2, sched2 = fresh()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    got = train(opt2, model2, data, range(8, 14), sched2)
    assert igb2.sac_updates == igb.sac_updates > 0 and igb2.reward_scale == 16.0
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_standalone_state_round_trip_mid_epoch_and_before_the_agent_exists():
    for cut in (0, 6, 23):
        a = IGBRL(steps_per_epoch=4, update_every=6, buffer_size=8, batch_size=4, seed=2)
        run_standalone(a, range(cut), spe=4)
        b = IGBRL(steps_per_epoch=4, update_every=6, buffer_size=8, batch_size=4, seed=99)
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        ref = run_standalone(a, range(cut, 30), spe=4)
        got = run_standalone(b, range(cut, 30), spe=4)
        assert all(torch.equal(x, y) for x, y in zip(ref, got))
        assert a.sac_updates == b.sac_updates > 0
    with pytest.raises(ValueError, match="base_losses"):
        IGBRL(steps_per_epoch=1).load_state_dict({"generator": torch.Generator().get_state()})


# --- guards and repr -----------------------------------------------------------------------
def test_guards_and_repr():
    w = IGBRL(steps_per_epoch=2, seed=0)
    o = w(leaf(0.0, 2.0))  # a zero loss: the log is floored, no -inf
    assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match=">= 0"):
        w(leaf(-1.0, 2.0))
    w.end_epoch()
    with pytest.raises(ValueError, match="got 3"):
        w(leaf(1.0, 2.0, 3.0))
    for kwargs, err in [
        ({"steps_per_epoch": 0}, ValueError),
        ({"steps_per_epoch": 2.0}, TypeError),
        ({"steps_per_epoch": True}, TypeError),
        ({"steps_per_epoch": 1, "base_epoch": -1}, ValueError),
        ({"steps_per_epoch": 1, "update_every": 1}, ValueError),
        ({"steps_per_epoch": 1, "batch_size": 1}, ValueError),
        ({"steps_per_epoch": 1, "buffer_size": 1e4}, TypeError),
        ({"steps_per_epoch": 1, "sac_lr": 0.0}, ValueError),
        ({"steps_per_epoch": 1, "eps": -1.0}, ValueError),
        ({"steps_per_epoch": 1, "logprob": "exact"}, ValueError),
        ({"steps_per_epoch": 1, "seed": 1.5}, TypeError),
    ]:
        with pytest.raises(err):
            IGBRL(**kwargs)
    assert repr(IGBRL(4, seed=0)) == (
        "IGBRL(steps_per_epoch=4, base_epoch=1, start_epoch=5, update_after=3, update_every=50, "
        "sac_lr=0.0003, buffer_size=10000, batch_size=256, logprob='tanh_correction', "
        "eps=1e-08, seed=0)"
    )
