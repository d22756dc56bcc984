"""Partial labels: ``opt.backward`` with ``None`` for a task without a label in the batch.

The optimizer side (engine, pipeline, AdaTask, distributed); each method's own rule is tested
in ``test_missing_aggregators.py`` and ``test_missing_weightings.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import batches, make_model
from helpers import spawn_two_ranks

import mtl_optim
import mtl_optim.grouping
from benchmarks.methods import default_instance, exported
from mtl_optim import aggregators, weighting

K = 3
F64 = torch.float64
# aggregators whose draws depend on K (a K-task instance and a (K-1)-task one draw differently)
DRAWING = {"PCGrad", "Random", "GradDrop"}


def _opt(model, shared=True, **kw):
    kw.setdefault("base", torch.optim.SGD)
    kw.setdefault("lr", 0.05)
    trunk = list(model.trunk.parameters()) if shared else None
    return mtl_optim.MTLOptimizer(model.parameters(), shared=trunk, **kw)


def _data(step: int = 0):
    return batches(K, step + 1, seed=3)[step]


# --- property 1: every task present -> the code path of today ------------------------------
class _Spy:
    """Records ``present`` at every call of a method (it must stay None with every task)."""

    def __init__(self, method):
        self.method, self.seen = method, []
        for name in ("forward", "weights", "weights_from_gramian"):
            fn = getattr(method, name, None)
            if fn is not None:
                setattr(method, name, self._wrap(fn))

    def _wrap(self, fn):
        def call(*a, **k):
            self.seen.append(self.method.present)
            return fn(*a, **k)

        return call


@pytest.mark.parametrize("route", ["jacobian", "gramian"])
def test_with_every_task_present_no_method_is_told_about_missing_tasks(route):
    model = make_model(K)
    agg, wt = aggregators.UPGrad(), weighting.DWA()
    spies = [_Spy(agg), _Spy(wt)]
    opt = _opt(model, aggregator=agg, weighting=wt, route=route)
    for step in range(3):
        x, ys = _data(step)
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()
    assert all(s.seen and all(p is None for p in s.seen) for s in spies)
    assert opt._pipeline.window_present is None


def test_adatask_keeps_one_step_counter_while_every_task_is_present():
    model = make_model(K)
    opt = mtl_optim.AdaTask(model.parameters(), lr=1e-2)
    x, ys = _data()
    opt.backward(model.losses(x, ys))
    opt.step()
    assert opt.task_state(model.trunk[0].weight)["step"].dim() == 0


# --- property 2: AdaTask freezes a missing task -----------------------------------------------
@pytest.mark.parametrize("base", [torch.optim.Adam, torch.optim.AdamW])
def test_adatask_moments_of_a_task_equal_adam_on_the_batches_where_it_was_present(base):
    model = make_model(K)
    opt = mtl_optim.AdaTask(
        model.parameters(), base=base, lr=1e-2, shared=list(model.trunk.parameters())
    )
    w = model.trunk[0].weight
    seen = []
    for step in range(1, 5):
        x, ys = _data(step)
        opt.zero_grad()
        losses = model.losses(x, ys)
        if step in (1, 3, 4):
            seen.append(torch.autograd.grad(losses[1], w, retain_graph=True)[0])
        else:
            losses[1] = None
        opt.backward(losses)
        opt.step()
    state = opt.task_state(w)
    b1, b2 = 0.9, 0.999
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for g in seen:  # torch.optim.Adam's moments, written out
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    torch.testing.assert_close(state["exp_avg"][1], m, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(state["exp_avg_sq"][1], v, rtol=1e-12, atol=1e-18)
    assert state["step"].tolist() == [4.0, 3.0, 4.0]


def test_adatask_single_task_run_on_its_batches_equals_torch_adam():
    """Task 0 never has a label: the trunk and task 1's head move exactly as torch's Adam on
    task 1 alone (task 0's moments stay empty, its counter at 0)."""
    model = make_model(2)
    ref = make_model(2)
    shared = list(model.trunk.parameters())
    opt = mtl_optim.AdaTask(model.parameters(), lr=1e-2, shared=shared, weight_decay=0.0)
    torch_opt = torch.optim.Adam([*ref.trunk.parameters(), *ref.heads[1].parameters()], lr=1e-2)
    for step in range(4):
        x, ys = batches(2, step + 1, seed=5)[step]
        opt.zero_grad()
        torch_opt.zero_grad()
        losses = model.losses(x, ys)
        opt.backward([None, losses[1]])
        opt.step()
        ref.losses(x, ys)[1].backward()
        torch_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert opt.task_state(model.trunk[0].weight)["step"].tolist() == [0.0, 4.0]


def test_adatask_missing_zero_decays_the_moments_with_one_counter():
    model = make_model(K)
    opt = mtl_optim.AdaTask(model.parameters(), lr=1e-2, missing="zero")
    w = model.trunk[0].weight
    x, ys = _data(0)
    opt.backward(model.losses(x, ys))
    opt.step()
    before = opt.task_state(w)["exp_avg"][1].clone()
    opt.zero_grad()
    x, ys = _data(1)
    losses = model.losses(x, ys)
    opt.backward([losses[0], None, losses[2]])
    opt.step()
    state = opt.task_state(w)
    torch.testing.assert_close(state["exp_avg"][1], 0.9 * before, rtol=1e-15, atol=0)
    assert state["step"].dim() == 0 and float(state["step"]) == 2.0
    with pytest.raises(ValueError, match="'freeze' or 'zero'"):
        mtl_optim.AdaTask(model.parameters(), missing="skip")


# --- property 3: an aggregator on the present rows --------------------------------------------
def _same_update(agg_k, agg_m, route="jacobian"):
    model, small = make_model(K), make_model(K)
    opt = _opt(model, aggregator=agg_k, route=route)
    keep = [*small.trunk.parameters(), *small.heads[0].parameters(), *small.heads[2].parameters()]
    ref = mtl_optim.MTLOptimizer(
        keep, base=torch.optim.SGD, lr=0.05, aggregator=agg_m, shared=list(small.trunk.parameters())
    )
    x, ys = _data()
    losses = model.losses(x, ys)
    opt.backward([losses[0], None, losses[2]])
    ref_losses = small.losses(x, ys)
    ref.backward([ref_losses[0], ref_losses[2]])
    for p, q in zip(model.trunk.parameters(), small.trunk.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    assert model.heads[1].weight.grad is None and model.heads[1].bias.grad is None
    if ref.last_weights is not None:
        w = opt.last_weights
        assert w[1] == 0
        torch.testing.assert_close(w[[0, 2]].to(F64), ref.last_weights.to(F64))


@pytest.mark.parametrize("name", sorted(n for n in exported(aggregators) if n not in DRAWING))
def test_an_aggregator_with_a_missing_task_equals_it_on_the_other_rows(name):
    cls = exported(aggregators)[name]
    make = lambda: default_instance(cls, K, dtype=F64)  # noqa: E731
    if not cls.supports_missing:
        model = make_model(K)
        opt = _opt(model, aggregator=make())
        x, ys = _data()
        losses = model.losses(x, ys)
        with pytest.raises(ValueError, match="present tasks"):
            opt.backward([losses[0], None, losses[2]])
        assert all(p.grad is None for p in model.parameters())
        return
    _same_update(make(), make())


@pytest.mark.parametrize("name", ["MGDA", "UPGrad", "NashMTL", "IMTLG"])
def test_the_gramian_route_uses_the_present_principal_submatrix(name):
    cls = exported(aggregators)[name]
    _same_update(default_instance(cls, K), default_instance(cls, K), route="gramian")


def test_features_route_combines_the_present_rows():
    model, small = make_model(K), make_model(K)
    opt = _opt(model, aggregator=aggregators.MGDA())
    ref = _opt(small, aggregator=aggregators.MGDA())
    x, ys = _data()
    z = model.trunk(x)
    losses = [((h(z) - y) ** 2).mean() for h, y in zip(model.heads, ys)]
    opt.backward([losses[0], None, losses[2]], features=z)
    z2 = small.trunk(x)
    ref_losses = [((h(z2) - y) ** 2).mean() for h, y in zip(small.heads, ys)]
    # the reference: the same aggregator on the two present tasks (task 1's head unused)
    ref_opt = mtl_optim.MTLOptimizer(
        [*small.trunk.parameters(), *small.heads[0].parameters(), *small.heads[2].parameters()],
        base=torch.optim.SGD,
        lr=0.05,
        aggregator=aggregators.MGDA(),
    )
    del ref
    ref_opt.backward([ref_losses[0], ref_losses[2]], features=z2)
    for p, q in zip(model.trunk.parameters(), small.trunk.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    assert opt.last_weights[1] == 0


def test_accumulated_rows_sum_the_micro_batches_where_each_task_was_present():
    model = make_model(K)
    opt = _opt(model, aggregator=aggregators.UPGrad())
    seen = {}
    opt.register_gradient_hook(lambda o, info: seen.update(j=info.jacobian.clone()))
    (x1, ys1), (x2, ys2) = batches(K, 2, seed=4)
    shared = list(model.trunk.parameters())
    l1, l2 = model.losses(x1, ys1), model.losses(x2, ys2)

    def row(loss):
        return torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]
        )

    expected = torch.stack([row(l1[0]) + row(l2[0]), row(l1[1]), row(l2[2])])
    opt.backward([l1[0], l1[1], None])
    opt.backward([l2[0], None, l2[2]])
    torch.testing.assert_close(seen["j"], expected, rtol=1e-12, atol=1e-14)
    # every task was present in the window: UPGrad saw all three rows
    assert opt._pipeline.window_present is None
    assert (opt.last_weights > 0).all()


# --- property 4: a missing head and its optimizer state do not move --------------------------
@pytest.mark.parametrize(
    "base,kw",
    [
        (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
        (torch.optim.AdamW, {"lr": 1e-2}),
    ],
)
def test_a_missing_head_keeps_its_values_and_optimizer_state(base, kw):
    model = make_model(K)
    opt = _opt(model, base=base, aggregator=aggregators.MGDA(), **kw)
    x, ys = _data(0)
    opt.backward(model.losses(x, ys))
    opt.step()
    head = list(model.heads[1].parameters())
    values = [p.detach().clone() for p in head]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in head]
    opt.zero_grad()
    x, ys = _data(1)
    losses = model.losses(x, ys)
    opt.backward([losses[0], None, losses[2]])
    assert all(p.grad is None for p in head)
    opt.step()
    for p, v, st in zip(head, values, state):
        assert torch.equal(p, v)
        assert all(torch.equal(opt.state[p][k], st[k]) for k in st)


# --- property 5 (optimizer side): nothing present ---------------------------------------------
def test_no_task_present_is_a_no_op_with_one_warning():
    model = make_model(K)
    opt = _opt(model, base=torch.optim.Adam, aggregator=aggregators.NashMTL(), lr=1e-2)
    x, ys = _data(0)
    opt.backward(model.losses(x, ys))
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    saved = opt.state_dict()
    opt.zero_grad()
    with pytest.warns(UserWarning, match="None for every task"):
        opt.backward([None] * K)
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.backward([None] * K)  # said once
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()
    assert after["state"].keys() == saved["state"].keys()
    for key, st in saved["state"].items():
        assert all(torch.equal(after["state"][key][k], v) for k, v in st.items())
    assert (
        torch.equal(after["mtl"]["aggregator"]["alpha"], saved["mtl"]["aggregator"]["alpha"])
        if "alpha" in saved["mtl"].get("aggregator", {})
        else True
    )


# --- refusals: nothing changes ----------------------------------------------------------------
def test_the_first_backward_with_a_missing_task_needs_shared():
    model = make_model(K)
    opt = mtl_optim.MTLOptimizer(model.parameters(), aggregator=aggregators.MGDA())
    x, ys = _data()
    losses = model.losses(x, ys)
    with pytest.raises(ValueError, match="pass shared="):
        opt.backward([losses[0], None, losses[2]])
    assert opt.num_tasks is None and all(p.grad is None for p in model.parameters())
    opt.backward(model.losses(x, ys))  # a fully labelled batch first: then None is fine
    opt.zero_grad()
    losses = model.losses(x, ys)
    opt.backward([None, losses[1], losses[2]])
    assert model.heads[0].weight.grad is None


class _NoMissing(weighting.Weighting):
    def forward(self, losses):
        return losses


def test_a_weighting_without_partial_label_support_is_refused_before_anything_changes():
    model = make_model(K)
    opt = _opt(model, weighting=_NoMissing())
    x, ys = _data()
    losses = model.losses(x, ys)
    with pytest.raises(ValueError, match="cannot form weights over the present tasks"):
        opt.backward([losses[0], None, losses[2]])
    assert all(p.grad is None for p in model.parameters()) and opt.num_tasks is None


def test_a_non_tensor_loss_names_none_as_the_way_to_mark_a_missing_task():
    model = make_model(K)
    opt = _opt(model)
    x, ys = _data()
    losses = model.losses(x, ys)
    with pytest.raises(TypeError, match="or None for a task without labels"):
        opt.backward([losses[0], 1.0, losses[2]])


# --- property 6: two ranks equal one process under the rank-count mean ------------------------
def test_two_ranks_with_different_missing_tasks_equal_one_process(tmp_path):
    import _partial_worker as worker

    names = list(worker.configs())
    ranks = spawn_two_ranks(worker.worker, tmp_path, names)
    for name in names:
        ref = worker.train(name)
        for r in range(2):
            for p, q in zip(ranks[r][name], ref):
                torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=f"{name} rank {r}")
    # FSDP2: the same tasks missing on every rank equals one process; different ones are refused
    for name in ("mgda", "adatask"):
        ref = worker.train_sharded(name)
        for r in range(2):
            for p, q in zip(ranks[r][f"fsdp-{name}"], ref):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=f"fsdp {name} {r}")
    for r in range(2):
        message, untouched = ranks[r]["fsdp-refusal"]
        assert "every rank must pass None for the same tasks" in message and untouched


# --- property 4 (weightings): FAMO's and the uncertainty weighting's missing coordinates ------
def test_missing_uncertainty_parameter_and_its_adam_state_do_not_move():
    model = make_model(K)
    uw = weighting.Uncertainty(K, dtype=F64)
    opt = _opt(model, base=torch.optim.Adam, lr=1e-2, weight_decay=0.1, weighting=uw)
    x, ys = _data(0)
    opt.backward(model.losses(x, ys))
    opt.step()
    p1 = uw.parameters()[1]
    value, state = p1.detach().clone(), {k: v.clone() for k, v in opt.state[p1].items()}
    others = [p.detach().clone() for i, p in enumerate(uw.parameters()) if i != 1]
    opt.zero_grad()
    x, ys = _data(1)
    losses = model.losses(x, ys)
    opt.backward([losses[0], None, losses[2]])
    assert p1.grad is None
    opt.step()
    assert torch.equal(p1, value)
    assert all(torch.equal(opt.state[p1][k], v) for k, v in state.items())
    moved = [p for i, p in enumerate(uw.parameters()) if i != 1]
    assert all(not torch.equal(p, q) for p, q in zip(moved, others))


def test_missing_famo_logit_and_its_moments_do_not_move():
    model = make_model(K)
    famo = weighting.FAMO(K, dtype=F64)
    opt = _opt(model, base=torch.optim.Adam, lr=1e-2, weighting=famo)
    for step in range(3):
        x, ys = _data(step)
        opt.zero_grad()
        losses = model.losses(x, ys)
        present = [losses[0], None, losses[2]] if step else losses
        if step == 2:
            before = {k: v.clone() for k, v in famo.state_dict().items() if torch.is_tensor(v)}
            logit = famo.logits.detach().clone()
        opt.backward(present)
        opt.step()
        with torch.no_grad():
            again = model.losses(x, ys)
            opt.update_weighting([again[0], None, again[2]] if step else again)
    assert famo.logits[1] == logit[1] and not torch.equal(famo.logits, logit)
    after = famo.state_dict()
    for key, v in before.items():  # FAMO's own Adam moments: entry 1 untouched
        if v.dim() == 1 and v.numel() == K:
            assert after[key][1] == v[1], key
    with pytest.raises(ValueError):  # update_weighting must see the tasks backward saw
        opt.zero_grad()
        x, ys = _data(3)
        losses = model.losses(x, ys)
        opt.backward([losses[0], None, losses[2]])
        opt.step()
        with torch.no_grad():
            opt.update_weighting(model.losses(x, ys))


# --- property 5 (weightings): epoch means over the batches where a task was present ----------
@pytest.mark.parametrize("cls", [weighting.DWA, weighting.IGB])
def test_epoch_means_average_the_batches_where_each_task_was_present(cls):
    model = make_model(K)
    w = cls()
    opt = _opt(model, weighting=w)
    values = {i: [] for i in range(K)}
    for step in range(4):
        x, ys = _data(step)
        opt.zero_grad()
        losses = model.losses(x, ys)
        gone = {step % K} if step else set()
        for i, loss in enumerate(losses):
            if i not in gone:
                values[i].append(float(loss.detach()))
        opt.backward([None if i in gone else loss for i, loss in enumerate(losses)])
        opt.step()
    opt.end_epoch()
    means = w.state_dict()["last"]  # the mean of the epoch that just closed
    expected = torch.tensor([sum(v) / len(v) for v in values.values()], dtype=F64)
    torch.testing.assert_close(means.to(F64), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "make", [lambda: weighting.DWA(), lambda: weighting.FAMO(K, dtype=F64)], ids=["dwa", "famo"]
)
def test_no_task_present_changes_no_weighting_state(make):
    model = make_model(K)
    w = make()
    opt = _opt(model, base=torch.optim.Adam, lr=1e-2, weighting=w)
    x, ys = _data(0)
    opt.backward(model.losses(x, ys))
    opt.step()
    saved = opt.state_dict()
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with pytest.warns(UserWarning, match="None for every task"):
        opt.backward([None] * K)
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()

    def same(a, b):
        if torch.is_tensor(a):
            return (
                torch.equal(a, b)
                or (a.isnan() == b.isnan()).all()
                and torch.equal(a.nan_to_num(), b.nan_to_num())
            )
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
        return a == b

    assert same(saved, after)


# --- mixed precision -------------------------------------------------------------------------
def test_a_grad_scaler_sees_the_same_missing_task_update():
    model, ref = make_model(K, dtype=torch.float32), make_model(K, dtype=torch.float32)
    opt = _opt(model, aggregator=aggregators.UPGrad())
    plain = _opt(ref, aggregator=aggregators.UPGrad())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, ys = batches(K, 1, seed=3, dtype=torch.float32)[0]
    losses = model.losses(x, ys)
    opt.backward([losses[0], None, losses[2]], scaler=scaler)
    scaler.unscale_(opt)
    ref_losses = ref.losses(x, ys)
    plain.backward([ref_losses[0], None, ref_losses[2]])
    for p, q in zip(model.parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert model.heads[1].weight.grad is None


def test_random_task_grouping_refuses_missing_tasks_with_the_reason():
    model = make_model(K)
    opt = mtl_optim.grouping.RandomTaskGrouping(model.parameters(), seed=0)
    x, ys = _data()
    losses = model.losses(x, ys)
    with pytest.raises(ValueError, match="RandomTaskGrouping does not support missing tasks"):
        opt.backward([losses[0], None, losses[2]])
    assert all(p.grad is None for p in model.parameters())


# --- combinations: AdaTask with an aggregator, a weighting on the Gramian route, GradNorm -----
def _two_task_reference(make):
    """The model's trunk and heads 0 and 2 under an optimizer built by ``make`` for 2 tasks."""
    small = make_model(K)
    keep = [*small.trunk.parameters(), *small.heads[0].parameters(), *small.heads[2].parameters()]
    return small, make(keep, list(small.trunk.parameters()))


def test_adatask_with_an_aggregator_and_a_missing_task_equals_the_present_tasks_alone():
    def make(params, shared):
        return mtl_optim.AdaTask(params, lr=1e-2, aggregator=aggregators.UPGrad(), shared=shared)

    model = make_model(K)
    opt = make(model.parameters(), list(model.trunk.parameters()))
    small, ref = _two_task_reference(make)
    x, ys = _data()
    losses, ref_losses = model.losses(x, ys), small.losses(x, ys)
    opt.backward([losses[0], None, losses[2]])
    opt.step()
    ref.backward([ref_losses[0], ref_losses[2]])
    ref.step()
    for p, q in zip(model.trunk.parameters(), small.trunk.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    state = opt.task_state(model.trunk[0].weight)
    assert state["step"].tolist() == [1.0, 0.0, 1.0]
    assert not state["exp_avg"][1].any()


def test_a_weighting_on_the_gramian_route_uses_the_present_tasks():
    def make(params, shared, k=2):
        return mtl_optim.MTLOptimizer(
            params,
            base=torch.optim.SGD,
            lr=0.05,
            aggregator=aggregators.MGDA(),
            weighting=weighting.Uncertainty(k, dtype=F64),
            shared=shared,
            route="gramian",
        )

    model = make_model(K)
    opt = make(model.parameters(), list(model.trunk.parameters()), K)
    small, ref = _two_task_reference(make)
    x, ys = _data()
    losses, ref_losses = model.losses(x, ys), small.losses(x, ys)
    opt.backward([losses[0], None, losses[2]])
    ref.backward([ref_losses[0], ref_losses[2]])
    for p, q in zip(model.trunk.parameters(), small.trunk.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)
    assert opt.last_weights[1] == 0
    assert opt.weighting.parameters()[1].grad is None


def test_gradnorm_with_a_missing_task_keeps_its_weight_and_trains_the_others():
    model = make_model(K)
    gn = weighting.GradNorm(K, dtype=F64)
    opt = _opt(model, base=torch.optim.Adam, lr=1e-2, weighting=gn, aggregator=aggregators.Mean())
    x, ys = _data(0)
    opt.backward(model.losses(x, ys))
    opt.step()
    before = gn.loss_weights.detach().clone()
    opt.zero_grad()
    x, ys = _data(1)
    losses = model.losses(x, ys)
    opt.backward([losses[0], None, losses[2]])
    opt.step()
    after = gn.loss_weights.detach()
    assert after[1] == before[1]
    torch.testing.assert_close(after[[0, 2]].sum(), torch.tensor(2.0, dtype=F64))
    assert model.heads[1].weight.grad is None
