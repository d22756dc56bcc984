"""Per-step overhead of mtl_optim against a plain ``sum(losses).backward(); Adam.step()`` step.

On a hard-parameter-sharing MLP (``benchmarks._timing.SharedMLP``, 2 trunk layers, K linear
heads, batch 64) and for K in {2, 4, 8} and two trunk widths, this measures in one process, on
identical models and inputs, the wall time of one full training step
(``zero_grad`` + forward + backward + ``step``) for

* baseline: ``sum(losses).backward(); torch.optim.Adam.step()``;
* ``MTLOptimizer(base=Adam, aggregator=Sum())``: computes the K per-task gradients of the shared
  trunk (the ``(K, d)`` matrix J), sums them, then steps Adam — i.e. the cost of per-task
  gradients in a real step;
* ``AdaTask(base=Adam)``: per-task gradients plus K per-task Adam states for the trunk;

and, without any optimizer step, forward + ``sum(losses).backward()`` against forward +
``TaskGradients.compute(losses)`` (the engine alone, default ``"loop"`` strategy).
Ratios are relative to the baseline in the same row. Timings are interleaved round by round
(``benchmarks._timing.time_fns``); cells are ``median ±IQR`` in milliseconds.
"""

from __future__ import annotations

import argparse
import copy

import torch

import mtl_optim
from mtl_optim import aggregators

from ._timing import SharedMLP, make_batch, markdown_table, mse_losses, num_params, report, time_fns

IN_DIM, OUT_DIM, BATCH, DEPTH = 64, 8, 64, 2


def _cell(stats: tuple[float, float], base: float | None = None) -> str:
    med, iqr = stats
    text = f"{med * 1e3:.2f} ±{iqr * 1e3:.2f}"
    return text if base is None else f"{text} ({med / base:.2f}×)"


def measure(k: int, width: int, warmup: int, repeat: int) -> list[str]:
    torch.manual_seed(0)
    proto = SharedMLP(IN_DIM, width, OUT_DIM, k, depth=DEPTH)
    x, ys = make_batch(BATCH, (IN_DIM,), OUT_DIM, k)
    models = {name: copy.deepcopy(proto) for name in ("base", "sum", "ada", "grad", "jac")}

    adam = torch.optim.Adam(models["base"].parameters(), lr=1e-3)
    mtl = mtl_optim.MTLOptimizer(
        models["sum"].parameters(), base=torch.optim.Adam, aggregator=aggregators.Sum(), lr=1e-3
    )
    ada = mtl_optim.AdaTask(models["ada"].parameters(), base=torch.optim.Adam, lr=1e-3)
    # the engine alone, set up exactly as MTLOptimizer does on its first backward
    holder = mtl_optim.MTLOptimizer(models["jac"].parameters(), base=torch.optim.Adam, lr=1e-3)
    engine = holder._engine
    engine.setup(mse_losses(models["jac"], x, ys), holder.param_groups, None)
    d_shared = num_params(engine.shared)
    assert d_shared == num_params(list(proto.trunk.parameters())), "shared trunk not detected"

    def baseline() -> None:
        adam.zero_grad()
        sum(mse_losses(models["base"], x, ys)).backward()
        adam.step()

    def mtl_step(opt: mtl_optim.MTLOptimizer, model: torch.nn.Module) -> None:
        opt.zero_grad()
        opt.backward(mse_losses(model, x, ys))
        opt.step()

    def grad_sum() -> None:
        models["grad"].zero_grad()
        sum(mse_losses(models["grad"], x, ys)).backward()

    def grad_jac() -> None:
        engine.reset()
        engine.compute(mse_losses(models["jac"], x, ys))

    t = time_fns(
        {
            "base": baseline,
            "sum": lambda: mtl_step(mtl, models["sum"]),
            "ada": lambda: mtl_step(ada, models["ada"]),
            "grad": grad_sum,
            "jac": grad_jac,
        },
        warmup=warmup,
        repeat=repeat,
    )
    b, g = t["base"][0], t["grad"][0]
    return [
        str(k),
        str(width),
        f"{d_shared:,}",
        _cell(t["base"]),
        _cell(t["sum"], b),
        _cell(t["ada"], b),
        _cell(t["grad"]),
        _cell(t["jac"], g),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny, fast run (smoke test)")
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds per cell")
    args = parser.parse_args()
    widths = (64,) if args.quick else (256, 1024)
    ks = (2, 4) if args.quick else (2, 4, 8)
    repeat = args.repeat or (3 if args.quick else 80)
    warmup = 1 if args.quick else 30  # the first configurations need a longer warm-up

    rows = [measure(k, w, warmup, repeat) for w in widths for k in ks]
    headers = [
        "K",
        "width",
        "d_shared",
        "baseline step ms",
        "MTL+Sum step ms (ratio)",
        "AdaTask step ms (ratio)",
        "fwd+sum-bwd ms",
        "fwd+J ms (ratio)",
    ]
    notes = (
        f"MLP: in {IN_DIM}, {DEPTH} shared Linear+ReLU layers of `width`, K heads "
        f"Linear(width, {OUT_DIM}), batch {BATCH}, MSE losses; {repeat} interleaved rounds after "
        f"{warmup} warm-up rounds. Step columns: zero_grad + forward + backward + step, ratio "
        "to the baseline `sum(losses).backward(); Adam.step()`. Last two columns: forward + "
        "`sum(losses).backward()` vs forward + `TaskGradients.compute(losses)` (strategy "
        "'loop'), ratio to the former."
    )
    report(
        "step_overhead",
        "Step overhead: per-task gradients and AdaTask vs a plain Adam step",
        markdown_table(headers, rows),
        notes,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
