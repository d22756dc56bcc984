"""The Triton kernels of ``mtl_optim.kernels`` against their pure-torch twins.

Without CUDA the kernels run through Triton's CPU interpreter, switched on in ``conftest.py``
before the kernels' ``@triton.jit`` decorators run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HPS, J_GOLDEN, batches, examples, matrices
from hypothesis import given, settings

pytest.importorskip("triton", reason="the fused kernels need Triton: pip install '.[kernels]'")

from mtl_optim import kernels
from mtl_optim.adatask import AdaTask  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
K = 3
# columns: 0-128 | 128-133 | 133-160 | 160-460 | 460-461: at BLOCK = 64 this gives full aligned
# windows (the "even" launch), edge windows, and parameters smaller than one window
SHAPES = [(8, 16), (5,), (3, 3, 3), (300,), (1,)]
N = sum(torch.Size(s).numel() for s in SHAPES)
BLOCK = 64

CONFIGS = {
    "adam": (torch.optim.Adam, {}),
    "adam-amsgrad-maximize-l2": (
        torch.optim.Adam,
        {"amsgrad": True, "maximize": True, "weight_decay": 0.1},
    ),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.1}),
    "adam-beta1-0.3": (torch.optim.Adam, {"betas": (0.3, 0.95)}),  # lerp's second formula
    "rmsprop": (torch.optim.RMSprop, {}),
    "rmsprop-centered-momentum-l2-maximize": (
        torch.optim.RMSprop,
        {"centered": True, "momentum": 0.9, "weight_decay": 0.1, "maximize": True},
    ),
    "rmsprop-alpha-0.3-centered": (torch.optim.RMSprop, {"alpha": 0.3, "centered": True}),
    "adagrad": (torch.optim.Adagrad, {}),
    "adagrad-decay-init-l2-maximize": (
        torch.optim.Adagrad,
        {"lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 0.1, "maximize": True},
    ),
}
KERNELS = {
    torch.optim.Adam: (kernels.adam_update, kernels.adam_update_reference),
    torch.optim.AdamW: (kernels.adam_update, kernels.adam_update_reference),
    torch.optim.RMSprop: (kernels.rmsprop_update, kernels.rmsprop_update_reference),
    torch.optim.Adagrad: (kernels.adagrad_update, kernels.adagrad_update_reference),
}


def _group(base: type, **kw) -> dict:
    """A real torch param group of ``base`` (every key its step reads), lr 0.01."""
    return base([torch.zeros(1)], lr=0.01, **kw).param_groups[0]


def _params(dtype: torch.dtype, layout: str = "separate", seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(s, generator=g).to(dtype=dtype, device=DEVICE) for s in SHAPES]
    if layout == "separate":
        return tuple(values)
    flat = torch.cat([v.reshape(-1) for v in values])  # contiguous views of one buffer
    return tuple(c.view(s) for c, s in zip(flat.split([v.numel() for v in values]), SHAPES))


def _grads(step: int) -> torch.Tensor:
    """Rows of a wider J (row stride != n, column offset 5), as AdaTask passes them."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(K, N + 9, generator=g)[:, 5 : 5 + N].to(DEVICE)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """Every element within ``rtol`` (and ``rtol`` of the largest, for entries near zero)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.double().cpu(), expected.double().cpu()
    torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * e.abs().max().item())


def _run_both(base: type, kw: dict, dtype: torch.dtype, layout: str, steps: int = 3):
    fused, twin = KERNELS[base]
    group = _group(base, **kw)
    params, ref_params = _params(dtype, layout), _params(dtype, layout)
    state, ref_state = {}, {}
    for step in range(steps):
        fused(group, _grads(step), params, state, block=BLOCK)
        twin(group, _grads(step), ref_params, ref_state)
    return params, ref_params, state, ref_state


def _check(params, ref_params, state, ref_state, dtype: torch.dtype) -> None:
    for p, q in zip(params, ref_params):
        if dtype == torch.float32:
            _close(p, q)
        else:  # a float32 rounding difference may flip the last bit of a bf16/fp16 parameter
            torch.testing.assert_close(p, q, rtol=torch.finfo(dtype).eps, atol=0)
    assert set(state) == set(ref_state)
    for key in ref_state:
        _close(state[key], ref_state[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_update_kernels_match_their_twins(name, dtype):
    """Params and every state buffer after 3 steps (bias corrections, momentum), per flag."""
    base, kw = CONFIGS[name]
    params, ref_params, state, ref_state = _run_both(base, kw, dtype, "separate")
    _check(params, ref_params, state, ref_state, dtype)
    assert float(state["step"]) == 3
    assert state["step"].device.type == DEVICE.type
    assert not any(torch.equal(p, q) for p, q in zip(params, _params(dtype)))  # they moved


@pytest.mark.parametrize(
    "name", ["adam-amsgrad-maximize-l2", "rmsprop-centered-momentum-l2-maximize"]
)
def test_flat_layout_matches_twin(name):
    """Parameters that are views of one buffer take the flat (table-free) launch."""
    base, kw = CONFIGS[name]
    params = _params(torch.float32, "flat")
    assert [launch.flat for launch in kernels._launch.plan(params, N, BLOCK)] == [True]
    _check(*_run_both(base, kw, torch.float32, "flat"), torch.float32)


def test_plan_covers_every_column_once():
    params = _params(torch.float32)
    launches = kernels._launch.plan(params, N, BLOCK)
    assert {launch.even for launch in launches} == {True, False}
    seen = torch.zeros(N, dtype=torch.int64)
    ends = {p.data_ptr(): p.numel() for p in params}
    for launch in launches:
        start, stop, address = launch.table.cpu()
        assert torch.all(stop - start <= BLOCK) and torch.all(stop > start)
        if launch.even:
            assert torch.all(start % BLOCK == 0) and torch.all(stop - start == BLOCK)
            assert torch.all(address % 64 == 0)
        for a, b in zip(start.tolist(), stop.tolist()):
            seen[a:b] += 1
    assert torch.all(seen == 1)
    # each table address is its column's element of the right parameter
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    for launch in launches:
        for col, addr in zip(launch.table[0].tolist(), launch.table[2].tolist()):
            i = int(torch.searchsorted(offsets, col, right=True)) - 1
            p = params[i]
            assert addr == p.data_ptr() + (col - offsets[i].item()) * 4
            assert col - offsets[i].item() < ends[p.data_ptr()]


def test_mixed_dtypes_and_non_contiguous_params():
    """A group with float32, bf16 and a transposed (non-contiguous) parameter, and column-major
    gradients."""

    def make() -> tuple:
        g = torch.Generator().manual_seed(3)
        return (
            torch.randn(8, 16, generator=g).to(DEVICE),
            torch.randn(5, 61, generator=g).to(device=DEVICE, dtype=torch.bfloat16),
            torch.randn(7, 40, generator=g).to(DEVICE).t(),
        )

    params, ref_params = make(), make()
    g = torch.Generator().manual_seed(4)
    assert not params[2].is_contiguous()
    n = sum(p.numel() for p in params)
    group = _group(torch.optim.Adam, weight_decay=0.1)
    state, ref_state = {}, {}
    for _ in range(2):
        grads = torch.randn(n, K, generator=g).to(DEVICE).T  # column stride K: copied
        kernels.adam_update(group, grads, params, state, block=BLOCK)
        kernels.adam_update_reference(group, grads, ref_params, ref_state)
    _close(params[0], ref_params[0])
    torch.testing.assert_close(params[1], ref_params[1], rtol=2**-7, atol=0)
    _close(params[2], ref_params[2])
    _close(state["exp_avg_sq"], ref_state["exp_avg_sq"])


def test_adam_golden_first_step():
    """Adam's first step is ``-lr·sign(g)`` per task (up to eps): agreeing tasks add up."""
    p = torch.tensor([1.0, 1.0, 1.0], device=DEVICE)
    grads = torch.tensor([[0.5, -2.0, 4.0], [3.0, 4.0, 1e-3]], device=DEVICE)
    kernels.adam_update(_group(torch.optim.Adam), grads, (p,), {})
    lr, eps = 0.01, 1e-8
    expected = 1.0 - lr * (grads / (grads.abs() + eps)).sum(0)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=0)
    assert p.tolist()[0] == pytest.approx(0.98) and p.tolist()[1] == pytest.approx(1.0)


def test_validation():
    p = torch.zeros(4, device=DEVICE)
    group = _group(torch.optim.Adam)
    with pytest.raises(ValueError, match="columns"):
        kernels.adam_update(group, torch.zeros(2, 5, device=DEVICE), (p,), {})
    with pytest.raises(TypeError, match="float32"):
        kernels.adam_update(group, torch.zeros(2, 4, dtype=torch.float64), (p.double(),), {})
    with pytest.raises(TypeError, match="float64"):
        kernels.adam_update(group, torch.zeros(2, 4, device=DEVICE), (p.double(),), {})


# --- Gramian -------------------------------------------------------------------------------
def test_gramian_golden():
    m = kernels.gramian(J_GOLDEN.float().to(DEVICE))
    assert m.dtype == torch.float64
    assert m.tolist() == [[18.0, -22.0], [-22.0, 38.0]]


@settings(max_examples=examples(25))
@given(matrices(k_min=1, k_max=7, d_max=40))
def test_gramian_matches_twin(jacobian):
    j = jacobian.float().to(DEVICE)
    m, ref = kernels.gramian(j, block=16, programs=2), kernels.gramian_reference(j)
    assert torch.equal(m, m.T)
    torch.testing.assert_close(m, ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item())


def test_gramian_many_tiles_strided_rows():
    g = torch.Generator().manual_seed(0)
    j = torch.randn(5, 3001, generator=g)[:, 1:].to(DEVICE)  # row stride 3001, d = 3000
    m = kernels.gramian(j, block=512, programs=3)  # 6 tiles over 3 programs
    ref = kernels.gramian_reference(j)
    torch.testing.assert_close(m, ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item())


# --- AdaTask(fused=...) ----------------------------------------------------------------------
def _train(base: type, fused: bool | None, steps: int, repeat: bool = False, **kw):
    """``steps`` AdaTask steps on fresh batches (or on one batch, ``repeat``); the model, the
    optimizer and the K losses on the first batch before and after."""
    torch.manual_seed(0)
    model = HPS(K).to(DEVICE)
    opt = AdaTask(model.parameters(), base=base, fused=fused, lr=0.01, **kw)
    data = [
        (x.to(DEVICE), [y.to(DEVICE) for y in ys])
        for x, ys in batches(K, 1 if repeat else steps, dtype=torch.float32)
    ] * (steps if repeat else 1)
    first = [v.item() for v in model.losses(*data[0])]
    for x, ys in data:
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()
    return model, opt, first, [v.item() for v in model.losses(*data[0])]


@pytest.mark.parametrize("name", ["adam-amsgrad-maximize-l2", "adamw", "rmsprop", "adagrad"])
def test_adatask_fused_equals_torch_path(name):
    base, kw = CONFIGS[name]
    kw = {k: v for k, v in kw.items() if k != "maximize"}  # train downhill
    model, opt, _, _ = _train(base, True, 5, **kw)
    ref, ref_opt, _, _ = _train(base, False, 5, **kw)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.trunk.parameters(), ref.trunk.parameters()):
        st, ref_st = opt.task_state(p), ref_opt.task_state(q)
        for key in ref_st:
            torch.testing.assert_close(st[key].cpu(), ref_st[key].cpu(), rtol=1e-5, atol=1e-7)


def test_adatask_fused_training_lowers_every_loss():
    _, opt, first, last = _train(torch.optim.Adam, True, 30, repeat=True)
    assert all(b < a for a, b in zip(first, last)), (first, last)
    assert "fused=True" in repr(opt)


def test_fused_none_selects_torch_path_on_cpu(monkeypatch):
    if DEVICE.type == "cuda":
        pytest.skip("on CUDA fused=None selects the kernels")

    def boom(*args, **kwargs):
        raise AssertionError("kernel called")

    monkeypatch.setattr(kernels, "adam_update", boom)
    model, _, first, last = _train(torch.optim.Adam, None, 3)
    assert last != first


def test_fused_true_errors(monkeypatch):
    model = HPS(2)
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        AdaTask(model.double().parameters(), fused=True)
    with pytest.raises(TypeError, match="fused must be"):
        AdaTask(model.parameters(), fused="yes")
    if DEVICE.type == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="CUDA"):
            AdaTask(HPS(2).parameters(), fused=True)


def test_observer_falls_back_to_torch_path():
    """Observers need the per-task steps, which only the torch rules form."""
    torch.manual_seed(0)
    model = HPS(K).to(DEVICE)
    opt = AdaTask(model.parameters(), fused=True, lr=0.01)
    seen = []
    opt.add_observer(lambda s, steps: seen.append(steps.shape))
    ref, _, _, _ = _train(torch.optim.Adam, False, 2)
    for x, ys in batches(K, 2, dtype=torch.float32):
        opt.zero_grad()
        opt.backward(model.losses(x.to(DEVICE), [y.to(DEVICE) for y in ys]))
        opt.step()
    assert len(seen) == 2 and seen[0][0] == K
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_state_dict_moves_between_paths():
    """Fused for 3 steps, then the torch path from its checkpoint = the torch path throughout."""
    model, opt, _, _ = _train(torch.optim.Adam, True, 3)
    ref, ref_opt, _, _ = _train(torch.optim.Adam, False, 3)
    opt2 = AdaTask(model.parameters(), fused=False, lr=0.01)
    opt2.load_state_dict(opt.state_dict())
    for x, ys in batches(K, 2, seed=7, dtype=torch.float32):
        x, ys = x.to(DEVICE), [y.to(DEVICE) for y in ys]
        for m, o in ((model, opt2), (ref, ref_opt)):
            o.zero_grad()
            o.backward(m.losses(x, ys))
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
