"""Per-task gradient engine: ``strategy="loop"`` vs ``strategy="batched"``.

``mtl_optim.engine.TaskGradients`` fills the ``(K, d)`` matrix J of per-task gradients of the
shared parameters either with K calls of ``torch.autograd.grad`` (``retain_graph`` on all but
the last; ``"loop"``) or with one vmapped call with ``is_grads_batched=True`` (``"batched"``).
For K in {2, 4, 8} this times forward + ``engine.compute(losses)`` with each strategy on

* the hard-parameter-sharing MLP of ``benchmarks._timing`` (2 trunk layers, widths 256 and
  1024, batch 64, K heads ``Linear(width, 8)``), and
* a small conv trunk (Conv2d 3→16 3x3, ReLU, Conv2d 16→32 3x3, ReLU, flatten) with K linear
  heads on 16x16 RGB images, batch 32;

after checking that both strategies give the same J (``torch.allclose``). A strategy that
raises on a model is reported as "unsupported". The two strategies are timed interleaved round
by round; cells are ``median ±IQR`` in milliseconds, and the last column is batched / loop
(< 1 means batched is faster).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mtl_optim.engine import TaskGradients

from ._timing import SharedMLP, make_batch, markdown_table, mse_losses, num_params, report, time_fns

OUT_DIM = 8


class ConvNet(nn.Module):
    """Conv trunk shared by K linear heads, for 3x``size``x``size`` images."""

    def __init__(self, num_tasks: int, size: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten()
        )
        feat = 32 * (size - 4) ** 2
        self.heads = nn.ModuleList(nn.Linear(feat, OUT_DIM) for _ in range(num_tasks))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z) for head in self.heads]


def _models(quick: bool) -> list[tuple[str, Callable[[int], nn.Module], tuple[int, ...], int]]:
    """(label, model factory taking K, input shape, batch)."""
    widths = (64,) if quick else (256, 1024)
    mlps = [
        (f"MLP width {w}", lambda k, w=w: SharedMLP(64, w, OUT_DIM, k), (64,), 64) for w in widths
    ]
    size = 8 if quick else 16
    return [*mlps, (f"Conv {size}x{size}", lambda k: ConvNet(k, size), (3, size, size), 32)]


def _cell(stats: tuple[float, float] | None) -> str:
    return "unsupported" if stats is None else f"{stats[0] * 1e3:.2f} ±{stats[1] * 1e3:.2f}"


def measure(label, factory, in_shape, batch, k, warmup, repeat) -> list[str]:
    torch.manual_seed(0)
    model = factory(k)
    x, ys = make_batch(batch, in_shape, OUT_DIM, k)
    params = [{"params": list(model.parameters())}]
    engines = {s: TaskGradients(strategy=s) for s in TaskGradients.STRATEGIES}
    jacobians: dict[str, Tensor] = {}
    errors: dict[str, str] = {}
    for name, engine in engines.items():
        losses = mse_losses(model, x, ys)
        engine.setup(losses, params, None)
        try:
            jacobians[name] = engine.compute(losses).clone()
        except Exception as exc:  # e.g. an op without a vmap rule
            errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    assert "loop" in jacobians, errors
    d_shared = num_params(engines["loop"].shared)
    assert d_shared == num_params(list(model.trunk.parameters())), "shared trunk not detected"
    if "batched" in jacobians:
        assert torch.allclose(jacobians["loop"], jacobians["batched"], rtol=1e-4, atol=1e-6), (
            f"{label}, K={k}: strategies disagree, max |diff| = "
            f"{(jacobians['loop'] - jacobians['batched']).abs().max():.3g}"
        )

    def run(engine: TaskGradients) -> Callable[[], None]:
        def fn() -> None:
            engine.reset()
            engine.compute(mse_losses(model, x, ys))

        return fn

    t = time_fns({name: run(engines[name]) for name in jacobians}, warmup=warmup, repeat=repeat)
    loop, batched = t["loop"], t.get("batched")
    ratio = "n/a" if batched is None else f"{batched[0] / loop[0]:.2f}×"
    for name, err in errors.items():
        print(f"[{label}, K={k}] strategy {name!r} unsupported: {err}")
    return [label, str(k), f"{d_shared:,}", _cell(loop), _cell(batched), ratio]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny, fast run (smoke test)")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds per cell")
    args = parser.parse_args()
    ks = (2, 4) if args.quick else (2, 4, 8)
    repeat = args.repeat or (3 if args.quick else 150)
    warmup = 1 if args.quick else 10

    rows = [
        measure(label, factory, shape, batch, k, warmup, repeat)
        for label, factory, shape, batch in _models(args.quick)
        for k in ks
    ]
    headers = ["model", "K", "d_shared", "loop ms", "batched ms", "batched / loop"]
    notes = (
        "Time of forward + `TaskGradients.compute(losses)` (J of the shared trunk), "
        f"{repeat} interleaved rounds after {warmup} warm-up rounds; J checked equal between "
        "strategies with `torch.allclose(rtol=1e-4, atol=1e-6)` before timing."
    )
    report(
        "engine_strategies",
        "Per-task gradient engine: loop vs batched (vmap) strategy",
        markdown_table(headers, rows),
        notes,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
