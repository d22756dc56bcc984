"""Parity with TorchJD (the reference of ``benchmarks/vs_torchjd.py``): on the same ``J``, and
over one whole training step, both libraries compute the same update. Skipped without TorchJD
(the ``bench`` extra)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtl_optim
from mtl_optim import aggregators

torchjd = pytest.importorskip("torchjd")
tja = pytest.importorskip("torchjd.aggregation")
autojac = pytest.importorskip("torchjd.autojac")

F64, F32 = torch.float64, torch.float32
TOL = {F64: dict(rtol=1e-7, atol=1e-9), F32: dict(rtol=2e-4, atol=1e-5)}


def conflicting(k: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    j = torch.randn(k, d, generator=g, dtype=F64)
    j[1] = -j[0] + 0.3 * j[1]  # a strong conflict, so the projections are active
    return j.to(dtype)


PAIRS = {
    "UPGrad": (aggregators.UPGrad, tja.UPGrad),
    "IMTL-G": (aggregators.IMTLG, tja.IMTLG),
    "PCGrad": (lambda: aggregators.PCGrad(seed=0), tja.PCGrad),
}


# PCGrad visits the tasks in a random order: the same update (whatever the order) for K = 2
CASES = [(name, k) for name in sorted(PAIRS) for k in (2, 3, 5) if name != "PCGrad" or k == 2]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize(("name", "k"), CASES)
def test_same_direction_on_the_same_jacobian(name, k, dtype):
    ours, theirs = PAIRS[name]
    for seed in range(3):
        j = conflicting(k, 40, dtype, seed)
        got, want = ours()(j), theirs()(j)
        scale = j.abs().max().item()
        torch.testing.assert_close(
            got, want.to(got.dtype), rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale
        )


class Model(nn.Module):
    def __init__(self, width: int, k: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width))
        self.heads = nn.ModuleList(nn.Linear(width, 2) for _ in range(k))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z) for h in self.heads]


@pytest.mark.parametrize("route", ["auto", "jacobian", "gramian"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_one_training_step_gives_the_same_parameters_as_torchjd(route, dtype):
    """ours: ``MTLOptimizer(SGD, UPGrad)``; TorchJD: ``mtl_backward(losses, features=z)``,
    ``jac_to_grad(shared, UPGrad())`` and the same SGD step. Width 64 on 4 rows: ``auto``
    takes the Gramian route here, so every route is compared."""
    k = 3
    model = Model(64, k).to(dtype)
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g).to(dtype)
    ys = [torch.randn(4, 2, generator=g).to(dtype) for _ in range(k)]

    def losses(m):
        z, outs = m(x)
        return z, [nn.functional.mse_loss(o, y) for o, y in zip(outs, ys)]

    opt = mtl_optim.MTLOptimizer(
        model.parameters(),
        base=torch.optim.SGD,
        lr=0.1,
        aggregator=aggregators.UPGrad(),
        route=route,
    )
    taken = []
    opt.register_gradient_hook(
        lambda o, info: taken.append("jacobian" if info.jacobian is not None else "gramian"),
        needs_jacobian=False,
    )
    opt.zero_grad()
    opt.backward(losses(model)[1])
    opt.step()
    assert taken == ["jacobian" if route == "jacobian" else "gramian"]

    sgd = torch.optim.SGD(twin.parameters(), lr=0.1)
    sgd.zero_grad()
    z, ls = losses(twin)
    autojac.mtl_backward(ls, features=z)
    autojac.jac_to_grad(list(twin.trunk.parameters()), tja.UPGrad())
    sgd.step()

    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **TOL[dtype])
