"""Section 1: correctness on CUDA.

* **Kernel tests**: ``tests/test_kernels.py`` in a subprocess with ``TRITON_INTERPRET`` unset,
  so that every kernel is compiled for the GPU and compared there with its plain-torch twin
  (in parallel with pytest-xdist when it is installed).
* **Training runs**: every exported aggregator and weighting, and AdaTask on each base, trains
  the same seeded model (a two-layer trunk, K = 3 heads) for a few steps on CUDA and on the
  CPU from the same initial parameters and batches; the final parameters (and a weighting's
  own, e.g. log-variances) must agree within the dtype's tolerance
  (:func:`~benchmarks.gpu._common.tolerance`), in float64 and in float32. AdaTask in float32
  on CUDA runs the fused Triton kernels (``fused=None``), so that row checks the kernels in a
  real training loop against the CPU torch path. Methods that draw random numbers on the
  device (PCGrad, GradVac, GradDrop) draw them on CUDA and in float64 in both runs (then cast
  and copied), so both see the same numbers. Without CUDA the float32 run on the CPU is
  compared with the float64 run on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ._common import HPS, Check, Run, compare, hps_batches, mse, table, tolerance
from ._methods import Case, cases

NAME = "01-correctness"
ROOT = Path(__file__).resolve().parents[2]
K, STEPS = 3, 4
F64 = torch.float64


@contextlib.contextmanager
def shared_draws(device: torch.device) -> Iterator[None]:
    """Seeded methods draw their random numbers on ``device`` and in float64 wherever they
    run, then cast them to the dtype and device asked for, so that a run on the CPU and one on
    CUDA, or one in float32 and one in float64, see the same numbers."""
    from mtl_optim._method import Seeded

    original_on, original_rand = Seeded.generator_on, torch.rand

    def generator_on(self, _device):
        return original_on(self, device)

    def rand(*size, generator=None, device=None, dtype=None, **kw):
        if generator is None:
            return original_rand(*size, device=device, dtype=dtype, **kw)
        x = original_rand(*size, generator=generator, device=generator.device, dtype=F64, **kw)
        return x.to(device=device or "cpu", dtype=dtype or torch.get_default_dtype())

    Seeded.generator_on, torch.rand = generator_on, rand
    try:
        yield
    finally:
        Seeded.generator_on, torch.rand = original_on, original_rand


@contextlib.contextmanager
def count_kernel_calls() -> Iterator[dict[str, int]]:
    """Count calls of the fused AdaTask kernels (``mtl_optim.kernels.*_update``)."""
    counts = {"calls": 0}
    if importlib.util.find_spec("triton") is None:
        yield counts
        return
    from mtl_optim import kernels

    names = ["adam_update", "rmsprop_update", "adagrad_update"]
    saved = {n: getattr(kernels, n) for n in names}

    def wrap(fn):
        def counted(*args, **kwargs):
            counts["calls"] += 1
            return fn(*args, **kwargs)

        return counted

    for n in names:
        setattr(kernels, n, wrap(saved[n]))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(kernels, n, fn)


def train(
    case: Case, device: torch.device, dtype: torch.dtype, steps: int = STEPS, k: int = K
) -> list[torch.Tensor]:
    """Train the seeded model ``steps`` steps with ``case``; the final parameters on the CPU
    (the model's, then the weighting's own)."""
    torch.manual_seed(0)
    model = HPS(k).to(dtype).to(device)  # initialised on the CPU: the same on every device
    data = hps_batches(k, steps, dtype, device)
    opt = case.build(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (x, ys) in enumerate(data):
            opt.zero_grad()
            opt.backward(mse(model(x), ys))
            opt.step()
            if case.post_step:
                with torch.no_grad():
                    opt.update_weighting(mse(model(x), ys))
            if i % 2 == 1:
                opt.end_epoch()
    params = list(model.parameters())
    if opt.weighting is not None:
        params += list(opt.weighting.parameters())
    return [p.detach().cpu() for p in params]


def check_case(
    case: Case, device: torch.device, dtype: torch.dtype, ref_dtype: torch.dtype | None = None
) -> tuple[Check, int]:
    """``case`` trained on ``device`` in ``dtype`` against the CPU run in ``ref_dtype``
    (default ``dtype``); also the number of fused-kernel calls in the device run."""
    ref_dtype = ref_dtype or dtype
    counting = count_kernel_calls() if device.type == "cuda" else contextlib.nullcontext({})
    with shared_draws(device):
        expected = train(case, torch.device("cpu"), ref_dtype)
        with counting as counts:
            actual = train(case, device, dtype)
    return compare(actual, expected, tolerance(dtype, STEPS)), counts.get("calls", 0)


def _cell(fn: Callable[[], tuple[Check, int]]) -> tuple[str, bool]:
    try:
        check, calls = fn()
    except Exception as e:  # a method that fails is a result, not the end of the suite
        return f"**error** {type(e).__name__}: {str(e)[:120]}", False
    extra = f"; {calls} fused-kernel calls" if calls else ""
    return check.cell() + extra, check.ok


def method_rows(run: Run, limit: float) -> tuple[list[list[str]], dict[str, int]]:
    """One row per method, and how many agree, do not, or were skipped by the time guard."""
    rows, counts = [], {"agree": 0, "fail": 0, "skipped": 0}
    end = time.monotonic() + limit
    for case in cases(K):
        if time.monotonic() > end or run.deadline.expired(30):
            rows.append([case.label, case.kind, "skipped: time guard"] + [""] * run.cuda)
            counts["skipped"] += 1
            continue
        if run.cuda:
            cells = [
                _cell(lambda c=case: check_case(c, run.device, torch.float64)),
                _cell(lambda c=case: check_case(c, run.device, torch.float32)),
            ]
        else:
            cells = [_cell(lambda c=case: check_case(c, run.device, torch.float32, F64))]
        counts["agree" if all(c[1] for c in cells) else "fail"] += 1
        rows.append([case.label, case.kind] + [c[0] for c in cells])
    return rows, counts


def _summary_counts(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    return lines[-1].strip("= ") if lines else "no pytest summary line"


def run_pytest(args: list[str], timeout: float, workers: int = 1) -> tuple[str, bool, str]:
    """``python -m pytest -q ARGS`` from the repository root with ``TRITON_INTERPRET`` unset
    (``-n workers`` with pytest-xdist); ``(summary line, passed, end of the output)``."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    cmd += args
    start = time.monotonic()
    # a session of its own, so that a timeout ends the pytest-xdist workers too
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return f"**timed out** after {timeout:.0f} s (time guard)", False, (out or "")[-3000:]
    took = time.monotonic() - start
    summary = (
        f"{_summary_counts(out)} (exit code {proc.returncode}, {took:.0f} s: {' '.join(cmd[3:])})"
    )
    return summary, proc.returncode == 0, out[-3000:]


def kernel_tests(run: Run, timeout: float) -> tuple[str, bool | None, str]:
    """``tests/test_kernels.py`` compiled on the GPU; ``(summary, passed, end of the output)``,
    ``passed`` is ``None`` when skipped."""
    if not run.cuda:
        return (
            "skipped: needs CUDA (CI runs these tests through Triton's CPU interpreter)",
            None,
            "",
        )
    if importlib.util.find_spec("triton") is None:
        return "skipped: triton is not installed", None, ""
    workers = min(8, os.cpu_count() or 1) if importlib.util.find_spec("xdist") else 1
    return run_pytest(["tests/test_kernels.py"], max(timeout, 10), workers)


def main(run: Run, budget: float) -> None:
    end = time.monotonic() + budget
    rows: list[list[str]] = []
    counts: dict[str, int] = {}
    headers = (
        ["method", "kind", "float64: CUDA vs CPU", "float32: CUDA vs CPU"]
        if run.cuda
        else ["method", "kind", "float32 vs float64 (CPU)"]
    )
    what = (
        f"{STEPS} training steps (K = {K}, a two-layer tanh trunk of width 16, batch 24) on "
        + ("CUDA and on the CPU" if run.cuda else "the CPU in float32 and in float64")
        + "; cell = relative error ‖θ − θ_ref‖/‖θ_ref‖ of the final parameters against the "
        + f"allowed {STEPS}·sqrt(eps of the dtype)."
    )

    def write(kernels_line: str, tail: str) -> None:
        if counts:
            methods = (
                f"{counts['agree']} methods agree, {counts['fail']} do not (or failed to run), "
                f"{counts['skipped']} skipped. {what}\n\n" + table(headers, rows)
            )
        else:
            methods = "running…"
        body = (
            "## Kernel tests (tests/test_kernels.py)\n\n"
            + kernels_line
            + "\n\n## Every method: a short training run\n\n"
            + methods
        )
        notes = ""
        if tail:
            notes = "Kernel tests, end of the output:\n\n```\n" + tail.strip() + "\n```"
        run.write(NAME, "GPU suite 1: correctness", body, notes)

    # the kernel tests first: they matter most, and take most of the time (compilation)
    run.log("1/5 correctness: kernel tests")
    write("running…" if run.cuda else "", "")
    timeout = min(0.75 * budget, run.deadline.left() - 60)
    summary, ok, tail = kernel_tests(run, timeout=timeout)
    write(summary, tail)
    run.log("1/5 correctness: method training runs")
    rows, counts = method_rows(run, limit=end - time.monotonic())
    write(summary, tail)
    status = (
        f"methods: {counts['agree']} agree, {counts['fail']} do not, {counts['skipped']} "
        f"skipped; kernel tests: {summary}"
    )
    run.status[NAME] = status
    if ok is False or counts["fail"]:
        run.targets.append(f"Correctness: **not all checks pass** ({status})")
