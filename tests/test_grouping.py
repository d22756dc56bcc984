"""TAG task grouping: lookahead affinity, the grouping search, alternating random task groups."""

from __future__ import annotations

import copy
import io
import itertools
import math

import matplotlib
import numpy as np
import pytest
import torch
from conftest import HPS, batches, examples, make_model, train_two_task
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mtl_optim
from mtl_optim.adatask import AdaTask
from mtl_optim.aggregators import MGDA
from mtl_optim.grouping import RandomTaskGrouping, TaskAffinity, plot_affinity, select_groups

matplotlib.use("Agg")
F64 = torch.float64


def hps_losses(model: HPS, batch) -> list[torch.Tensor]:
    x, ys = batch
    return model.losses(x, ys)


# --- TaskAffinity: closed form with SGD ---------------------------------------------------
class LinearTwoTask(nn.Module):
    """``z = x w`` (shared ``w``), task ``k`` predicts ``a_k z`` (task-specific scalar ``a_k``)."""

    def __init__(self, w: list[float], a: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=F64))
        self.a = nn.ParameterList(nn.Parameter(torch.tensor(v, dtype=F64)) for v in a)

    def losses(self, x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        z = x @ self.w
        return [((a * z - y) ** 2).mean() for a, y in zip(self.a, ys)]


def test_sgd_lookahead_matches_a_hand_computed_example():
    # x = I, w = (1, 1), heads a = (1, 2), y1 = (0, 2), y2 = (0, 0): L1 = 1, L2 = 4;
    # g1 = (1, -1), g2 = (4, 4). lr 0.1: w - 0.1 g1 = (0.9, 1.1) gives L1 = 0.81, L2 = 4.04;
    # w - 0.1 g2 = (0.6, 0.6) gives L1 = 1.16, L2 = 1.44. Z = (1 - L'/L) / lr, A[j, i] = Z_{i→j}.
    model = LinearTwoTask([1.0, 1.0], [1.0, 2.0])
    batch = (
        torch.eye(2, dtype=F64),
        [torch.tensor([0.0, 2.0], dtype=F64), torch.zeros(2, dtype=F64)],
    )
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.1)
    aff = TaskAffinity(model, opt, lambda m, b: m.losses(*b), every=1)
    z = aff.step(batch)  # before any backward: the shared w is found from the graph
    expected = torch.tensor([[1.9, -1.6], [-0.1, 6.4]], dtype=F64)
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(aff.affinity(), expected, rtol=1e-12, atol=1e-12)
    raw = TaskAffinity(model, opt, lambda m, b: m.losses(*b), normalize_by_lr=False).step(batch)
    torch.testing.assert_close(raw, 0.1 * expected, rtol=1e-12, atol=1e-12)


def test_sgd_lookahead_matches_the_closed_form_on_random_data():
    g = torch.Generator().manual_seed(3)
    n, d, k, lr = 12, 5, 3, 0.03
    x = torch.randn(n, d, generator=g, dtype=F64)
    ys = [torch.randn(n, generator=g, dtype=F64) for _ in range(k)]
    heads = torch.randn(k, generator=g, dtype=F64).tolist()
    model = LinearTwoTask(torch.randn(d, generator=g, dtype=F64).tolist(), heads)
    w = model.w.detach().clone()
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=lr)
    opt.backward(model.losses(x, ys))  # the optimizer now knows its shared parameter
    aff = TaskAffinity(model, opt, lambda m, b: m.losses(*b))

    def loss(j: int, weights: torch.Tensor) -> torch.Tensor:
        return ((heads[j] * (x @ weights) - ys[j]) ** 2).mean()

    # ∇_w L_i = (2/n) a_i xᵀ (a_i x w - y_i)
    grads = [2 / n * heads[i] * x.T @ (heads[i] * (x @ w) - ys[i]) for i in range(k)]
    expected = torch.tensor(
        [[(1 - loss(j, w - lr * grads[i]) / loss(j, w)) / lr for i in range(k)] for j in range(k)],
        dtype=F64,
    )
    torch.testing.assert_close(aff.step((x, ys)), expected, rtol=1e-10, atol=1e-12)


# --- TaskAffinity: the optimizer's own rule, against copying the optimizer and stepping -----
OPTIMIZERS = [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (torch.optim.Adam, dict(lr=0.01, weight_decay=0.01)),
    (torch.optim.Adam, dict(lr=0.01, amsgrad=True, betas=(0.8, 0.9))),
    (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
]


def base_state(opt: mtl_optim.MTLOptimizer) -> dict:
    """The wrapped torch optimizer's state_dict (MTLOptimizer's without its "mtl" entry)."""
    state = opt.state_dict()
    del state["mtl"]
    return state


def reference_affinity(model, make_opt, state, batch, lr: float) -> torch.Tensor:
    """Copy the model, rebuild the optimizer from ``state``, put task i's shared gradient
    alone in ``.grad`` and really step."""
    k = len(batch[1])
    before = torch.stack(hps_losses(model, batch)).detach()
    out = torch.empty(k, k, dtype=F64)
    for i in range(k):
        m = copy.deepcopy(model)
        o = make_opt(m.parameters())
        o.load_state_dict(copy.deepcopy(state))  # loading aliases same-dtype state tensors
        shared = list(m.trunk.parameters())
        grads = torch.autograd.grad(hps_losses(m, batch)[i], shared)
        o.zero_grad()
        for p, g in zip(shared, grads):
            p.grad = g
        o.step()
        with torch.no_grad():
            out[:, i] = 1 - torch.stack(hps_losses(m, batch)) / before
    return out / lr


@pytest.mark.parametrize("base, kwargs", OPTIMIZERS)
def test_optimizer_lookahead_equals_copying_the_optimizer_and_stepping(base, kwargs):
    k = 3
    model = make_model(k)
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=base, **kwargs)
    aff = TaskAffinity(model, opt, hps_losses, every=3)

    def make(params):
        return base(params, **kwargs)

    data = batches(k, 4)
    for step, batch in enumerate(data):  # measured at step 0 (no state yet) and step 3
        opt.zero_grad()
        opt.backward(hps_losses(model, batch))
        z = aff.step(batch)
        if step % 3 == 0:
            expected = reference_affinity(model, make, base_state(opt), batch, kwargs["lr"])
            torch.testing.assert_close(z, expected, rtol=1e-9, atol=1e-10)
        else:
            assert z is None
        opt.step()
    # a plain torch optimizer with shared= works the same
    plain = make(model.parameters())
    plain.load_state_dict(base_state(opt))
    aff = TaskAffinity(model, plain, hps_losses, shared=list(model.trunk.parameters()))
    expected = reference_affinity(model, make, base_state(opt), data[0], kwargs["lr"])
    torch.testing.assert_close(aff.step(data[0]), expected, rtol=1e-9, atol=1e-10)


def test_sgd_fallback_and_unsupported_optimizers():
    k = 2
    model = make_model(k)
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.RMSprop, lr=0.01)
    with pytest.raises(TypeError, match="virtual_step='sgd'"):
        TaskAffinity(model, opt, hps_losses)
    with pytest.raises(TypeError, match="AdaTask"):
        TaskAffinity(model, AdaTask(model.parameters(), lr=0.01), hps_losses)
    aff = TaskAffinity(model, opt, hps_losses, virtual_step="sgd")
    batch = batches(k, 1)[0]

    def sgd(params):  # RMSprop's virtual step is plain SGD
        return torch.optim.SGD(params, lr=0.01)

    expected = reference_affinity(model, sgd, sgd(model.parameters()).state_dict(), batch, 0.01)
    torch.testing.assert_close(aff.step(batch), expected)
    assert repr(aff) == (
        "TaskAffinity(every=10, method='lookahead', virtual_step='sgd', normalize_by_lr=True)"
    )


def test_bad_hyperparameters_raise():
    model = make_model(2)
    opt = mtl_optim.MTLOptimizer(model.parameters(), lr=0.01)
    for kwargs, match in [
        (dict(every=0), "every"),
        (dict(method="tag"), "method"),
        (dict(virtual_step="adam"), "virtual_step"),
    ]:
        with pytest.raises(ValueError, match=match):
            TaskAffinity(model, opt, hps_losses, **kwargs)
    with pytest.raises(TypeError, match="every"):
        TaskAffinity(model, opt, hps_losses, every=2.0)
    with pytest.raises(TypeError, match="callable"):
        TaskAffinity(model, opt, None)
    with pytest.raises(RuntimeError, match="no step measured"):
        TaskAffinity(model, opt, hps_losses).affinity()


# --- TaskAffinity: no side effects ------------------------------------------------------
class BNNet(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(k))

    def losses(self, x, ys):
        z = self.trunk(x)
        return [((h(z) - y) ** 2).mean() for h, y in zip(self.heads, ys)]


def train_bn(with_affinity: bool, base, kwargs):
    torch.manual_seed(0)
    k = 3
    model = BNNet(k).double()
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=base, **kwargs)
    aff = TaskAffinity(model, opt, lambda m, b: m.losses(*b), every=1)
    for batch in batches(k, 4):
        opt.zero_grad()
        opt.backward(model.losses(*batch))
        if with_affinity:
            assert torch.isfinite(aff.step(batch)).all()
        opt.step()
    return model, opt, torch.get_rng_state()


@pytest.mark.parametrize("base, kwargs", [OPTIMIZERS[0], OPTIMIZERS[2]])
def test_affinity_leaves_parameters_buffers_state_and_rng_byte_identical(base, kwargs):
    plain_model, plain_opt, plain_rng = train_bn(False, base, kwargs)
    model, opt, rng = train_bn(True, base, kwargs)
    assert model.trunk[1].num_batches_tracked.item() == 4
    for (name, a), b in zip(plain_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(plain_opt.param_groups[0]["params"], opt.param_groups[0]["params"]):
        a, b = plain_opt.state[p], opt.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert len(plain_opt.state) == len(opt.state)
    assert torch.equal(plain_rng, rng)


def test_every_forward_of_a_step_sees_the_same_dropout_masks():
    # a zero step (lr 0) must leave every loss exactly where it was: Z = 0, not dropout noise
    torch.manual_seed(0)
    model = BNNet(3).double()
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.0)
    aff = TaskAffinity(model, opt, lambda m, b: m.losses(*b), normalize_by_lr=False)
    assert torch.equal(aff.step(batches(3, 1)[0]), torch.zeros(3, 3, dtype=F64))


# --- TaskAffinity: averaging, history, checkpoint, cosine ---------------------------------
def test_every_averaging_history_and_resume():
    k = 2
    model = make_model(k)
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.01)
    data = batches(k, 8, seed=4)

    def run(aff, items):
        return [aff.step(batch) for batch in items]

    aff = TaskAffinity(model, opt, hps_losses, every=3)
    first = run(aff, data[:4])  # measured: calls 0 and 3
    aff.end_epoch()
    aff.end_epoch()  # an epoch with no step at all
    saved = io.BytesIO()
    torch.save(aff.state_dict(), saved)
    second = run(aff, data[4:])  # measured: call 6
    aff.end_epoch()
    assert [z is not None for z in first + second] == [i % 3 == 0 for i in range(8)]
    measured = [z for z in first + second if z is not None]
    torch.testing.assert_close(aff.affinity(), sum(measured) / 3)
    assert aff.history[1] is None and len(aff.history) == 3
    torch.testing.assert_close(aff.history[0], (measured[0] + measured[1]) / 2)
    torch.testing.assert_close(aff.history[2], measured[2])

    resumed = TaskAffinity(model, opt, hps_losses, every=3)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved))
    again = run(resumed, data[4:])
    resumed.end_epoch()
    assert all((a is None) == (b is None) for a, b in zip(second, again))
    torch.testing.assert_close(resumed.affinity(), aff.affinity(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a TaskAffinity state"):
        resumed.load_state_dict({"calls": 0})


def test_cosine_affinity_uses_the_shared_weight_matrices_only():
    k = 3
    model = make_model(k)
    opt = mtl_optim.MTLOptimizer(model.parameters(), lr=0.01)
    aff = TaskAffinity(model, opt, hps_losses, method="cosine")
    batch = batches(k, 1)[0]
    weights = [model.trunk[0].weight, model.trunk[2].weight]  # biases (ndim 1) are left out
    rows = torch.stack(
        [
            torch.cat(
                [g.reshape(-1) for g in torch.autograd.grad(loss, weights, retain_graph=True)]
            )
            for loss in hps_losses(model, batch)
        ]
    )
    unit = rows / rows.norm(dim=1, keepdim=True)
    torch.testing.assert_close(aff.step(batch), unit @ unit.T, rtol=1e-12, atol=1e-12)


def test_planted_task_structure_is_found_and_grouped():
    """Tasks 0, 1 fit one function and 2, 3 another: the affinity groups them as such."""
    torch.manual_seed(0)
    k = 4
    model = HPS(k, d_in=4, width=16, d_out=1).double()
    g = torch.Generator().manual_seed(0)
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.05, momentum=0.9)
    aff = TaskAffinity(model, opt, hps_losses, every=2)
    for _ in range(40):
        x = torch.randn(32, 4, generator=g, dtype=F64)
        f, h = torch.sin(2 * x[:, :1]), x[:, 1:2] * x[:, 2:3]
        batch = (x, [f, 1.5 * f, h, -h])
        opt.zero_grad()
        opt.backward(hps_losses(model, batch))
        aff.step(batch)
        opt.step()
    a = aff.affinity()
    mutual = a + a.T  # the affinity of a pair, both ways
    assert min(mutual[0, 1], mutual[2, 3]) > mutual[:2, 2:].max()
    assert select_groups(a, 2, disjoint=True).groups == ((0, 1), (2, 3))


# --- select_groups ------------------------------------------------------------------------
A3 = [[0.0, 1.0, 3.0], [2.0, 0.0, -1.0], [0.5, 4.0, 0.0]]


def test_select_groups_hand_computed_example():
    # scores: {0,1}: 1, 2; {0,2}: 3, 0.5; {1,2}: -1, 4; {0,1,2}: 2, 0.5, 2.25 (tasks in order)
    one = select_groups(A3, 1)
    assert one.groups == ((0, 1, 2),) and one.serving == (0, 0, 0)
    assert one.objective == pytest.approx(4.75 / 3)
    two = select_groups(A3, 2)
    assert two.groups == ((0, 1), (1, 2)) and two.serving == (0, 0, 1)
    assert two.objective == pytest.approx(7 / 3)
    three = select_groups(torch.tensor(A3), 3)
    assert three.groups == ((0, 1), (0, 2), (1, 2)) and three.serving == (1, 0, 2)
    assert three.objective == pytest.approx(3.0)
    # any partition of 3 tasks into 2 or 3 groups has a singleton (score -1e6)
    assert select_groups(A3, 3, disjoint=True) == one


def brute_force(a: np.ndarray, n_groups: int, disjoint: bool) -> float:
    """Enumerate every collection of at most ``n_groups`` non-empty subsets."""
    k = len(a)
    subsets = [s for r in range(1, k + 1) for s in itertools.combinations(range(k), r)]
    table = np.full((len(subsets), k), -np.inf)
    for row, s in enumerate(subsets):
        for t in s:
            others = [a[t][b] for b in s if b != t]
            table[row, t] = sum(others) / len(others) if others else -1e6
    sizes = np.array([len(s) for s in subsets])
    best = -np.inf  # a disjoint collection covering all K tasks with sizes summing to K
    for m in range(1, min(n_groups, len(subsets)) + 1):
        chosen = np.array(list(itertools.combinations(range(len(subsets)), m)))
        served = table[chosen].max(1)  # (collections, K)
        value = served.mean(1)
        if disjoint:
            value = np.where(sizes[chosen].sum(1) == k, value, -np.inf)
        best = max(best, value.max())
    return best


def task_score(a: np.ndarray, t: int, group) -> float:
    others = [a[t][b] for b in group if b != t]
    return sum(others) / len(others) if others else -1e6


def objective_of(a: np.ndarray, groups) -> float:
    return sum(max(task_score(a, t, s) for s in groups if t in s) for t in range(len(a))) / len(a)


@settings(max_examples=examples(40))
@given(st.integers(1, 8), st.integers(1, 4), st.booleans(), st.integers(0, 2**32 - 1))
def test_exact_search_finds_the_brute_force_optimum(k, n_groups, disjoint, seed):
    n_groups = min(n_groups, {6: 3, 7: 3, 8: 2}.get(k, 4))  # keep the brute force small
    a = np.random.default_rng(seed).standard_normal((k, k))
    result = select_groups(a, n_groups, disjoint=disjoint)
    assert result.objective == pytest.approx(brute_force(a, n_groups, disjoint), abs=1e-9)
    assert result.objective == pytest.approx(objective_of(a, result.groups), abs=1e-9)
    assert len(result.groups) <= n_groups
    assert sorted(set().union(*result.groups)) == list(range(k))
    if disjoint:
        assert sum(len(s) for s in result.groups) == k
    for t, g in enumerate(result.serving):  # each task is served by a best group holding it
        assert t in result.groups[g]
        best = max(task_score(a, t, s) for s in result.groups if t in s)
        assert task_score(a, t, result.groups[g]) == best
    assert result == select_groups(a, n_groups, disjoint=disjoint, method="exact")


@pytest.mark.parametrize("disjoint", [False, True])
def test_beam_search_on_twelve_tasks(disjoint):
    rng = np.random.default_rng(7)
    # planted: three blocks of four tasks that help each other and hurt the rest
    blocks = np.repeat(np.arange(3), 4)
    planted = np.where(blocks[:, None] == blocks[None, :], 1.0, -1.0)
    planted = planted + 0.3 * rng.standard_normal((12, 12))
    found = select_groups(planted, 3, disjoint=disjoint)  # auto: beam above 10 tasks
    assert found.groups == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11))
    # random: a valid collection, its objective, never above the exact optimum
    a = rng.standard_normal((12, 12))
    beam = select_groups(a, 3, disjoint=disjoint, method="beam")
    assert len(beam.groups) <= 3 and sorted(set().union(*beam.groups)) == list(range(12))
    assert beam.objective == pytest.approx(objective_of(a, beam.groups), abs=1e-12)
    exact = select_groups(a, 3, disjoint=disjoint, method="exact")
    assert beam.objective <= exact.objective + 1e-12
    assert beam.objective >= objective_of(a, [tuple(range(12))])  # the search's start
    partition = select_groups(a, 3, disjoint=True, method="beam")  # the other start
    assert beam.objective >= partition.objective


def test_select_groups_validation_and_plot():
    with pytest.raises(ValueError, match="square"):
        select_groups(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="NaN"):
        select_groups([[0.0, math.nan], [0.0, 0.0]], 1)
    with pytest.raises(ValueError, match="n_groups must be an int >= 1"):
        select_groups(A3, 0)
    with pytest.raises(TypeError, match="n_groups"):
        select_groups(A3, True)
    with pytest.raises(ValueError, match="method"):
        select_groups(A3, 2, method="greedy")
    with pytest.raises(ValueError, match="at most 12"):
        select_groups(np.zeros((13, 13)), 2, method="exact")
    fig = plot_affinity(torch.tensor(A3), names=["a", "b", "c"])
    ax = fig.axes[0]
    assert ax.get_title() == "inter-task affinity"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="names"):
        plot_affinity(A3, names=["a"])


# --- RandomTaskGrouping -----------------------------------------------------------------
def draw_groups(opt, model, data, steps: int) -> list[tuple[int, ...]]:
    out = []
    for step in range(steps):
        opt.zero_grad()
        opt.backward(hps_losses(model, data[step % len(data)]))
        opt.step()
        out.append(opt.last_group)
    return out


def test_random_groups_are_seeded_rounds_of_balanced_partitions():
    k = 5
    model = make_model(k)
    data = batches(k, 2)

    def groups(seed, **kw):
        opt = RandomTaskGrouping(model.parameters(), base=torch.optim.SGD, lr=0.0, seed=seed, **kw)
        return draw_groups(opt, model, data, 12)

    two = groups(0, n_groups=2)
    assert two == groups(0, n_groups=2) and two != groups(1, n_groups=2)
    for start in range(0, 12, 2):  # each round: a partition into sizes 3 and 2
        round_ = two[start : start + 2]
        assert sorted(i for g in round_ for i in g) == list(range(k))
        assert sorted(len(g) for g in round_) == [2, 3]
    by_size = groups(0, group_size=2)  # ceil(5 / 2) = 3 groups of sizes 2, 2, 1
    for start in range(0, 12, 3):
        assert sorted(len(g) for g in by_size[start : start + 3]) == [1, 2, 2]


@pytest.mark.parametrize("aggregator", [None, MGDA()])
def test_only_the_drawn_group_reaches_the_shared_gradient(aggregator):
    k = 4
    model = make_model(k)
    opt = RandomTaskGrouping(
        model.parameters(),
        base=torch.optim.SGD,
        n_groups=2,
        seed=3,
        aggregator=aggregator,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.1,
    )
    trunk = list(model.trunk.parameters())
    for step, batch in enumerate(batches(k, 4)):
        opt.zero_grad()
        losses = hps_losses(model, batch)
        rows = torch.stack(
            [
                torch.cat(
                    [g.reshape(-1) for g in torch.autograd.grad(loss, trunk, retain_graph=True)]
                )
                for loss in losses
            ]
        )
        heads_before = [copy.deepcopy(h) for h in model.heads]
        opt.backward(losses)
        group = opt.last_group
        chosen = rows[list(group)]
        expected = chosen.sum(0) if aggregator is None else MGDA()(chosen)
        torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in trunk]), expected)
        weights = torch.zeros(k, dtype=opt.last_weights.dtype)
        weights[list(group)] = 1.0 if aggregator is None else MGDA().weights(chosen).to(weights)
        torch.testing.assert_close(opt.last_weights, weights)
        for i, head in enumerate(model.heads):
            if i in group:
                (own,) = torch.autograd.grad(hps_losses(model, batch)[i], [head.weight])
                torch.testing.assert_close(head.weight.grad, own)
            else:
                assert head.weight.grad is None and head.bias.grad is None
        opt.step()
        for i, (head, old) in enumerate(zip(model.heads, heads_before)):  # momentum, decay
            assert torch.equal(head.weight, old.weight) == (i not in group), (step, i)


def test_random_grouping_state_round_trip_is_bit_identical():
    k = 4
    data = batches(k, 8)

    def fresh():
        model = make_model(k)
        return model, RandomTaskGrouping(
            model.parameters(), n_groups=3, seed=5, lr=0.01, base=torch.optim.Adam
        )

    model, opt = fresh()
    draw_groups(opt, model, data, 4)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    rest = draw_groups(opt, model, data[4:], 5)
    model2, opt2 = fresh()
    saved.seek(0)
    state = torch.load(saved)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    assert draw_groups(opt2, model2, data[4:], 5) == rest
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_random_grouping_training_lowers_every_loss():
    _, first, last = train_two_task(
        lambda m: RandomTaskGrouping(
            m.parameters(), base=torch.optim.SGD, n_groups=2, seed=0, lr=0.05
        ),
        nonlinear=True,
        steps=300,
    )
    assert all(b < 0.5 * a for a, b in zip(first, last)), (first, last)


def test_random_grouping_validation_and_repr():
    model = make_model(3)
    params = list(model.parameters())
    with pytest.raises(TypeError, match="weighting"):
        RandomTaskGrouping(params, weighting=mtl_optim.weighting.Equal())
    with pytest.raises(ValueError, match="not both"):
        RandomTaskGrouping(params, n_groups=2, group_size=2)
    with pytest.raises(ValueError, match="n_groups"):
        RandomTaskGrouping(params, n_groups=0)
    with pytest.raises(TypeError, match="group_size"):
        RandomTaskGrouping(params, group_size=1.5)
    opt = RandomTaskGrouping(params, n_groups=4, seed=0)
    with pytest.raises(ValueError, match="more than the 3 tasks"):
        opt.backward(hps_losses(model, batches(3, 1)[0]))
    assert repr(opt).startswith("RandomTaskGrouping(n_groups=4, seed=0, base=Adam)")
