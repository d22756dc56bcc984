"""Section 5: the Triton Gramian kernel against the float64 torch routes.

For a float32 ``J`` of shape ``(K, n)``: :func:`mtl_optim.kernels.gramian` (one pass over
``J``, float64 products in registers) against the engine's :func:`mtl_optim.engine.gramian`
(float64 ``addmm`` on column chunks upcast from ``J``, what the optimizer uses), against
``J.double() @ J.double().T`` (one upcast copy, then a float64 matmul), and, for reference,
the float32 ``J @ J.T`` (float32 accumulation: not a candidate). Each result's error is
measured against the float64 product of the float64 ``J``. The kernel is worth keeping only
where it beats the faster float64 torch route.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from mtl_optim.engine import gramian as engine_gramian

from ._common import Run, Stat, bench_cuda, bench_host, table

NAME = "05-gramian"


def plan(run: Run) -> tuple[list[int], list[int]]:
    if not run.cuda:
        return [2, 8], [10**5]
    if run.quick:
        return [2, 8], [10**7, 10**6]
    return [2, 4, 8, 16], [10**7, 10**8, 10**6]


def routes(jac: torch.Tensor, kernels: object) -> dict[str, Callable[[], torch.Tensor]]:
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    if kernels is not None:
        fns["triton"] = lambda: kernels.gramian(jac)
    fns["engine float64"] = lambda: engine_gramian(jac)
    fns["float64 matmul"] = lambda: (lambda j: j @ j.T)(jac.double())
    fns["float32 matmul"] = lambda: jac @ jac.T
    return fns


def measure(run: Run, k: int, n: int, kernels: object) -> tuple[list[str], float | None]:
    """One row, and triton's time over the faster float64 torch route (None without it)."""
    jac = torch.randn(k, n, device=run.device)
    exact = (lambda j: j @ j.T)(jac.double())
    fns = routes(jac, kernels)
    errors = {}
    for name, fn in fns.items():
        m = fn().double()
        errors[name] = float((m - exact).norm() / exact.norm())
    del exact
    if run.cuda:
        t: dict[str, Stat] = bench_cuda(fns, run.device, rep_ms=40.0, min_reps=3, max_reps=50)
    else:
        t = bench_host(fns, warmup=1, repeat=3 if run.quick else 5)
    moved = 4 * k * n

    def cell(name: str) -> str:
        if name not in t:
            return "—"
        return f"{t[name].ms()} ({moved / t[name].median / 1e9:.0f} GB/s; err {errors[name]:.0e})"

    best64 = min(("engine float64", "float64 matmul"), key=lambda r: t[r].median)
    ratio = t["triton"].median / t[best64].median if "triton" in t else None
    if ratio is None:
        verdict = "— (no Triton run)"
    else:
        winner = "triton" if ratio < 1 else best64
        verdict = f"{winner} ({max(ratio, 1 / ratio):.2f}× faster)"
    row = [str(k), f"{n:.0e}", cell("triton"), cell("engine float64"), cell("float64 matmul")]
    row += [cell("float32 matmul"), verdict]
    return row, ratio


HEADERS = [
    "K",
    "n",
    "triton ms (GB/s; err)",
    "engine float64 ms",
    "J.double() @ J.double().T ms",
    "float32 J @ J.T ms (reference)",
    "faster float64 route",
]


def main(run: Run, budget: float) -> None:
    end = time.monotonic() + budget
    ks, ns = plan(run)
    kernels, note = None, "Triton kernel not timed: no CUDA."
    if run.cuda:
        try:
            from mtl_optim import kernels
        except ImportError as e:
            note = f"Triton kernel not timed: {e}."
        else:
            note = "triton: mtl_optim.kernels.gramian."
    rows, ratios = [], []
    notes = (
        f"{note} Cells: median ±IQR ({'CUDA events, L2 flushed' if run.cuda else 'wall clock'}), "
        "bandwidth = 4Kn bytes (J read once) / time; err = ‖M − M_exact‖/‖M_exact‖ with "
        "M_exact the float64 product of the float64 J."
    )

    def write(verdict: str = "") -> None:
        run.write(NAME, "GPU suite 5: Gramian J Jᵀ", verdict + table(HEADERS, rows), notes)

    for n in ns:
        for k in ks:
            if time.monotonic() > end or run.deadline.expired(10):
                rows.append([str(k), f"{n:.0e}", "skipped: time guard", "", "", "", ""])
                continue
            run.log(f"5/5 Gramian: K={k}, n={n:.0e}")
            try:
                row, ratio = measure(run, k, n, kernels)
            except Exception as e:
                row, ratio = [str(k), f"{n:.0e}", f"**error** {type(e).__name__}: {e}"], None
                row += [""] * (len(HEADERS) - len(row))
            rows.append(row)
            if ratio is not None:
                ratios.append((n, ratio))
            if run.cuda:
                torch.cuda.empty_cache()
            write()
    if ratios:
        wins = sum(r < 1 for _, r in ratios)
        big = [r for n, r in ratios if n >= 10**7]
        keep = bool(big) and all(r < 1 for r in big)
        line = (
            f"Gramian: the Triton kernel beats the faster float64 torch route in {wins} of "
            f"{len(ratios)} cases ({'all' if keep else 'not all'} at n ≥ 1e7): "
            + ("keep it" if keep else "the torch route stays the default")
        )
        run.targets.append(line)
    else:
        line = f"{len(rows)} cases; {note}"
    run.status[NAME] = line
    write(line + "\n\n")
