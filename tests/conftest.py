"""Shared test helpers: small hard-parameter-sharing models and seeded batches."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

# Hypothesis profiles, chosen by the HYPOTHESIS_PROFILE environment variable (default "ci"):
# - "ci": derandomized (the examples are a function of the test's code, so a run does not
#   depend on the machine, the clock or a leftover .hypothesis/ directory), no deadline (a
#   loaded machine is not a failure), no example database, and the reproduction blob printed;
# - "explore": random examples, EXPLORE_FACTOR times as many, failures kept in .hypothesis/.
# Per-test @settings give only an example budget, through examples(n), and never
# derandomize/deadline themselves, so the profile decides those. Loaded here, before any test
# module is imported, because a settings object inherits from the profile active at creation.
EXPLORE_FACTOR = 10
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=50,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", derandomize=False, deadline=None, max_examples=50 * EXPLORE_FACTOR
)
HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or "ci"
settings.load_profile(HYPOTHESIS_PROFILE)


def examples(n: int) -> int:
    """A test's example budget: ``n`` in the "ci" profile, ``EXPLORE_FACTOR·n`` when exploring."""
    return n * EXPLORE_FACTOR if HYPOTHESIS_PROFILE == "explore" else n


torch.set_num_threads(1)
# Triton kernels run through its CPU interpreter without CUDA; this must be set before any
# @triton.jit decorator runs, i.e. before mtl_optim.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class HPS(nn.Module):
    """A shared trunk and K heads; ``forward`` returns the K outputs."""

    def __init__(self, k: int, d_in: int = 5, width: int = 8, d_out: int = 2) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(width, d_out) for _ in range(k))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [h(z) for h in self.heads]

    def losses(self, x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        return [((out - y) ** 2).mean() for out, y in zip(self(x), ys)]


F64 = torch.float64


def t(*xs: float) -> torch.Tensor:
    """A float64 vector, e.g. scripted loss values."""
    return torch.tensor(xs, dtype=F64)


def leaf(*xs: float) -> torch.Tensor:
    return t(*xs).requires_grad_(True)


def jacobian(weighting, losses: torch.Tensor) -> torch.Tensor:
    """A weighting's ``∂o/∂L`` row by row, as the optimizer computes it."""
    x = losses.detach().clone().requires_grad_(True)
    o = weighting(x)
    return torch.stack([torch.autograd.grad(oi, x, retain_graph=True)[0] for oi in o.unbind()])


def make_model(k: int, seed: int = 0, dtype: torch.dtype = torch.float64, **kw) -> HPS:
    torch.manual_seed(seed)
    return HPS(k, **kw).to(dtype)


def batches(k: int, n: int, seed: int = 1, dtype=torch.float64, d_in: int = 5, d_out: int = 2):
    """``n`` seeded batches ``(x, [y_1..y_k])`` with task-dependent target scales."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(16, d_in, generator=g, dtype=dtype)
        ys = [(i + 1) * torch.randn(16, d_out, generator=g, dtype=dtype) for i in range(k)]
        out.append((x, ys))
    return out


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TwoTask(nn.Module):
    """A Linear trunk (tanh for the nonlinear data) and two scalar heads."""

    def __init__(self, nonlinear: bool = False) -> None:
        super().__init__()
        self.nonlinear = nonlinear
        self.trunk = nn.Linear(4, 8)
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        z = torch.tanh(z) if self.nonlinear else z
        return [h(z).squeeze(-1) for h in self.heads]


def two_task_data(nonlinear: bool = False):
    """64 seeded inputs and two targets: linear maps (global RNG) or sin/tanh (own RNG)."""
    if not nonlinear:
        x = torch.randn(64, 4, dtype=torch.float64)
        return x, [(x @ torch.randn(4, 1, dtype=torch.float64)).squeeze(-1) for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    return x, [torch.sin(x[:, 0]) + 0.5 * x[:, 1], 3.0 * torch.tanh(x[:, 2] - x[:, 3])]


def train_two_task(make_opt, *, nonlinear: bool, steps: int, epoch_every: int | None = None):
    """Train a seeded ``TwoTask`` with ``make_opt(model)``; the K losses before and after.

    After every ``step`` the same batch's losses go to ``opt.update_weighting`` (FAMO's weight
    step; a no-op for other methods)."""
    torch.manual_seed(0)
    model = TwoTask(nonlinear).double()
    x, ys = two_task_data(nonlinear)
    opt = make_opt(model)

    def losses() -> list[torch.Tensor]:
        return [((out - y) ** 2).mean() for out, y in zip(model(x), ys)]

    first = [v.item() for v in losses()]
    for step in range(steps):
        opt.zero_grad()
        opt.backward(losses())
        opt.step()
        with torch.no_grad():
            opt.update_weighting(losses())
        if epoch_every is not None and step % epoch_every == epoch_every - 1:
            opt.end_epoch()
    return opt, first, [v.item() for v in losses()]


# The hand-checkable matrix: g_1 = (-4, 1, 1), g_2 = (6, 1, 1); ‖g_1‖² = 18, ‖g_2‖² = 38,
# g_1·g_2 = -22.
J_GOLDEN = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)


@st.composite
def matrices(
    draw,
    k_min: int = 2,
    k_max: int = 8,
    full_rank: bool = False,
    d_max: int = 12,
    exponent: float = 8.0,
) -> torch.Tensor:
    """``J = A B · 10^u`` of K rows, rank ``r`` (1..K), ``u ∈ [-exponent, exponent]``."""
    k = draw(st.integers(k_min, k_max))
    rank = k if full_rank else draw(st.integers(1, k))
    d = draw(st.integers(k + 2 if full_rank else rank, d_max))
    scale = 10.0 ** draw(st.floats(-exponent, exponent))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.standard_normal((k, rank)) @ rng.standard_normal((rank, d))
    return torch.from_numpy(a * scale)


def assert_weighting_resumes(make_weighting, record, before_load=None) -> tuple:
    """Train the nonlinear two-task problem 8 steps with ``make_weighting()``, checkpoint through
    ``torch.save``, continue 8 steps; a fresh model and optimizer loaded from the checkpoint
    must reproduce ``record(opt)`` and the parameters bit for bit. ``before_load(opt)`` may
    scramble the fresh objects first. Returns the fresh ``(model, opt)``."""
    import io

    import mtl_optim

    def run(opt, model, x, ys, steps):
        out = []
        for step in steps:
            opt.zero_grad()
            opt.backward([((o - y) ** 2).mean() for o, y in zip(model(x), ys)])
            opt.step()
            with torch.no_grad():  # FAMO's weight step; a no-op for the others
                opt.update_weighting([((o - y) ** 2).mean() for o, y in zip(model(x), ys)])
            out.append(record(opt))
            if step % 3 == 2:
                opt.end_epoch()
        return out

    def build():
        torch.manual_seed(0)
        model = TwoTask(nonlinear=True).double()
        opt = mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.Adam, lr=1e-2, weighting=make_weighting()
        )
        return model, opt

    x, ys = two_task_data(nonlinear=True)
    model, opt = build()
    run(opt, model, x, ys, range(8))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    ref = run(opt, model, x, ys, range(8, 16))
    model2, opt2 = build()
    if before_load is not None:
        before_load(opt2)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    got = run(opt2, model2, x, ys, range(8, 16))
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    return model2, opt2
