"""``python -m benchmarks.gpu [--out DIR] [--quick] [--budget S] [--sections 1,2,...]``: see
the package docstring (``benchmarks/gpu/__init__.py``) for what runs and how to run it on a
lent GPU machine."""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import torch

from . import bandwidth, correctness, gramian, syncs, torchjd_step
from ._common import DEFAULT_OUT, Deadline, Run, environment

# (number, module, share of the time budget); run in this order: the fast sections before the
# long timings, so that a cut-short run still has them
SECTIONS = [
    ("1", correctness, 0.34),
    ("3", syncs, 0.07),
    ("5", gramian, 0.07),
    ("2", bandwidth, 0.26),
    ("4", torchjd_step, 0.26),
]


def sizes_line(quick: bool, cuda: bool) -> str:
    ks, ns, _ = bandwidth.plan(_probe(quick, cuda))
    tk, _ = torchjd_step.plan(_probe(quick, cuda))
    return f"AdaTask K {ks}, n {[f'{n:.0e}' for n in ns]}; step time K {tk}"


def _probe(quick: bool, cuda: bool) -> Run:
    device = torch.device("cuda" if cuda else "cpu")
    return Run(out=Path("."), device=device, quick=quick, deadline=Deadline(0))


def write_summary(run: Run, started: float, wanted: list[str]) -> None:
    """``00-summary.md``: each wanted section's status and the targets evaluated so far."""
    lines = ["## Sections", ""]
    for name in wanted:
        lines.append(f"- {name}: {run.status.get(name, 'not run yet')}")
    lines += ["", "## Targets", ""]
    lines += [f"- {t}" for t in run.targets] or ["- none evaluated"]
    lines += ["", f"Wall time: {time.monotonic() - started:.0f} s."]
    run.write("00-summary", "GPU suite: summary", "\n".join(lines))


def main(argv: list[str] | None = None) -> Run:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the tables")
    parser.add_argument("--quick", action="store_true", help="a subset of the sizes")
    parser.add_argument(
        "--budget", type=float, default=420.0, help="seconds before the time guard stops work"
    )
    parser.add_argument(
        "--sections", default="1,2,3,4,5", help="comma-separated section numbers to run"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    run = Run(out=args.out, device=device, quick=args.quick, deadline=Deadline(args.budget))
    run.header = environment(device, args.quick, sizes_line(args.quick, cuda))
    run.log(run.header)
    wanted = {s.strip() for s in args.sections.split(",") if s.strip()}
    todo = [(num, mod, share) for num, mod, share in SECTIONS if num in wanted]
    names = sorted(module.NAME for _, module, _ in todo)
    for i, (_, module, share) in enumerate(todo):
        rest = sum(s for _, _, s in todo[i:])
        budget = max(0.0, run.deadline.left() * share / rest)
        if run.deadline.expired(5):
            run.status[module.NAME] = "skipped: time guard (budget spent)"
            continue
        run.log(f"section {module.NAME}: {budget:.0f} s")
        try:
            module.main(run, budget)
        except Exception:
            trace = traceback.format_exc()
            run.status[module.NAME] = f"**crashed**: {trace.strip().splitlines()[-1]}"
            run.log(f"section {module.NAME} crashed:\n{trace}")
        write_summary(run, started, names)
    write_summary(run, started, names)
    run.log(f"done in {time.monotonic() - started:.0f} s; tables in {run.out}")
    print("\n".join(["", "Targets:"] + [f"- {t}" for t in run.targets]), flush=True)
    return run


if __name__ == "__main__":
    main()
