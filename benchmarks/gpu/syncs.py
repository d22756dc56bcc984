"""Section 3: host syncs left in one training step of every method.

For each exported aggregator (also through the Gramian route where it applies), each exported
weighting and AdaTask on each base: a model on CUDA is trained 3 steps (warm-up), then one
full step (``zero_grad``, forward, ``opt.backward``, ``opt.step`` and, for a weighting that
learns from re-evaluated losses, ``opt.update_weighting``) runs under
``torch.cuda.set_sync_debug_mode("warn")``: every synchronizing CUDA call is caught with the
Python stack that made it and listed by the innermost ``mtl_optim`` frame (where) and its
source line (why). One more step then runs under ``"error"`` mode, which must raise exactly
when a sync was listed. ``end_epoch()`` (once per epoch) is counted apart. Torch reports the
syncs of copies to the host and of stream synchronisation (``.item()``, ``.cpu()``,
``.tolist()``, ``nonzero``, ``bool(tensor)``…); an explicit ``torch.cuda.synchronize()`` is
reported here too. Target: at most one sync per step (the non-finite check) and none inside
any solver.
"""

from __future__ import annotations

import collections
import contextlib
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import mtl_optim

from ._common import HPS, Run, hps_batches, mse, table
from ._methods import Case, cases

NAME = "03-host-syncs"
MESSAGE = "called a synchronizing CUDA operation"
PACKAGE = Path(mtl_optim.__file__).resolve().parent
_SKIP = {Path(warnings.__file__).resolve()}
K = 3


@dataclass(frozen=True)
class Site:
    """Where a sync happened (innermost mtl_optim frame) and why (its source line, and the
    library call it went through)."""

    where: str
    why: str
    in_method: bool  # inside an aggregator or weighting (a "solver")


def _short(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename).resolve()
    try:
        rel = path.relative_to(PACKAGE.parent)
    except ValueError:
        rel = Path(*path.parts[-2:])
    return f"{rel.as_posix()}:{frame.lineno} {frame.name}()"


def site_of(stack: list[traceback.FrameSummary]) -> Site:
    """The :class:`Site` of a sync from the Python stack that led to it."""
    frames = [f for f in stack if Path(f.filename).resolve() not in _SKIP]
    if not frames:
        return Site("unknown (no Python frame)", "", False)
    ours = [f for f in frames if PACKAGE in Path(f.filename).resolve().parents]
    innermost = frames[-1]
    if not ours:
        return Site(f"outside mtl_optim: {_short(innermost)}", f"`{innermost.line}`", False)
    inner = ours[-1]
    where = _short(inner)
    if ours[0] is not inner:
        where += f" (from {ours[0].name}())"
    why = f"`{inner.line}`"
    if innermost is not inner:
        why += f" → {_short(innermost)}"
    parts = Path(inner.filename).resolve().relative_to(PACKAGE).parts
    return Site(where, why, parts[0] in ("aggregators", "weighting"))


@contextlib.contextmanager
def capture_syncs(match: str = MESSAGE) -> Iterator[list[Site]]:
    """Collect a :class:`Site` for every warning whose text contains ``match`` (the one
    ``torch.cuda.set_sync_debug_mode("warn")`` emits at each sync); other warnings are
    dropped."""
    sites: list[Site] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")

        def show(message, category, filename, lineno, file=None, line=None):
            if match in str(message):
                sites.append(site_of(traceback.extract_stack()[:-1]))

        warnings.showwarning = show
        yield sites


def step_fn(case: Case, device: torch.device, k: int = K) -> tuple[Callable[[], None], object]:
    """One full training step of ``case`` on a fresh seeded model; ``(step, optimizer)``."""
    torch.manual_seed(0)
    model = HPS(k, width=64).to(device)
    ((x, ys),) = hps_batches(k, 1, torch.float32, device, batch=64)
    opt = case.build(model.parameters())

    def step() -> None:
        opt.zero_grad()
        opt.backward(mse(model(x), ys))
        opt.step()
        if case.post_step:
            with torch.no_grad():
                opt.update_weighting(mse(model(x), ys))

    return step, opt


@contextlib.contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    """Sync debug ``mode`` on; ``torch.cuda.synchronize()``, which it does not report, warns
    (or raises) the same way meanwhile."""
    original = torch.cuda.synchronize
    original()

    def synchronize(device=None):
        if mode == "error":
            raise RuntimeError(f"{MESSAGE} (torch.cuda.synchronize)")
        warnings.warn(f"{MESSAGE} (torch.cuda.synchronize)", UserWarning, stacklevel=2)
        return original(device)

    torch.cuda.synchronize = synchronize
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize = original


def measure(case: Case, device: torch.device, warmup: int = 3) -> dict:
    """Syncs of one step after ``warmup`` steps, the ``"error"`` mode verdict and the syncs
    of ``end_epoch()``."""
    step, opt = step_fn(case, device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(warmup):
            step()
    with capture_syncs() as sites, sync_debug("warn"):
        step()
    with capture_syncs() as epoch_sites, sync_debug("warn"):
        opt.end_epoch()
    try:
        with warnings.catch_warnings(), sync_debug("error"):
            warnings.simplefilter("ignore")
            step()
        error_mode = "no sync"
    except RuntimeError as e:
        if "synchronizing" not in str(e):
            raise
        error_mode = f"raises at {site_of(traceback.extract_tb(e.__traceback__)).where}"
    return {"sites": sites, "error_mode": error_mode, "epoch": epoch_sites}


def _where(sites: list[Site]) -> str:
    if not sites:
        return "—"
    counts = collections.Counter(sites)
    return "<br>".join(f"{n}× {s.where}: {s.why}" for s, n in counts.items())


def main(run: Run, budget: float) -> None:
    headers = ["method", "syncs per step", "where: why", "error mode", "end_epoch() syncs"]
    if not run.cuda:
        body = "Skipped: needs CUDA (`torch.cuda.set_sync_debug_mode`)."
        run.write(NAME, "GPU suite 3: host syncs per training step", body)
        run.status[NAME] = "skipped: needs CUDA"
        return
    end = time.monotonic() + budget
    rows, over, in_solver, total = [], [], 0, 0
    for case in cases(K, gramian_route=True):
        if time.monotonic() > end or run.deadline.expired(20):
            rows.append([case.label, "skipped: time guard", "", "", ""])
            continue
        try:
            m = measure(case, run.device)
        except Exception as e:
            rows.append([case.label, f"**error** {type(e).__name__}: {str(e)[:100]}", "", "", ""])
            continue
        n = len(m["sites"])
        total += 1
        over += [case.label] if n > 1 else []
        in_solver += any(s.in_method for s in m["sites"])
        consistent = (n == 0) == (m["error_mode"] == "no sync")
        error_cell = m["error_mode"] + ("" if consistent else " (**disagrees with warn mode**)")
        rows.append([case.label, str(n), _where(m["sites"]), error_cell, str(len(m["epoch"]))])
    run.log(f"3/5 host syncs: {total} methods")
    verdict = "met" if not over and not in_solver else "**missed**"
    line = (
        f"Host syncs: {total - len(over)} of {total} methods at ≤ 1 sync per step, "
        f"{in_solver} with a sync inside the method (target: ≤ 1, none in a solver): {verdict}"
        + (f"; over: {', '.join(over)}" if over else "")
    )
    run.targets.append(line)
    run.status[NAME] = line
    notes = (
        f"K = {K}, a trunk of width 64, batch 64, float32 on CUDA; 3 warm-up steps. 'where' is "
        "the innermost mtl_optim frame (and the mtl_optim entry point), 'why' its source line "
        "and the innermost library frame."
    )
    run.write(
        NAME,
        "GPU suite 3: host syncs per training step",
        line + "\n\n" + table(headers, rows),
        notes,
    )
