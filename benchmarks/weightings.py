"""Loss weightings: step overhead over equal weighting, measured side by side.

    python -m benchmarks.weightings           # -> results/weightings.md
    python -m benchmarks.weightings --quick   # -> results/weightings-quick.md

One training step = forward, ``opt.backward(losses)``, ``opt.step()`` (plus, for FAMO, the
re-evaluation of the losses and ``opt.update_weighting``, which is part of its cost), with
``MTLOptimizer(base=Adam, weighting=W)`` on the same model and batch for every ``W``,
interleaved. The ratio is to ``weighting=None`` (plain equal weighting). Loss-only methods
target ≤ 1.1×; gradient-based ones (GradNorm, DB-MTL) need the K per-task gradients and are
compared with the same K-pass cost of ``aggregator=Sum()``. IGB-RL's periodic SAC update is
reported separately as time per update.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import mtl_optim
from mtl_optim import aggregators, weighting

from ._timing import SharedMLP, make_batch, markdown_table, mse_losses, report, time_fns
from .methods import default_instance, exported

NAMES = [
    "Equal", "ScaleInvariant", "Uncertainty", "GroupedUncertainty", "ConstrainedUncertainty",
    "DWA", "RLW", "GLS", "IGB", "IGBRL", "FAMO", "STCH", "DBMTL", "GradNorm",
]  # fmt: skip
LOSS_ONLY = {
    "Equal", "ScaleInvariant", "Uncertainty", "GroupedUncertainty", "ConstrainedUncertainty",
    "DWA", "RLW", "GLS", "IGB", "IGBRL", "FAMO", "STCH",
}  # fmt: skip


def build(name: str, k: int, steps_per_epoch: int):
    """A default instance of weighting ``name`` for K tasks (None if not available)."""
    cls = exported(weighting).get(name)
    return None if cls is None else default_instance(cls, k, steps_per_epoch=steps_per_epoch)


def make_step(model, opt, x, ys, post_step: bool):
    def step() -> None:
        opt.zero_grad()
        opt.backward(mse_losses(model, x, ys))
        opt.step()
        if post_step:
            with torch.no_grad():
                opt.update_weighting(mse_losses(model, x, ys))

    return step


def bench(k: int, width: int, repeat: int) -> tuple[list[tuple], dict]:
    torch.manual_seed(0)
    template = SharedMLP(64, width, 1, k)
    x, ys = make_batch(128, (64,), 1, k)
    fns, opts, notes = {}, {}, {}
    configs: dict[str, tuple] = {
        "none (equal)": (None, None),
        "Sum aggregator (K passes)": (None, aggregators.Sum()),
    }
    for name in NAMES:
        w = build(name, k, steps_per_epoch=10)
        if w is None:
            notes[name] = "not available"
            continue
        configs[name] = (w, None)
    for label, (w, agg) in configs.items():
        model = copy.deepcopy(template)
        opt = mtl_optim.MTLOptimizer(
            model.parameters(), base=torch.optim.Adam, lr=1e-4, weighting=w, aggregator=agg
        )
        post = w is not None and type(w).post_step is not weighting.Weighting.post_step
        fns[label] = make_step(model, opt, x, ys, post)
        opts[label] = opt
    # Warm-up past the epoch-based methods' first epochs (IGB/DWA need end_epoch calls).
    for _ in range(3):
        for label, fn in fns.items():
            for _ in range(10):
                fn()
            opts[label].end_epoch()
    times = time_fns(fns, warmup=2, repeat=repeat)
    base = times["none (equal)"][0]
    kpass = times["Sum aggregator (K passes)"][0]
    rows = []
    for label, (med, iqr) in times.items():
        ref = base if label in LOSS_ONLY or label.startswith("none") else kpass
        ref_name = "equal" if ref is base else "Sum (K passes)"
        rows.append(
            (
                label,
                k,
                width,
                f"{med * 1e3:.3f}",
                f"{iqr * 1e3:.3f}",
                f"{med / ref:.2f}× {ref_name}",
            )
        )
    return rows, notes


def sac_update_time(k: int) -> str:
    """Time per SAC update of IGB-RL, if available (read from the weighting)."""
    w = build("IGBRL", k, steps_per_epoch=2)
    if w is None:
        return "IGB-RL is not available."
    attr = next((a for a in ("last_update_seconds", "update_seconds") if hasattr(w, a)), None)
    torch.manual_seed(0)
    model = SharedMLP(16, 32, 1, k)
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.Adam, lr=1e-3, weighting=w)
    x, ys = make_batch(32, (16,), 1, k)
    t0 = time.perf_counter()
    spikes = []
    for _ in range(12):
        for _step in range(25):
            t = time.perf_counter()
            opt.zero_grad()
            opt.backward(mse_losses(model, x, ys))
            opt.step()
            spikes.append(time.perf_counter() - t)
        opt.end_epoch()
    total = time.perf_counter() - t0
    spikes.sort()
    median = spikes[len(spikes) // 2]
    worst = spikes[-1]
    extra = ""
    if attr is not None and getattr(w, attr):
        extra = f" The weighting reports {getattr(w, attr) * 1e3:.1f} ms for its last SAC round."
    return (
        f"IGB-RL (K={k}, official schedule with steps_per_epoch=25, 300 steps, {total:.1f} s): "
        f"median step {median * 1e3:.2f} ms, slowest step (a SAC training round) "
        f"{worst * 1e3:.1f} ms.{extra}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = [(3, 64)] if args.quick else [(3, 256), (8, 256), (3, 1024)]
    repeat = 5 if args.quick else 30
    rows, notes = [], {}
    for k, width in grid:
        r, n = bench(k, width, repeat)
        rows += r
        notes.update(n)
    table = markdown_table(["weighting", "K", "width", "ms/step (median)", "IQR ms", "ratio"], rows)
    missing = ", ".join(f"{n} ({why})" for n, why in notes.items())
    text = (
        "Adam, batch 128, input 64, two hidden layers of `width`, K linear heads; one thread; "
        "all configurations interleaved in one run.\n\n"
        + sac_update_time(3)
        + (f"\n\nSkipped: {missing}." if missing else "")
    )
    report("weightings", "Loss weightings: step overhead", table, text, quick=args.quick)


if __name__ == "__main__":
    main()
