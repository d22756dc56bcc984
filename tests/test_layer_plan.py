"""Per-task gradients layer by layer (``mtl_optim._streamed_gramian``): the Jacobian route's
rows written from Linear layers' output gradients, and the Gramian route's pass (the Gramian,
the combination and the rebuilt rows), each against autograd's own per-task gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl_optim._streamed_gramian import GramianPass, Plan, _trick_cost, fill_jacobian

F64, F32 = torch.float64, torch.float32


def autograd_rows(losses, shared) -> torch.Tensor:
    """Reference ``J``: one ``torch.autograd.grad`` per task, flattened and concatenated."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1)
                    for g, p in zip(grads, shared)
                ]
            )
        )
    return torch.stack(rows)


class Trunks:
    """Small multi-task problems: ``(losses, shared)`` on a fresh graph per call."""

    @staticmethod
    def mlp(k=3, dtype=F32, batch=6, width=16):
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.Linear(width, width)).to(dtype)
        heads = [nn.Linear(width, 2).to(dtype) for _ in range(k)]
        x = torch.randn(batch, 5, dtype=dtype)
        z = trunk(x)
        return [(h(z) - i).pow(2).mean() for i, h in enumerate(heads)], list(trunk.parameters())

    @staticmethod
    def tokens(k=3, dtype=F32):
        """Linear layers on (batch, tokens, features) inputs, one without bias, and LayerNorm."""
        torch.manual_seed(1)
        norm, a = nn.LayerNorm(6).to(dtype), nn.Linear(6, 12).to(dtype)
        b = nn.Linear(12, 6, bias=False).to(dtype)
        heads = [nn.Linear(6, 1).to(dtype) for _ in range(k)]
        x = torch.randn(4, 5, 6, dtype=dtype)
        z = b(torch.tanh(a(norm(x)))).mean(1)
        shared = [*norm.parameters(), *a.parameters(), *b.parameters()]
        return [h(z).pow(2).mean() + 0.1 * i for i, h in enumerate(heads)], shared

    @staticmethod
    def tied(k=3, dtype=F32):
        """One Linear applied twice (weight used by two layers), plus one read directly."""
        torch.manual_seed(2)
        lin, other = nn.Linear(7, 7).to(dtype), nn.Linear(7, 7).to(dtype)
        x = torch.randn(5, 7, dtype=dtype)
        z = lin(torch.tanh(lin(x)))
        y = other(z)
        losses = [(y[:, i] - 1).pow(2).mean() for i in range(k)]
        losses[0] = losses[0] + other.weight.pow(2).sum()  # other.weight: not only a Linear's
        return losses, [*lin.parameters(), *other.parameters()]

    @staticmethod
    def conv(k=3, dtype=F32):
        torch.manual_seed(3)
        trunk = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 8)
        ).to(dtype)
        x = torch.randn(4, 2, 4, 4, dtype=dtype)
        z = trunk(x)
        heads = [nn.Linear(8, 1).to(dtype) for _ in range(k)]
        return [h(z).pow(2).mean() for h in heads], list(trunk.parameters())

    @staticmethod
    def embedding(k=3, dtype=F32):
        """An embedding (not a Linear layer) and a task that reaches no shared Linear."""
        torch.manual_seed(4)
        emb, lin = nn.Embedding(9, 4).to(dtype), nn.Linear(4, 4).to(dtype)
        z = emb(torch.tensor([[1, 2], [3, 1]])).mean(1)
        losses = [lin(z).pow(2).sum() * (i + 1) for i in range(k - 1)] + [z.pow(3).sum()]
        return losses, [*emb.parameters(), *lin.parameters()]


CASES = ["mlp", "tokens", "tied", "conv", "embedding"]


@pytest.mark.parametrize("case", CASES)
def test_plan_serves_only_parameters_used_as_linear_weights_or_biases(case):
    losses, shared = getattr(Trunks, case)()
    plan = Plan(losses, shared, F32)
    linear = {tuple(shared[i].shape) for i in plan.linear}
    expected = {
        "mlp": {(16, 5), (16,), (16, 16)},
        "tokens": {(12, 6), (12,), (6, 12)},
        "tied": {(7, 7), (7,)},  # lin's; other.weight is read directly, other.bias is a bias
        "conv": {(8, 12), (8,)},
        "embedding": {(4, 4), (4,)},
    }[case]
    assert linear == expected
    assert sorted([*plan.linear, *plan.generic]) == list(range(len(shared)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_jacobian_rows_equal_autograd_per_task_gradients(case, dtype):
    losses, shared = getattr(Trunks, case)(dtype=dtype)
    want = autograd_rows(losses, shared)
    got = torch.full_like(want, float("nan"))  # every entry must be written
    fill_jacobian(losses, shared, got, retain_graph=True)
    if case == "tied":  # two products added: rounding of the sum may differ
        torch.testing.assert_close(got, want)
    else:  # the product autograd itself computes: the same bits
        assert torch.equal(got, want)


def test_jacobian_rows_free_the_graph_unless_retained():
    losses, shared = Trunks.mlp()
    out = torch.empty(3, sum(p.numel() for p in shared))
    fill_jacobian(losses, shared, out, retain_graph=False)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(losses[-1], shared)


@pytest.mark.parametrize("case", CASES)
def test_gramian_pass_gives_the_gramian_combination_and_rows(case):
    losses, shared = getattr(Trunks, case)(dtype=F64)
    j = autograd_rows(losses, shared)
    gp = GramianPass(losses, shared, F64, retain_graph=True)
    torch.testing.assert_close(gp.gram, j @ j.T, rtol=1e-10, atol=1e-12 * (j @ j.T).abs().max())
    assert torch.equal(gp.gram, gp.gram.T)
    c = torch.tensor([0.7, -1.3, 2.0], dtype=F64)
    parts = gp.combined(c)
    for part, want in zip(parts, (c @ j).split([p.numel() for p in shared])):
        if part is None:  # no task reaches p
            assert (want == 0).all()
        else:
            torch.testing.assert_close(part.reshape(-1), want, rtol=1e-12, atol=1e-12)
    rows = torch.empty_like(j)
    gp.jacobian_into(rows)
    torch.testing.assert_close(rows, j, rtol=1e-13, atol=0.0)


def test_gramian_trick_on_a_wide_layer_is_the_float64_gramian_of_the_exact_rows():
    # a 64-wide layer on 3 rows: the trick is cheaper than the rows, so it is taken
    k = 4
    torch.manual_seed(5)
    trunk = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    x = torch.randn(3, 8)
    z = trunk(x)
    losses = [(z * torch.randn(64)).sum() for _ in range(k)]
    shared = list(trunk.parameters())
    plan = Plan(losses, shared, F32)
    wide = [i for i in plan.linear if shared[i].shape == (64, 64)]
    assert wide and _trick_cost(plan, wide[0], k) is not None
    gp = GramianPass(losses, shared, F32, retain_graph=True)
    j = autograd_rows(losses, shared).to(F64)  # float32 rows: rounded once
    # float32 rows are rounded by ~6e-8 of their size: so is their Gramian against the trick's
    bound = 4 * torch.finfo(F32).eps * (j.abs() @ j.abs().T)
    assert ((gp.gram - j @ j.T).abs() <= bound).all()
    c = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    flat = torch.cat([g.reshape(-1) for g in gp.combined(c)])
    torch.testing.assert_close(flat, (c @ j).float(), rtol=2e-6, atol=1e-6 * flat.abs().max())


def test_gramian_pass_frees_the_graph():
    losses, shared = Trunks.tokens()
    GramianPass(losses, shared, F32)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(losses[-1], shared)


def test_a_hook_on_a_shared_weight_still_runs():
    losses, shared = Trunks.mlp()
    handle = shared[2].register_hook(lambda g: 3 * g)  # the second layer's weight
    plan = Plan(losses, shared, F32)
    assert 2 in plan.generic  # autograd computes it, running the hook
    want = autograd_rows(losses, shared)
    got = torch.empty_like(want)
    fill_jacobian(losses, shared, got, retain_graph=True)
    assert torch.equal(got, want)
    handle.remove()
