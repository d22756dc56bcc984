"""Does compiling the update step pay on CPU? AdaTask's rule and two aggregator solves, eager
vs ``torch.compile`` (inductor).

    python -m benchmarks.compile_update            # -> results/compile_update.md
    python -m benchmarks.compile_update --quick    # -> results/compile_update-quick.md

* **AdaTask (Adam rule).** The eager path is what ``AdaTask`` runs on CPU: the rule applied to
  cache-sized column chunks of the ``(K, n)`` per-task gradients (``chunked_update``). The
  compiled path is ``torch.compile`` of the same rule on the whole ``(K, n)`` block, followed
  by the sum over tasks and the parameter update. Both give the same parameters (checked).
* **Aggregator solves.** ``UPGrad.weights_from_gramian`` and ``MGDA.weights_from_gramian`` on a
  ``K×K`` Gramian, eager vs compiled (the solvers' data-dependent loops and host reads split the
  compiled graph; the numbers say whether what remains is faster).

One thread; medians of interleaved rounds (``benchmarks._timing.time_fns``); the first compiled
call (the compilation) is timed separately.
"""

from __future__ import annotations

import argparse
import time

import torch

from mtl_optim import aggregators
from mtl_optim.adatask.rules import adam, chunked_update

from ._timing import markdown_table, report, time_fns


def _group() -> dict:
    return {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
    }


def adatask_case(k: int, n: int, repeat: int) -> tuple[str, dict]:
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(k, n, generator=g)
    eager_p = torch.randn(n, generator=g)
    compiled_p = eager_p.clone()
    eager_state = {"step": torch.zeros(())}
    compiled_state = {"step": torch.zeros(())}
    group = _group()

    def eager() -> None:
        chunked_update(adam, group, grads, (eager_p,), eager_state, k)

    rule = torch.compile(adam, dynamic=False)

    def compiled() -> None:
        with torch.no_grad():
            steps, alpha = rule(group, grads, (compiled_p,), compiled_state, k)
            compiled_p.add_(steps.sum(0), alpha=alpha)

    t0 = time.perf_counter()
    compiled()
    first = time.perf_counter() - t0
    eager()
    torch.testing.assert_close(compiled_p, eager_p, rtol=1e-5, atol=1e-7)
    times = time_fns({"eager": eager, "compiled": compiled}, warmup=1, repeat=repeat)
    return f"AdaTask Adam rule, K = {k}, n = {n / 2**20:.0f} Mi", {**times, "first": first}


def solve_case(name: str, agg: object, k: int, repeat: int) -> tuple[str, dict]:
    g = torch.Generator().manual_seed(1)
    j = torch.randn(k, 64, generator=g, dtype=torch.float64)
    gram = j @ j.T
    fn = agg.weights_from_gramian
    compiled_fn = torch.compile(fn, dynamic=False)
    t0 = time.perf_counter()
    out = compiled_fn(gram)
    first = time.perf_counter() - t0
    torch.testing.assert_close(out, fn(gram), rtol=1e-7, atol=1e-9)
    times = time_fns(
        {"eager": lambda: fn(gram), "compiled": lambda: compiled_fn(gram)}, warmup=2, repeat=repeat
    )
    return f"{name}.weights_from_gramian, K = {k}", {**times, "first": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeat = 3 if args.quick else 15
    sizes = [(2, 2**18)] if args.quick else [(2, 2**20), (8, 2**20)]
    cases = [adatask_case(k, n, repeat) for k, n in sizes]
    for k in (4,) if args.quick else (4, 16):
        cases.append(solve_case("UPGrad", aggregators.UPGrad(), k, repeat))
        cases.append(solve_case("MGDA", aggregators.MGDA(), k, repeat))
    rows = []
    for label, r in cases:
        eager, compiled = r["eager"][0], r["compiled"][0]
        rows.append(
            (
                label,
                f"{eager * 1e3:.3f}",
                f"{compiled * 1e3:.3f}",
                f"{eager / compiled:.2f}×",
                f"{r['first']:.1f}",
            )
        )
    table = markdown_table(
        ["step", "eager ms", "compiled ms", "speed-up", "first compiled call s"], rows
    )
    notes = (
        "CPU, one thread, float32 AdaTask state and gradients, float64 Gramians; torch.compile "
        "with the default inductor backend, dynamic=False; medians of interleaved rounds "
        f"({repeat} rounds). The machine is shared: compare the columns of one row."
    )
    report(
        "compile_update",
        "Compiling the update step on CPU",
        table,
        notes,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
