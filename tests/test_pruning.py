"""DiSparse: per-task scores from the engine, arbitrated masks, static and dynamic sparsity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import mtl_optim
from mtl_optim.pruning import DiSparse, erk_densities


class Net(nn.Module):
    """A Linear (or conv) trunk and K two-layer heads."""

    def __init__(self, k: int = 3, conv: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = conv
        if conv:
            self.trunk = nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 12), nn.Tanh()
            )
        else:
            self.trunk = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(12, 5 + t), nn.Tanh(), nn.Linear(5 + t, 1)) for t in range(k)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [h(z).squeeze(1) for h in self.heads]


def batches(n: int = 3, k: int = 3, conv: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, 2, 4, 4, generator=g) if conv else torch.randn(16, 6, generator=g)
        flat = x.flatten(1)
        out.append((x, [flat[:, t] * (t + 1) - flat[:, t + 1] for t in range(k)]))
    return out


def loss_fn(model: Net, scale=None):
    scale = scale or [1.0] * len(model.heads)

    def losses(batch):
        x, ys = batch
        return [c * ((o - y) ** 2).mean() for c, o, y in zip(scale, model(x), ys)]

    return losses


def pruner(model: Net, **kw) -> DiSparse:
    return DiSparse(model, model.trunk, list(model.heads), **kw)


def reference_snip(model: Net, data, tasks_losses) -> dict[str, list[torch.Tensor]]:
    """Σ_b |θ ∂L_k^(b)/∂θ| per task, by plain autograd, for every Linear/conv weight."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    out = {n: [torch.zeros_like(m.weight) for _ in model.heads] for n, m in layers.items()}
    for batch in data:
        losses = tasks_losses(batch)
        for t, loss in enumerate(losses):
            grads = torch.autograd.grad(
                loss, [m.weight for m in layers.values()], retain_graph=True, allow_unused=True
            )
            for (n, m), g in zip(layers.items(), grads):
                if g is not None:
                    out[n][t] += (m.weight.detach() * g).abs()
    return out


def top_mask(values: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    flat = torch.cat([v.flatten() for v in values]).double()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return [m.view(v.shape) for m, v in zip(keep.split([v.numel() for v in values]), values)]


# --- static pruning -------------------------------------------------------------------------
@pytest.mark.parametrize("criterion", ["snip", "magnitude"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_single_task_equals_plain_snip_or_magnitude(criterion, density):
    model = Net(k=1)
    data = batches(k=1)
    ds = pruner(model)
    names = [lyr.name for lyr in ds.layers]
    weights = [model.get_submodule(n).weight.detach().clone() for n in names]
    if criterion == "snip":
        ref = reference_snip(model, data, loss_fn(model))
        scores = [ref[n][0] for n in names]
    else:
        scores = [w.abs() for w in weights]
    masks = ds.prune(density, data, loss_fn(model), criterion=criterion)
    n_total = sum(w.numel() for w in weights)
    want = top_mask(scores, round(density * n_total))
    for n, m in zip(names, want):
        assert torch.equal(masks[n], m), n
    assert ds.density() == round(density * n_total) / n_total


def test_scores_read_the_engines_per_task_gradients():
    model = Net(conv=True)
    data = batches(conv=True)
    ds = pruner(model)
    scores = ds.scores(data, loss_fn(model))
    ref = reference_snip(model, data, loss_fn(model))
    for t in range(3):
        assert set(scores[t]) == {lyr.name for lyr in ds._layers_of(t)}
        for name, s in scores[t].items():
            torch.testing.assert_close(s, ref[name][t], rtol=1e-5, atol=1e-7)
    sq = ds.scores(data, loss_fn(model), criterion="grad_x_sq")
    w = model.trunk[0].weight.detach()
    torch.testing.assert_close(sq[1]["trunk.0"], scores[1]["trunk.0"] * w.abs())
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


def test_union_arbiter_keeps_a_shared_weight_iff_some_task_keeps_it():
    model = Net()
    data = batches()
    ds = pruner(model)
    scores = ds.scores(data, loss_fn(model))
    for arbiter in ("union", "intersection", "vote"):
        masks = ds.masks(scores, 0.25, arbiter=arbiter)
        kept_by_task = []
        for t in range(3):
            layers = ds._layers_of(t)
            keep = top_mask([scores[t][lyr.name] for lyr in layers], ds.keep_counts[t])
            kept_by_task.append({lyr.name: m for lyr, m in zip(layers, keep)})
            for lyr, m in zip(layers, keep):
                if lyr.task == t:  # a head takes its own task's mask
                    assert torch.equal(masks[lyr.name], m)
        for lyr in ds.layers:
            if lyr.task is not None:
                continue
            votes = torch.stack([kept[lyr.name] for kept in kept_by_task]).sum(0)
            want = {"union": votes >= 1, "intersection": votes == 3, "vote": votes >= 2}[arbiter]
            assert torch.equal(masks[lyr.name], want), (arbiter, lyr.name)
        shared = [lyr.name for lyr in ds.layers if lyr.task is None]
        total = sum(masks[n].sum() for n in shared)
        per_task = [sum(kept[n].sum() for n in shared) for kept in kept_by_task]
        if arbiter == "union":
            assert total >= max(per_task)
        n_all = sum(lyr.numel for lyr in ds.layers)
        assert sum(int(m.sum()) for m in masks.values()) == round(0.25 * n_all)


@pytest.mark.parametrize("density", [0.01, 0.1, 1 / 3, 0.5, 0.9, 1.0])
def test_bisection_meets_the_target_count_exactly(density):
    model = Net(k=4)  # unequal heads, plus two equal ones below
    model.heads.append(copy.deepcopy(model.heads[0]))
    model.heads.append(copy.deepcopy(model.heads[0]))
    ds = pruner(model)
    g = torch.Generator().manual_seed(3)
    scores = [
        {lyr.name: torch.rand(ds.weight(lyr).shape, generator=g) for lyr in ds._layers_of(t)}
        for t in range(6)
    ]
    masks = ds.masks(scores, density)
    n_all = sum(lyr.numel for lyr in ds.layers)
    assert sum(int(m.sum()) for m in masks.values()) == round(density * n_all)


def test_scaling_a_task_loss_changes_no_mask():
    model = Net()
    data = batches()
    ds = pruner(model)
    base = ds.masks(ds.scores(data, loss_fn(model)), 0.2)
    scaled = ds.masks(ds.scores(data, loss_fn(model, [3.7, 0.01, 250.0])), 0.2)
    for name in base:
        assert torch.equal(base[name], scaled[name]), name


def test_apply_masks_the_forward_and_keeps_pruned_weights_zero_through_training():
    model = Net()
    data = batches()
    ds = pruner(model)
    trunk_weight = model.trunk[0].weight
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), torch.optim.Adam, lr=0.02, weight_decay=0.01,
        aggregator=mtl_optim.aggregators.UPGrad(),
    )  # fmt: skip
    masks = ds.prune(0.3, data, loss_fn(model))
    assert model.trunk[0].parametrizations.weight.original is trunk_weight  # same parameter
    losses = loss_fn(model)
    first = sum(losses(data[0])).item()
    for _ in range(40):
        for batch in data:
            opt.zero_grad()
            opt.backward(losses(batch))
            opt.step()
    assert sum(losses(data[0])).item() < 0.5 * first
    for lyr in ds.layers:
        w = lyr.module.weight  # the parametrized (masked) weight
        assert torch.count_nonzero(w[~masks[lyr.name]]) == 0
        assert torch.count_nonzero(ds.weight(lyr)[~masks[lyr.name]]) == 0
    assert ds.density() == pytest.approx(0.3, abs=1 / sum(lyr.numel for lyr in ds.layers))


def test_state_dict_round_trip_into_a_fresh_model_and_remove():
    model = Net()
    ds = pruner(model)
    ds.prune(0.2, batches(), loss_fn(model))
    x = batches()[0][0]
    state, model_state = ds.state_dict(), model.state_dict()
    assert "trunk.0.parametrizations.weight.0.mask" in model_state
    fresh = Net(seed=5)
    ds2 = pruner(fresh)
    ds2.load_state_dict(state)
    fresh.load_state_dict(model_state)
    for a, b in zip(fresh(x), model(x)):
        torch.testing.assert_close(a, b)
    for name, m in ds.current_masks().items():
        assert torch.equal(ds2.current_masks()[name], m)
    before = [o.detach() for o in model(x)]
    original = model.trunk[0].parametrizations.weight.original
    ds.remove()
    assert not parametrize.is_parametrized(model.trunk[0])
    assert model.trunk[0].weight is original
    for a, b in zip(model(x), before):
        torch.testing.assert_close(a, b)


def test_validation_errors():
    model = Net()
    with pytest.raises(ValueError, match="given to two roles"):
        DiSparse(model, model.trunk, [model.heads[0], model.trunk[0], model.heads[2]])
    with pytest.raises(ValueError, match="is not in model"):
        DiSparse(model, nn.Linear(2, 2), list(model.heads))
    with pytest.raises(TypeError, match="heads must be a non-empty sequence"):
        DiSparse(model, model.trunk, model.heads[0])
    ds = pruner(model, exclude=[model.trunk[0]])
    assert "trunk.0" not in {lyr.name for lyr in ds.layers}
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        ds.masks(ds.scores(criterion="magnitude"), 0.0)
    with pytest.raises(ValueError, match="criterion must be one of"):
        ds.scores(batches(), loss_fn(model), criterion="taylor")
    with pytest.raises(ValueError, match="needs batches and loss_fn"):
        ds.scores()
    with pytest.raises(ValueError, match="arbiter must be one of"):
        ds.masks(ds.scores(criterion="magnitude"), 0.5, arbiter="max")
    bad = ds.masks(ds.scores(criterion="magnitude"), 0.5)
    bad["trunk.2"] = bad["trunk.2"].float()
    with pytest.raises(ValueError, match=r"masks\['trunk.2'\] must be a bool tensor"):
        ds.apply(bad)
    assert not parametrize.is_parametrized(model.trunk[2])  # nothing changed on a refusal
    gram = mtl_optim.MTLOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.0, aggregator=mtl_optim.aggregators.MGDA(),
        route="gramian",
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs the per-task gradient matrix"):
        ds.scores(batches(), loss_fn(model), optimizer=gram)
    wrong = mtl_optim.MTLOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.0,
        shared=[*model.trunk.parameters(), *model.heads[0].parameters()],
    )  # fmt: skip
    with pytest.raises(ValueError, match="head layer 'heads.0.0' is a shared parameter"):
        ds.scores(batches(), loss_fn(model), optimizer=wrong)


def test_erk_densities_solve_the_budget_and_cap_dense_layers():
    shapes = {"a": torch.Size([100, 100]), "b": torch.Size([10, 100]), "c": torch.Size([1, 10])}
    dens = erk_densities(shapes, 0.1, power=1.0)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    assert dens["c"] == 1.0  # (1 + 10)/10 > 1: made dense
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    assert dens["a"] / dens["b"] == pytest.approx(raw["a"] / raw["b"])
    kept = sum(dens[n] * sizes[n] for n in shapes)
    assert kept == pytest.approx(0.1 * sum(sizes.values()))


# --- dynamic sparse training ----------------------------------------------------------------
def _dynamic_run(steps: int, every: int = 4, model=None, ds=None, opt=None, start: int = 0):
    data = batches(n=2)
    if model is None:
        model = Net()
        opt = mtl_optim.MTLOptimizer(
            model.parameters(), torch.optim.SGD, lr=0.05, shared=list(model.trunk.parameters())
        )
        ds = pruner(model)
        ds.dynamic(opt, 0.25, total_steps=24, every=every, end=0.75, seed=1)
    losses = loss_fn(model)
    for i in range(start, steps):
        opt.zero_grad()
        opt.backward(losses(data[i % 2]))
        opt.step()
    return model, ds, opt


def test_dynamic_updates_keep_private_layers_at_their_erk_counts():
    model = Net()
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.05, shared=list(model.trunk.parameters())
    )
    ds = pruner(model)
    ds.dynamic(opt, 0.25, total_steps=24, every=4, end=0.75, seed=1)
    targets = ds._targets
    data, losses = batches(n=2), loss_fn(model)
    grew = False
    for i in range(24):
        before = ds.current_masks()
        opt.zero_grad()
        opt.backward(losses(data[i % 2]))
        opt.step()
        after = ds.current_masks()
        for lyr in ds.layers:
            count = int(after[lyr.name].sum())
            if lyr.task is not None or i + 1 >= 18:  # heads always; every layer after the end
                assert count == targets[lyr.name], (i, lyr.name)
            else:
                assert count >= targets[lyr.name]
            new = after[lyr.name] & ~before[lyr.name]
            if new.any():
                grew = True
                assert (i + 1) % 4 == 0 and i + 1 < 18  # only at update steps
                assert torch.count_nonzero(ds.weight(lyr)[new]) == 0  # grown weights start at 0
            assert torch.count_nonzero(lyr.module.weight[~after[lyr.name]]) == 0
    assert grew
    assert ds._schedule["finished"]


def test_dynamic_grow_gradient_is_the_dense_gradient_at_the_masked_weights():
    model = Net()
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), torch.optim.SGD, lr=0.05, shared=list(model.trunk.parameters())
    )
    ds = pruner(model)
    ds.dynamic(opt, 0.25, total_steps=40, every=3, seed=2)
    data, losses = batches(n=1), loss_fn(model)
    for _ in range(2):  # steps 1 and 2: no update
        opt.zero_grad()
        opt.backward(losses(data[0]))
        opt.step()
    assert ds._grad_handle is not None  # armed for the update step 3
    seen = {}
    masks = ds.current_masks()

    def after_backward(_, info):  # registered after DiSparse's: the gradients are dense
        seen["dense"] = all(
            torch.count_nonzero(ds.weight(lyr).grad[~masks[lyr.name]]) > 0
            for lyr in ds.layers
            if not masks[lyr.name].all()
        )

    def before_step(*_):  # after DiSparse's pre-hook: recorded, then masked for the step
        seen["grads"] = ds._grads
        seen["masked"] = all(
            torch.count_nonzero(ds.weight(lyr).grad[~masks[lyr.name]]) == 0 for lyr in ds.layers
        )

    opt.register_gradient_hook(after_backward, needs_jacobian=False)
    opt.register_step_pre_hook(before_step)
    with parametrize.cached():  # the masked weights W, as tensors of the graph
        eff = [lyr.module.weight for lyr in ds.layers]
        out = losses(data[0])
        want = [
            torch.autograd.grad(loss, eff, retain_graph=True, allow_unused=True) for loss in out
        ]
        opt.zero_grad()
        opt.backward(out)
    opt.step()
    assert seen["dense"] and seen["masked"]
    for t in range(3):
        for lyr, g in zip(ds.layers, want[t]):
            if lyr.task in (None, t):
                torch.testing.assert_close(seen["grads"][t][lyr.name], g.abs())
    assert ds._grad_handle is None  # disarmed until the next update step
    for lyr in ds.layers:  # plain SGD: the step moved no weight that stayed pruned
        stayed = ~masks[lyr.name] & ~ds.current_masks()[lyr.name]
        assert torch.count_nonzero(ds.weight(lyr)[stayed]) == 0


def test_dynamic_update_by_hand():
    """Magnitude prune to round(n (1 - p_t)), then each task's top gradients among the pruned
    positions; a shared layer takes the union, a head its own task's."""
    model = Net(k=2)
    opt = mtl_optim.MTLOptimizer(model.parameters(), torch.optim.SGD, lr=0.0)
    ds = pruner(model)
    ds.dynamic(opt, 0.3, total_steps=100, every=10, end=0.5, prune_rate=0.5, seed=0)
    g = torch.Generator().manual_seed(0)
    ds._grads = [
        {lyr.name: torch.rand(ds.weight(lyr).shape, generator=g) for lyr in ds._layers_of(t)}
        for t in range(2)
    ]
    before = ds.current_masks()
    weights = {lyr.name: lyr.module.weight.detach().clone() for lyr in ds.layers}
    ds._update(10)
    p_t = 0.5 * 0.5 * (1 + math.cos(math.pi * 10 / 50))
    for lyr in ds.layers:
        n = ds._targets[lyr.name]
        keep_n = round(n * (1 - p_t))
        mags = torch.where(before[lyr.name], weights[lyr.name].abs(), -1.0).flatten()
        keep = torch.zeros_like(mags, dtype=torch.bool)
        keep[torch.sort(mags, descending=True, stable=True).indices[:keep_n]] = True
        want = keep.clone()
        for t in [0, 1] if lyr.task is None else [lyr.task]:
            score = torch.where(keep, -1.0, ds._grads[t][lyr.name].flatten())
            want[torch.sort(score, descending=True, stable=True).indices[: n - keep_n]] = True
        assert torch.equal(ds.current_masks()[lyr.name].flatten(), want), lyr.name


def test_dynamic_resume_equals_an_uninterrupted_run():
    full_model, full_ds, _ = _dynamic_run(14)
    model, ds, opt = _dynamic_run(7)
    states = copy.deepcopy((ds.state_dict(), model.state_dict(), opt.state_dict()))
    model2 = Net(seed=9)
    ds2 = pruner(model2)
    ds2.load_state_dict(states[0])
    model2.load_state_dict(states[1])
    opt2 = mtl_optim.MTLOptimizer(
        model2.parameters(), torch.optim.SGD, lr=0.05, shared=list(model2.trunk.parameters())
    )
    opt2.load_state_dict(states[2])
    ds2.attach(opt2)
    _dynamic_run(14, model=model2, ds=ds2, opt=opt2, start=7)
    for name, m in full_ds.current_masks().items():
        assert torch.equal(ds2.current_masks()[name], m), name
    for a, b in zip(full_model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b)
    assert ds2.state_dict()["schedule"] == full_ds.state_dict()["schedule"]


def test_dynamic_validation():
    model = Net()
    opt = mtl_optim.MTLOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    ds = pruner(model)
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        ds.dynamic(opt, 0.2, 100, every=0)
    with pytest.raises(ValueError, match=r"end must be in \(0, 1\]"):
        ds.dynamic(opt, 0.2, 100, end=1.5)
    with pytest.raises(ValueError, match="no dynamic schedule"):
        ds.attach(opt)
    assert not parametrize.is_parametrized(model.trunk[0])
    ds.dynamic(opt, 0.2, 100, every=10)
    ds.remove()  # permanent: dynamic training ends and its hooks are gone
    assert not parametrize.is_parametrized(model.trunk[0])
    with pytest.raises(ValueError, match="no dynamic schedule"):
        ds.attach(opt)
    losses = loss_fn(model)(batches(n=1)[0])
    opt.zero_grad()
    opt.backward(losses)
    opt.step()  # no hook fires
