"""The drop-in promise in real loops: the shared set under stacked losses and torch.compile,
K = 1 and models without shared parameters, parameter sets that change during training,
closures, sparse gradients, misuse warnings and atomic checkpoints — each against plain torch
or an explicit reference."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import batches, clone, make_model
from torch import nn

import mtl_optim
from benchmarks.methods import default_instance, exported
from mtl_optim import aggregators, weighting

F64 = torch.float64
BASES = [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad]


def _train(model, opt, data, stacked=False, steps=None):
    for x, ys in data[:steps]:
        opt.zero_grad()
        losses = model.losses(x, ys)
        opt.backward(torch.stack(losses) if stacked else losses)
        opt.step()


def _trunk_ids(model):
    return [id(p) for p in model.trunk.parameters()]


# --- the shared set ------------------------------------------------------------------------
STACKED = {
    "MGDA": aggregators.MGDA,
    "PCGrad": lambda: aggregators.PCGrad(seed=0),
    "UPGrad": aggregators.UPGrad,
}


@pytest.mark.parametrize("name", list(STACKED))
def test_stacked_losses_give_the_same_shared_set_and_update_as_a_list(name):
    model = make_model(3)
    ref = clone(model)
    data = batches(3, 4)
    make = STACKED[name]
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=make()
    )
    ref_opt = mtl_optim.MTLOptimizer(
        ref.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=make()
    )
    _train(model, opt, data, stacked=True)
    _train(ref, ref_opt, data)
    assert [id(p) for p in opt.shared_params] == _trunk_ids(model)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def _compiled_pair(backend):
    # No dynamo reset between models: parameters are graph inputs, so one compilation serves
    # every copy of the model (the inductor compile dominates this test's time).
    model = make_model(3)
    eager = clone(model)
    return model, torch.compile(model, backend=backend), eager


MAKERS = {
    "AdaTask": lambda ps: mtl_optim.AdaTask(ps, lr=0.01),
    "PCGrad": lambda ps: mtl_optim.MTLOptimizer(ps, aggregator=aggregators.PCGrad(seed=0), lr=0.01),
    "UPGrad": lambda ps: mtl_optim.MTLOptimizer(ps, aggregator=aggregators.UPGrad(), lr=0.01),
    "Uncertainty+MGDA": lambda ps: mtl_optim.MTLOptimizer(
        ps, weighting=weighting.Uncertainty(3), aggregator=aggregators.MGDA(), lr=0.01
    ),
}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_finds_the_trunk_and_updates_as_eager(backend):
    data = batches(3, 3)
    for name, make in MAKERS.items():
        model, compiled, eager = _compiled_pair(backend)
        opt, ref_opt = make(model.parameters()), make(eager.parameters())
        for x, ys in data:
            for mod, o in ((compiled, opt), (eager, ref_opt)):
                o.zero_grad()
                o.backward([((out - y) ** 2).mean() for out, y in zip(mod(x), ys)])
                o.step()
        assert [id(p) for p in opt.shared_params] == _trunk_ids(model), name
        for p, q in zip(model.parameters(), eager.parameters()):
            # float64: compiled kernels may reassociate sums; a few ulps of the values
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13, msg=name)


def test_a_task_with_all_zero_gradients_in_a_joined_graph_warns_with_the_fix():
    model = make_model(2)
    x, ys = batches(2, 1)[0]
    opt = mtl_optim.MTLOptimizer(model.parameters(), aggregator=aggregators.Mean())
    losses = model.losses(x, ys)
    dead = 0.0 * losses[1]  # reaches every parameter, moves none
    with pytest.warns(UserWarning, match=r"task\(s\) \[1\].*pass shared="):
        opt.backward(torch.stack([losses[0], dead]))


# --- K = 1 and models without shared parameters ---------------------------------------------
@pytest.mark.parametrize("base", BASES, ids=lambda b: b.__name__)
def test_single_task_adatask_equals_the_base_bit_for_bit_without_shared(base):
    model = make_model(1)
    ref = clone(model)
    opt = mtl_optim.AdaTask(model.parameters(), base=base, lr=0.01)
    ref_opt = base(ref.parameters(), lr=0.01)
    for x, ys in batches(1, 8):
        opt.zero_grad()
        ref_opt.zero_grad()
        opt.backward(model.losses(x, ys))
        ref.losses(x, ys)[0].backward()
        opt.step()
        ref_opt.step()
    assert opt.shared_params == []
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", sorted(exported(aggregators)))
def test_single_task_with_any_aggregator_equals_the_base(name):
    agg = default_instance(exported(aggregators)[name], num_tasks=1)
    model = make_model(1)
    ref = clone(model)
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=agg)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, ys in batches(1, 3):
        opt.zero_grad()
        ref_opt.zero_grad()
        opt.backward(model.losses(x, ys))
        ref.losses(x, ys)[0].backward()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_two_separate_networks_have_no_shared_parameters_and_train_as_the_base():
    torch.manual_seed(0)
    nets = [nn.Linear(4, 1, dtype=F64) for _ in range(2)]
    refs = copy.deepcopy(nets)
    params = [p for n in nets for p in n.parameters()]
    opt = mtl_optim.AdaTask(params, lr=0.01)
    ref_opt = torch.optim.Adam([p for n in refs for p in n.parameters()], lr=0.01)
    x = torch.randn(8, 4, dtype=F64)
    for _ in range(3):
        opt.zero_grad()
        ref_opt.zero_grad()
        opt.backward([n(x).pow(2).mean() for n in nets])
        sum(n(x).pow(2).mean() for n in refs).backward()
        opt.step()
        ref_opt.step()
    assert opt.shared_params == []
    for p, q in zip(params, [p for n in refs for p in n.parameters()]):
        assert torch.equal(p, q)


# --- parameter sets that change -------------------------------------------------------------
def _adam_rule(g, m, v, step, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam's single-tensor rule on plain tensors; returns the step."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(eps)
    return -(lr / (1 - b1**step)) * m / denom


def _task_grads(model, x, ys, params):
    return [torch.autograd.grad(loss, params, retain_graph=True) for loss in model.losses(x, ys)]


class _Reference:
    """AdaTask(Adam) written out by hand: per-task Adam moments on the trunk (their own step
    count), plain Adam on the heads."""

    def __init__(self, model, k):
        self.trunk, self.heads = list(model.trunk.parameters()), list(model.heads.parameters())
        self.tm = [[torch.zeros_like(p) for p in self.trunk] for _ in range(k)]
        self.tv = [[torch.zeros_like(p) for p in self.trunk] for _ in range(k)]
        self.hm = [torch.zeros_like(p) for p in self.heads]
        self.hv = [torch.zeros_like(p) for p in self.heads]

    @torch.no_grad()
    def trunk_step(self, per_task, step):
        for j, p in enumerate(self.trunk):
            moves = (
                _adam_rule(g[j], m[j], v[j], step) for g, m, v in zip(per_task, self.tm, self.tv)
            )
            p.add_(sum(moves))

    @torch.no_grad()
    def heads_step(self, head_grads, step):
        for j, p in enumerate(self.heads):
            p.add_(_adam_rule(head_grads[j], self.hm[j], self.hv[j], step))


def test_unfreezing_a_trunk_trains_it_with_fresh_per_task_state():
    k = 2
    model = make_model(k)
    ref = clone(model)
    data = batches(k, 5)
    for p in model.trunk.parameters():
        p.requires_grad_(False)
    opt = mtl_optim.AdaTask(model.parameters(), lr=0.01)
    _train(model, opt, data, steps=2)
    assert opt.shared_params == []
    for p in model.trunk.parameters():
        p.requires_grad_(True)
    _train(model, opt, data[2:])
    assert [id(p) for p in opt.shared_params] == _trunk_ids(model)
    # reference: the heads run Adam for 5 steps; the trunk AdaTask from step 3 with fresh state
    reference = _Reference(ref, k)
    for step, (x, ys) in enumerate(data, start=1):
        head_grads = torch.autograd.grad(sum(ref.losses(x, ys)), reference.heads)
        if step > 2:
            reference.trunk_step(_task_grads(ref, x, ys, reference.trunk), step - 2)
        reference.heads_step(head_grads, step)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_freezing_a_shared_layer_keeps_its_state_and_restores_it_when_unfrozen():
    model = make_model(2)
    data = batches(2, 6)
    opt = mtl_optim.AdaTask(model.parameters(), lr=0.01)
    _train(model, opt, data, steps=2)
    frozen = model.trunk[0].weight
    saved = {k: v.clone() for k, v in opt.task_state(frozen).items()}
    before = frozen.detach().clone()
    frozen.requires_grad_(False)
    _train(model, opt, data[2:4])  # no autograd error, the frozen layer stays put
    assert torch.equal(frozen, before)
    assert all(p is not frozen for p in opt.shared_params)
    sd = opt.state_dict()  # parked state survives a checkpoint
    frozen.requires_grad_(True)
    opt.zero_grad()
    opt.backward(model.losses(*data[4]))  # re-detection restores the parked state ...
    restored = opt.task_state(frozen)
    for key, v in saved.items():
        assert torch.equal(restored[key], v)
    opt.step()  # ... and the layer trains again
    assert not torch.equal(frozen, before)
    fresh = mtl_optim.AdaTask(clone(model).parameters(), lr=0.01)
    fresh.load_state_dict(sd)
    assert len(fresh.state_dict()["mtl"]["parked"]) == 1


def test_a_shared_layer_added_with_add_param_group_after_training_started_is_shared():
    k = 2
    torch.manual_seed(0)
    trunk, extra = nn.Linear(3, 4, dtype=F64), nn.Linear(4, 4, dtype=F64)
    heads = [nn.Linear(4, 1, dtype=F64) for _ in range(k)]
    params = list(trunk.parameters()) + [p for h in heads for p in h.parameters()]
    opt = mtl_optim.MTLOptimizer(
        params, base=torch.optim.SGD, lr=0.1, aggregator=aggregators.Mean()
    )
    x = torch.randn(8, 3, dtype=F64)

    def losses(with_extra):
        z = torch.tanh(trunk(x))
        z = torch.tanh(extra(z)) if with_extra else z
        return [h(z).pow(2).mean() for h in heads]

    opt.backward(losses(False))
    opt.step()
    opt.add_param_group({"params": list(extra.parameters())})
    opt.zero_grad()
    opt.backward(losses(True))
    assert {id(p) for p in extra.parameters()} <= {id(p) for p in opt.shared_params}
    per_task = [torch.autograd.grad(loss, extra.weight, retain_graph=True) for loss in losses(True)]
    torch.testing.assert_close(extra.weight.grad, (per_task[0][0] + per_task[1][0]) / 2)


def test_a_second_step_without_backward_moves_the_trunk_like_the_heads():
    model = make_model(2)
    ref = clone(model)
    x, ys = batches(2, 1)[0]
    opt = mtl_optim.AdaTask(model.parameters(), lr=0.01)
    opt.zero_grad()
    opt.backward(model.losses(x, ys))
    opt.step()
    opt.step()  # torch semantics: the same gradients, applied again
    reference = _Reference(ref, 2)
    per_task = _task_grads(ref, x, ys, reference.trunk)
    head_grads = torch.autograd.grad(sum(ref.losses(x, ys)), reference.heads)
    for step in (1, 2):
        reference.trunk_step(per_task, step)
        reference.heads_step(head_grads, step)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_changing_the_trainable_set_inside_an_accumulation_window_is_refused():
    model = make_model(2)
    (x1, y1), (x2, y2) = batches(2, 2)
    opt = mtl_optim.MTLOptimizer(model.parameters(), aggregator=aggregators.Mean())
    opt.backward(model.losses(x1, y1))
    model.trunk[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="middle of an accumulation window; call step"):
        opt.backward(model.losses(x2, y2))


# --- closures and sparse gradients ----------------------------------------------------------
def test_lbfgs_with_a_closure_equals_torch_lbfgs():
    model = make_model(2)
    ref = clone(model)
    x, ys = batches(2, 1)[0]
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.LBFGS, aggregator=aggregators.Sum(), lr=0.5
    )
    ref_opt = torch.optim.LBFGS(ref.parameters(), lr=0.5)

    def closure():
        opt.zero_grad()
        losses = model.losses(x, ys)
        opt.backward(losses)
        return sum(losses)

    def ref_closure():
        ref_opt.zero_grad()
        loss = sum(ref.losses(x, ys))
        loss.backward()
        return loss

    for _ in range(2):
        torch.testing.assert_close(opt.step(closure), ref_opt.step(ref_closure))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class _Bag(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4, sparse=sparse, dtype=F64)
        self.heads = nn.ModuleList(nn.Linear(4, 1, dtype=F64) for _ in range(2))

    def losses(self, idx):
        z = self.emb(idx).mean(1)
        return [h(z).pow(2).mean() for h in self.heads]


@pytest.mark.parametrize("wgt", [None, weighting.RLW], ids=["no-method", "weighting-only"])
def test_sparse_embedding_without_per_task_gradients_is_the_base_optimizer(wgt):
    model, ref = _Bag(True), _Bag(True)
    kw = {} if wgt is None else {"weighting": wgt(seed=0)}
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.1, **kw)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    idx = torch.tensor([[1, 2], [3, 1]])
    for _ in range(2):
        opt.zero_grad()
        opt.backward(model.losses(idx))
        assert model.emb.weight.grad.is_sparse
        w = torch.ones(2, dtype=F64) if wgt is None else opt.last_weights
        ref_opt.zero_grad()
        sum(wi * loss for wi, loss in zip(w, ref.losses(idx))).backward()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_sparse_embedding_with_per_task_gradients_equals_a_dense_embedding():
    model, ref = _Bag(True), _Bag(False)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=aggregators.MGDA()
    )
    ref_opt = mtl_optim.MTLOptimizer(
        ref.parameters(), base=torch.optim.SGD, lr=0.1, aggregator=aggregators.MGDA()
    )
    idx = torch.tensor([[1, 2], [3, 1]])
    for _ in range(2):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            o.backward(m.losses(idx))
            o.step()
    assert [id(p) for p in opt.shared_params] == [id(model.emb.weight)]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# --- misuse is loud, once -------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["AdaTask", "aggregator"])
def test_a_plain_backward_with_a_method_set_warns_once(kind):
    model = make_model(2)
    if kind == "AdaTask":
        opt = mtl_optim.AdaTask(model.parameters(), lr=0.01)
    else:
        opt = mtl_optim.MTLOptimizer(model.parameters(), aggregator=aggregators.PCGrad(), lr=0.01)
    data = batches(2, 3)
    _train(model, opt, data, steps=1)
    trunk = [p.detach().clone() for p in model.trunk.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, ys in data[1:]:
            opt.zero_grad()
            sum(model.losses(x, ys)).backward()
            opt.step()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "opt.backward(losses) instead of loss.backward()" in messages[0]
    if kind == "AdaTask":
        assert "were not updated" in messages[0]
        assert all(torch.equal(p, q) for p, q in zip(model.trunk.parameters(), trunk))


def test_no_warning_in_a_correct_loop_or_without_a_method():
    model = make_model(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, mtl_optim.AdaTask(model.parameters(), lr=0.01), batches(2, 2))
        plain = mtl_optim.MTLOptimizer(model.parameters(), lr=0.01)
        plain.zero_grad()
        sum(model.losses(*batches(2, 1)[0])).backward()
        plain.step()


# --- atomic checkpoints ---------------------------------------------------------------------
def _trained(make, steps=2):
    model = make_model(2)
    opt = make(model.parameters())
    _train(model, opt, batches(2, steps))
    return model, opt


def _snapshot(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "saved, target, message",
    [
        (
            lambda ps: mtl_optim.MTLOptimizer(ps, base=torch.optim.Adam, lr=0.01),
            lambda ps: mtl_optim.MTLOptimizer(ps, base=torch.optim.SGD, lr=0.1, momentum=0.9),
            "base optimizer Adam, but this optimizer has SGD",
        ),
        (
            lambda ps: mtl_optim.AdaTask(ps, base=torch.optim.Adam, lr=0.01),
            lambda ps: mtl_optim.AdaTask(ps, base=torch.optim.RMSprop, lr=0.01),
            "base optimizer Adam, but this optimizer has RMSprop",
        ),
        (
            lambda ps: mtl_optim.MTLOptimizer(ps, aggregator=aggregators.NashMTL(), lr=0.01),
            lambda ps: mtl_optim.MTLOptimizer(ps, aggregator=aggregators.PCGrad(), lr=0.02),
            "aggregator NashMTL, but this optimizer has PCGrad",
        ),
        (
            lambda ps: mtl_optim.MTLOptimizer(ps, weighting=weighting.DWA(), lr=0.01),
            lambda ps: mtl_optim.MTLOptimizer(ps, lr=0.02),
            "weighting DWA, but this optimizer has None",
        ),
    ],
)
def test_a_checkpoint_that_does_not_fit_is_refused_before_anything_changes(saved, target, message):
    _, source = _trained(saved)
    _, opt = _trained(target, steps=3)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(source.state_dict())
    assert _snapshot(opt) == before


def test_a_method_state_that_fails_to_load_rolls_everything_back():
    make = lambda ps: mtl_optim.MTLOptimizer(ps, aggregator=aggregators.NashMTL(), lr=0.01)  # noqa: E731
    _, source = _trained(make)
    _, opt = _trained(make, steps=3)
    sd = source.state_dict()
    sd["mtl"]["aggregator"] = {"not": "a NashMTL state"}
    before = _snapshot(opt)
    with pytest.raises((KeyError, ValueError, TypeError)):
        opt.load_state_dict(sd)
    assert _snapshot(opt) == before


def test_a_checkpoint_with_another_number_of_tasks_is_refused():
    model = make_model(3)
    source = mtl_optim.AdaTask(model.parameters(), lr=0.01)
    x, ys = batches(3, 1)[0]
    source.backward(model.losses(x, ys)[:2])  # the third head unused: K = 2
    source.step()
    target = clone(model)
    opt = mtl_optim.AdaTask(target.parameters(), lr=0.01)
    _train(target, opt, batches(3, 1))
    before = _snapshot(opt)
    with pytest.raises(ValueError, match="K = 2 tasks, but this optimizer was trained with K = 3"):
        opt.load_state_dict(source.state_dict())
    assert _snapshot(opt) == before


def test_a_zero_dimensional_shared_parameter_trains_like_a_one_element_one():
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=F64)
    heads = [torch.randn(3, dtype=F64) for _ in range(2)]
    results = []
    for shape in ((), (1,)):
        scale = nn.Parameter(torch.full(shape, 0.5, dtype=F64))
        hs = [nn.Parameter(h.clone()) for h in heads]
        opt = mtl_optim.AdaTask([scale, *hs], lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            opt.backward([(scale * x @ h).pow(2).mean() for h in hs])
            opt.step()
        assert [id(p) for p in opt.shared_params] == [id(scale)]
        results.append(scale.detach().reshape(()))
    assert torch.equal(results[0], results[1])


def test_a_gradient_hook_without_a_method_sees_the_rows_and_equal_weights():
    model = make_model(2)
    ref = clone(model)
    x, ys = batches(2, 1)[0]
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.1)
    seen = []
    handle = opt.register_gradient_hook(lambda o, info: seen.append(info.jacobian.clone()))
    opt.backward(model.losses(x, ys))
    trunk = list(ref.trunk.parameters())
    rows = [torch.cat([g.reshape(-1) for g in gs]) for gs in _task_grads(ref, x, ys, trunk)]
    torch.testing.assert_close(seen[0], torch.stack(rows))
    assert torch.equal(opt.last_weights, torch.ones(2))
    handle.remove()
    opt.zero_grad()
    opt.backward(model.losses(x, ys))
    assert len(seen) == 1 and torch.equal(opt.last_weights, torch.ones(2))


def test_an_adatask_observer_handle_detaches_it():
    model = make_model(2)
    opt = mtl_optim.AdaTask(model.parameters(), lr=0.01)
    calls = []
    handle = opt.add_observer(lambda s, steps: calls.append(steps.shape))
    data = batches(2, 2)
    _train(model, opt, data, steps=1)
    assert calls == [(2, sum(p.numel() for p in model.trunk.parameters()))]
    handle.remove()
    _train(model, opt, data[1:])
    assert len(calls) == 1
