"""AdaTask against torch (K = 1, bit for bit) and against a plain reference of its rules.

The rules and decisions tested are in docs/methods/adatask.md.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from conftest import batches, clone, make_model

import mtl_optim

BASES = {
    "Adam": (torch.optim.Adam, {}),
    "Adam-amsgrad-wd-max": (
        torch.optim.Adam,
        {"amsgrad": True, "weight_decay": 0.05, "maximize": True},
    ),
    "AdamW": (torch.optim.AdamW, {"weight_decay": 0.1}),
    "RMSprop": (torch.optim.RMSprop, {}),
    "RMSprop-mom-centered-wd": (
        torch.optim.RMSprop,
        {"momentum": 0.9, "centered": True, "weight_decay": 0.01},
    ),
    "Adagrad": (torch.optim.Adagrad, {}),
    "Adagrad-decay-init-wd": (
        torch.optim.Adagrad,
        {"lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 0.01},
    ),
}


@pytest.mark.parametrize("name", list(BASES))
def test_single_task_equals_base_bit_for_bit(name):
    base, kw = BASES[name]
    model = make_model(1)
    ref = clone(model)
    opt = mtl_optim.AdaTask(
        model.parameters(), base=base, lr=0.01, shared=model.trunk.parameters(), **kw
    )
    ref_opt = base(ref.parameters(), lr=0.01, **kw)
    for x, ys in batches(1, 50):
        opt.zero_grad()
        ref_opt.zero_grad()
        opt.backward(model.losses(x, ys))
        ref.losses(x, ys)[0].backward()
        opt.step()
        ref_opt.step()
    assert len(opt.shared_params) == 4
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


# --- a reference written straight from the update rules: loops over parameters and tasks ---
def _reference_step(kind, groups, shared, task_grads, head_grads, state, k):
    """One AdaTask step. ``task_grads[p][i]``: g_i for shared p; ``head_grads[p]``: Σ-grad."""
    for group in groups:
        lr, eps = group["lr"], group["eps"]
        for p in group["params"]:
            st = state.setdefault(p, {"k": 0})
            st["k"] += 1
            t = st["k"]
            grads = task_grads[p] if p in shared else [head_grads[p]]
            if p not in shared and head_grads[p] is None:
                continue
            total = torch.zeros_like(p)
            for i, g in enumerate(grads):
                g = g.clone()
                if kind == "adam":
                    b1, b2 = group["betas"]
                    m = st.setdefault(("m", i), torch.zeros_like(p))
                    v = st.setdefault(("v", i), torch.zeros_like(p))
                    m.copy_(b1 * m + (1 - b1) * g)
                    v.copy_(b2 * v + (1 - b2) * g * g)
                    total += lr / (1 - b1**t) * m / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
                elif kind == "rmsprop":
                    rho = group["alpha"]
                    v = st.setdefault(("v", i), torch.zeros_like(p))
                    v.copy_(rho * v + (1 - rho) * g * g)
                    total += lr * g / (v.sqrt() + eps)
                else:  # adagrad
                    v = st.setdefault(("v", i), torch.zeros_like(p))
                    v.copy_(v + g * g)
                    total += lr * g / (v.sqrt() + eps)
            with torch.no_grad():
                p.sub_(total)


@pytest.mark.parametrize(
    "kind,base",
    [
        ("adam", torch.optim.Adam),
        ("rmsprop", torch.optim.RMSprop),
        ("adagrad", torch.optim.Adagrad),
    ],
)
def test_three_tasks_match_spec_reference(kind, base):
    k = 3
    model = make_model(k)
    ref = clone(model)

    def groups(m):
        return [
            {"params": list(m.trunk[0].parameters()), "lr": 0.01},
            {"params": list(m.trunk[2].parameters()) + list(m.heads.parameters()), "lr": 0.003},
        ]

    opt = mtl_optim.AdaTask(groups(model), base=base)
    ref_groups = [dict(g) for g in groups(ref)]
    for g, og in zip(ref_groups, opt.param_groups):
        for key in ("betas", "eps", "alpha"):
            if key in og:
                g[key] = og[key]
    ref_shared = set(ref.trunk.parameters())
    state: dict = {}
    for x, ys in batches(k, 50):
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()

        losses = ref.losses(x, ys)
        task_grads = {
            p: [torch.autograd.grad(loss, p, retain_graph=True)[0] for loss in losses]
            for p in ref_shared
        }
        heads = list(ref.heads.parameters())
        head_grads = dict(zip(heads, torch.autograd.grad(sum(losses), heads)))
        _reference_step(kind, ref_groups, ref_shared, task_grads, head_grads, state, k)
    assert set(map(id, opt.shared_params)) == set(map(id, model.trunk.parameters()))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def _train(opt_factory, model, data):
    opt = opt_factory(model)
    for x, ys in data:
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()
    return opt


@pytest.mark.parametrize(
    "factory",
    [
        lambda m: mtl_optim.AdaTask(m.parameters(), base=torch.optim.Adam, lr=0.01, amsgrad=True),
        lambda m: mtl_optim.AdaTask(
            m.parameters(), base=torch.optim.RMSprop, lr=0.01, momentum=0.5
        ),
        lambda m: mtl_optim.MTLOptimizer(
            m.parameters(),
            base=torch.optim.SGD,
            lr=0.01,
            momentum=0.9,
            aggregator=mtl_optim.aggregators.Mean(),
        ),
    ],
    ids=["adatask-adam", "adatask-rmsprop", "mtl-sgd-mean"],
)
def test_state_dict_round_trip_is_bit_identical(factory):
    k = 3
    data = batches(k, 20)
    straight = make_model(k)
    _train(factory, straight, data)

    first = make_model(k)
    opt = _train(factory, first, data[:10])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)

    resumed = make_model(k, seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = factory(resumed)
    opt2.load_state_dict(saved["opt"])
    assert opt2.num_tasks == k and len(opt2.shared_params) == 4
    for x, ys in data[10:]:
        opt2.zero_grad()
        opt2.backward(resumed.losses(x, ys))
        opt2.step()
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_decoupled_weight_decay_applied_once_not_per_task():
    k = 4
    model = make_model(k)
    opt = mtl_optim.AdaTask(
        model.parameters(),
        base=torch.optim.AdamW,
        lr=0.1,
        weight_decay=0.5,
        shared=model.trunk.parameters(),
    )
    before = [p.detach().clone() for p in model.trunk.parameters()]
    x, _ = batches(k, 1)[0]
    z = model.trunk(x)
    opt.backward([0.0 * z.sum() + 0.0 * h(z).sum() for h in model.heads])  # zero gradients
    opt.step()
    for p, b in zip(model.trunk.parameters(), before):
        torch.testing.assert_close(p.detach(), b * (1 - 0.1 * 0.5), rtol=0, atol=0)


def test_identical_tasks_step_is_k_times_adam():
    """No 1/K factor: K identical tasks give K Adam steps (docs/methods/adatask.md, "Decisions")."""
    k = 3
    model = make_model(1)
    ref = clone(model)
    opt = mtl_optim.AdaTask(model.parameters(), lr=0.01, shared=model.trunk.parameters())
    ref_opt = torch.optim.Adam(ref.trunk.parameters(), lr=0.01)
    x, ys = batches(1, 1)[0]
    opt.backward([model.losses(x, ys)[0] * 1.0 for _ in range(k)])
    loss = ref.losses(x, ys)[0]
    loss.backward()
    start = [p.detach().clone() for p in ref.trunk.parameters()]
    ref_opt.step()
    opt.step()
    for p, q, s in zip(model.trunk.parameters(), ref.trunk.parameters(), start):
        torch.testing.assert_close(p - s, k * (q - s), rtol=1e-10, atol=1e-14)


def test_task_missing_from_a_shared_parameter_counts_as_zero_gradient():
    k = 2
    model = make_model(k)
    opt = mtl_optim.AdaTask(
        model.parameters(),
        lr=0.01,
        shared=list(model.trunk.parameters()) + list(model.heads[0].parameters()),
    )
    for x, ys in batches(k, 3):
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()
    st = opt.task_state(model.heads[0].weight)
    assert st["exp_avg"].shape == (k, *model.heads[0].weight.shape)
    assert float(st["step"]) == 3
    assert torch.count_nonzero(st["exp_avg"][1]) == 0  # task 1 never reaches head 0
    assert torch.count_nonzero(st["exp_avg"][0]) > 0


def test_unsupported_base_and_flags():
    model = make_model(2)
    with pytest.raises(TypeError, match="Adagrad, Adam, AdamW, RMSprop"):
        mtl_optim.AdaTask(model.parameters(), base=torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="fused"):  # the kernels take fp32/bf16/fp16 only
        mtl_optim.AdaTask(model.parameters(), base=torch.optim.Adam, fused=True)
    opt = mtl_optim.AdaTask(model.parameters())
    x, ys = batches(2, 1)[0]
    z = model.trunk(x)
    with pytest.raises(ValueError, match="features"):
        opt.backward([((h(z) - y) ** 2).mean() for h, y in zip(model.heads, ys)], features=z)


def test_aggregator_rows_feed_each_tasks_own_moments():
    """Task i's moments get row i of ``aggregator.transform(J)`` (docs/methods/adatask.md,
    "With an aggregator"). ``Sum``
    leaves J as is; ``Mean`` scales every row by 1/K, which per-task Adam undoes (up to eps)."""
    k = 3
    data = batches(k, 10)
    finals = {}
    for name, agg in (
        ("none", None),
        ("sum", mtl_optim.aggregators.Sum()),
        ("mean", mtl_optim.aggregators.Mean()),
    ):
        model = make_model(k)
        _train(
            lambda m, a=agg: mtl_optim.AdaTask(m.parameters(), lr=0.01, aggregator=a), model, data
        )
        finals[name] = [p.detach() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(finals["none"], finals["sum"]))
    for a, b in zip(finals["none"], finals["mean"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(finals["none"], finals["mean"]))


@pytest.mark.parametrize(
    "base, kwargs",
    [
        (torch.optim.Adam, {"amsgrad": True, "weight_decay": 0.1}),
        (torch.optim.AdamW, {"weight_decay": 0.1}),
        (torch.optim.RMSprop, {"momentum": 0.9, "centered": True, "weight_decay": 0.1}),
        (torch.optim.Adagrad, {"lr_decay": 0.01, "weight_decay": 0.1}),
    ],
)
def test_column_chunks_give_the_same_numbers_as_one_pass(monkeypatch, base, kwargs):
    import mtl_optim.adatask.rules as rules

    def train(chunk):
        monkeypatch.setattr(rules, "CHUNK_ELEMENTS", chunk)
        model = make_model(3)
        opt = mtl_optim.AdaTask(model.parameters(), base=base, lr=1e-2, **kwargs)
        for x, ys in batches(3, 5):
            opt.zero_grad()
            opt.backward(model.losses(x, ys))
            opt.step()
        return model, opt

    one, opt_one = train(2**30)
    many, opt_many = train(7 * 3)  # 7 columns per chunk: chunks straddle parameters
    for p, q in zip(one.parameters(), many.parameters()):
        assert torch.equal(p, q)
    for gi, st in opt_one._task_state.items():
        for key, v in st.items():
            assert torch.equal(v, opt_many._task_state[gi][key]), key
