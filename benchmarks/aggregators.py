"""Aggregator cost: time per call on a ``(K, d)`` matrix, and Nash-MTL's solvers side by side.

    python -m benchmarks.aggregators            # full table -> results/aggregators.md
    python -m benchmarks.aggregators --quick    # smaller sizes -> results/aggregators-quick.md

Part 1 times every aggregator that ``mtl_optim.aggregators`` exports on the same random
float32 matrices, ``K`` in {2, 5, 10, 20} and ``d`` in {1e5, 1e6}, interleaved.

Part 2 solves the same sequence of slowly drifting Gramians (as in training, each solve warm-started
from the previous one) with Nash-MTL's damped Newton, with our cvxpy reference (``solver="cvxpy"``,
the DPP form of the CCP, ECOS) and with the official formulation of the CCP (see
docs/methods/aggregators.md, "Nash-MTL": Gramian and previous α as cvxpy Parameters, the tangent
built from them inside the problem, which is not DPP, so cvxpy re-canonicalises every solve), and
reports the speed ratios and every solver's residual ``max |α ⊙ Mα − 1|``.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from mtl_optim import aggregators

from ._timing import markdown_table, report, time_fns
from .methods import default_instance, exported

NAMES = [
    "Sum", "Mean", "MGDA", "PCGrad", "NashMTL", "CAGrad", "IMTLG", "GradVac", "GradDrop",
    "AlignedMTL", "UPGrad", "DualProj", "ConFIG", "FairGrad", "MoCo", "SDMGrad", "ExcessMTL",
    "Random",
]  # fmt: skip


def build(name: str):
    cls = exported(aggregators).get(name)
    return None if cls is None else default_instance(cls, num_tasks=2)


def time_aggregators(ks, ds, repeat: int) -> str:
    rows = []
    for d in ds:
        for k in ks:
            g = torch.Generator().manual_seed(k * 7 + d)
            base = torch.randn(1, d, generator=g)
            jac = 0.5 * base + torch.randn(k, d, generator=g)  # correlated, some conflict
            jac *= torch.logspace(0, 2, k)[:, None]  # task gradient norms spread over 100×
            fns, missing = {}, []
            for name in NAMES:
                agg = build(name)
                if agg is None:
                    missing.append(name)
                    continue
                fns[name] = lambda agg=agg, jac=jac: agg(jac)
            times = time_fns(fns, warmup=2, repeat=repeat)
            for name in NAMES:
                cell = "n/a" if name in missing else f"{times[name][0] * 1e3:.2f}"
                rows.append((name, k, f"{d:.0e}", cell))
    # pivot: one row per aggregator, one column per (K, d)
    cols = [(k, f"{d:.0e}") for d in ds for k in ks]
    table = {name: {} for name in NAMES}
    for name, k, d, cell in rows:
        table[name][(k, d)] = cell
    headers = ["aggregator"] + [f"K={k}, d={d}" for k, d in cols]
    return markdown_table(headers, [[n] + [table[n][c] for c in cols] for n in NAMES])


# ------------------------------------------------------------------ Nash-MTL solvers


def gram_sequence(k: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Gramians of a slowly drifting random ``(k, 50)`` gradient matrix, as in training."""
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(k, 50, generator=g, dtype=torch.float64)
    out = []
    for _ in range(steps):
        jac = jac + 0.05 * torch.randn(k, 50, generator=g, dtype=torch.float64)
        out.append(jac @ jac.T)
    return out


class OfficialCCP:
    """The official Nash-MTL CCP, as the official code builds it (not DPP: rebuilt every solve)."""

    def __init__(self, k: int, optim_niter: int = 20) -> None:
        import cvxpy as cp

        self.cp, self.k, self.optim_niter = cp, k, optim_niter
        self.alpha = np.ones(k)
        self.a = cp.Variable(k, nonneg=True)
        self.g = cp.Parameter((k, k))
        self.prev = cp.Parameter(k, nonneg=True)
        self.nf = cp.Parameter(nonneg=True)
        ga = self.g @ self.a
        ga_prev = self.g @ self.prev
        tangent = 1 / self.prev + (1 / ga_prev) @ self.g  # ∇φ(α_p), built from Parameters
        objective = cp.sum(ga) + (tangent / self.nf) @ (self.a - self.prev)
        constraints = [-cp.log(self.a * self.nf) - cp.log(ga) <= 0]
        self.problem = cp.Problem(cp.Minimize(objective), constraints)
        self.solver = cp.ECOS if "ECOS" in cp.installed_solvers() else cp.CLARABEL

    def solve(self, gram: np.ndarray) -> np.ndarray:
        nf = float(np.linalg.norm(gram))
        self.g.value, self.nf.value = gram / nf, nf
        alpha = self.alpha
        for _ in range(self.optim_niter):
            self.prev.value = alpha
            self.a.value = alpha
            try:
                self.problem.solve(solver=self.solver, warm_start=True, max_iters=100)
            except self.cp.SolverError:
                break
            new = self.a.value
            if new is None:
                break
            stop = (
                np.linalg.norm(self.g.value @ alpha - 1 / (alpha + 1e-10)) < 1e-3
                or np.linalg.norm(new - alpha) < 1e-6
            )
            alpha = np.asarray(new, dtype=np.float64)
            if stop:
                break
        self.alpha = alpha
        return alpha


def residual(gram: torch.Tensor, alpha: torch.Tensor) -> float:
    return float((alpha * (gram @ alpha) - 1).abs().max())


def nash_solvers(ks, steps: int) -> tuple[str, list[float]]:
    import time

    rows, ratios = [], []
    for k in ks:
        grams = gram_sequence(k, steps, seed=k)
        timings, residuals, alphas = {}, {}, {}
        newton = aggregators.NashMTL()
        reference = aggregators.NashMTL(solver="cvxpy")
        official = OfficialCCP(k)
        solvers = {
            "newton": newton.weights_from_gramian,
            "cvxpy (DPP, ours)": reference.weights_from_gramian,
            "cvxpy (official form)": lambda m, s=official: torch.from_numpy(s.solve(m.numpy())),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy: "problem is not DPP"
            for name, solve in solvers.items():
                solve(grams[0])  # compile / first call, not timed
                t0 = time.perf_counter()
                out = [solve(m) for m in grams[1:]]
                timings[name] = (time.perf_counter() - t0) / (steps - 1)
                residuals[name] = max(residual(m, a) for m, a in zip(grams[1:], out))
                alphas[name] = out
        rel = max(
            float((a - b).abs().max() / b.abs().max())
            for a, b in zip(alphas["newton"], alphas["cvxpy (DPP, ours)"])
        )
        r_dpp = timings["cvxpy (DPP, ours)"] / timings["newton"]
        r_off = timings["cvxpy (official form)"] / timings["newton"]
        ratios.append(r_off)
        rows.append(
            (
                k,
                f"{timings['newton'] * 1e3:.3f}",
                f"{timings['cvxpy (DPP, ours)'] * 1e3:.2f}",
                f"{timings['cvxpy (official form)'] * 1e3:.2f}",
                f"{r_dpp:.1f}×",
                f"{r_off:.1f}×",
                f"{residuals['newton']:.1e}",
                f"{residuals['cvxpy (DPP, ours)']:.1e}",
                f"{residuals['cvxpy (official form)']:.1e}",
                f"{rel:.1e}",
            )
        )
    headers = [
        "K", "Newton ms/step", "cvxpy DPP ms/step", "cvxpy official ms/step",
        "DPP / Newton", "official / Newton", "resid. Newton", "resid. DPP", "resid. official",
        "max rel. |α_N − α_cvx|",
    ]  # fmt: skip
    return markdown_table(headers, rows), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        ks, ds, repeat, nash_ks, steps = [2, 5], [10_000], 3, [2, 5], 10
    else:
        ks, ds, repeat, nash_ks, steps = [2, 5, 10, 20], [100_000, 1_000_000], 7, [2, 3, 5, 10], 50
    part1 = time_aggregators(ks, ds, repeat)
    part2, ratios = nash_solvers(nash_ks, steps)
    notes = (
        "Part 1: milliseconds per call `A(J)` (median of interleaved repeats) on float32 "
        "`J` with correlated rows whose norms spread over 100×, one thread.\n\n"
        "## Nash-MTL solvers on the same warm-started Gramian sequence\n\n"
        f"{part2}\n\n"
        f"Mean time per training step over {steps - 1} drifting Gramians (after one untimed "
        "compile/first call); residual = max over steps of max_i |α_i (Mα)_i − 1|. The official "
        "form stops at its own criteria, hence its larger residual. Newton is "
        f"{min(ratios):.0f}–{max(ratios):.0f}× faster than the official formulation "
        "(target ≥ 20×)."
    )
    report(
        "aggregators",
        "Aggregators: time per call (ms)",
        part1,
        notes,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
