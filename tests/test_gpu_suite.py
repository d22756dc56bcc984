"""The GPU suite (``python -m benchmarks.gpu``), the part that runs without CUDA: its checks
compare for real (and fail on a wrong result), its timings give numbers, its sync capture
finds the non-finite check, its tables are written, and its time guard skips work."""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from pathlib import Path

import pytest
import torch

import mtl_optim
from benchmarks.gpu import __main__ as suite
from benchmarks.gpu import _common as suite_common
from benchmarks.gpu import bandwidth, correctness, gramian, syncs, torchjd_step
from benchmarks.gpu._common import Check, Deadline, Run, rel_error, tolerance
from benchmarks.gpu._methods import Case, cases

CPU = torch.device("cpu")
NUMBER = re.compile(r"\d+\.\d{3} ±\d+\.\d{3}")  # a "median ±IQR" cell


def _run(tmp_path: Path, seconds: float = 120.0) -> Run:
    return Run(out=tmp_path, device=CPU, quick=True, deadline=Deadline(seconds), header="H")


def _case(label: str) -> Case:
    return next(c for c in cases(correctness.K) if c.label == label)


# --- comparisons ----------------------------------------------------------------------------
def test_rel_error_and_tolerance():
    a = [torch.tensor([3.0, 4.0], dtype=torch.float64)]
    assert rel_error(a, a) == 0
    assert rel_error([torch.tensor([3.0, 4.0 + 5e-3])], a) == pytest.approx(1e-3, rel=1e-4)
    assert rel_error([torch.tensor([3.0, math.nan])], a) == math.inf
    assert rel_error([torch.zeros(3)], a) == math.inf  # shape mismatch never passes
    assert tolerance(torch.float64) == pytest.approx(2**-26)
    assert tolerance(torch.float32, steps=4) == pytest.approx(4 * 2**-11.5)
    assert not Check(math.inf, 1.0).ok and "FAIL" in Check(2.0, 1.0).cell()


@pytest.mark.parametrize("label", ["UPGrad", "PCGrad", "GradDrop", "FAMO", "AdaTask(Adam)"])
def test_method_run_float32_matches_float64(label):
    """A real comparison: the two runs differ by float32 rounding, not by nothing, and agree
    within float32's tolerance (seeded draws are shared: PCGrad, GradDrop)."""
    check, calls = correctness.check_case(_case(label), CPU, torch.float32, torch.float64)
    assert 0 < check.error < check.tol == tolerance(torch.float32, correctness.STEPS)
    assert check.ok and calls == 0


def test_method_check_fails_on_a_wrong_result():
    """The device run gets MGDA where the reference got Mean: the check must fail."""
    built = []

    def build(params):
        agg = mtl_optim.aggregators.Mean() if not built else mtl_optim.aggregators.MGDA()
        built.append(agg)
        return mtl_optim.MTLOptimizer(params, aggregator=agg, lr=1e-2)

    check, _ = correctness.check_case(Case("wrong", "aggregator", build), CPU, torch.float32)
    assert len(built) == 2 and not check.ok and check.error > 10 * check.tol


def test_pytest_runner_reports_failures_and_timeouts(tmp_path):
    """The subprocess that runs the kernel tests on the GPU: its summary, verdict, timeout."""
    (tmp_path / "test_two.py").write_text(
        "import os\n"
        "def test_ok():\n    assert 'TRITON_INTERPRET' not in os.environ\n"
        "def test_bad():\n    assert 1 == 2\n"
    )
    summary, passed, tail = correctness.run_pytest([str(tmp_path / "test_two.py")], 60)
    assert not passed and summary.startswith("1 failed, 1 passed") and "exit code 1" in summary
    assert "FAILED" in tail and "test_bad" in tail
    (tmp_path / "test_slow.py").write_text("import time\ndef test_slow():\n    time.sleep(60)\n")
    start = time.monotonic()
    summary, passed, _ = correctness.run_pytest([str(tmp_path / "test_slow.py")], 1)
    assert not passed and "timed out" in summary and time.monotonic() - start < 10


def test_kernel_tests_skip_without_cuda(tmp_path):
    summary, passed, _ = correctness.kernel_tests(_run(tmp_path), timeout=10)
    assert passed is None and "needs CUDA" in summary


# --- section 2: bandwidth -------------------------------------------------------------------
def test_bytes_moved():
    assert bandwidth.moved_bytes(2, 10, torch.float32) == 10 * (40 + 8)
    assert bandwidth.moved_bytes(16, 10, torch.bfloat16) == 10 * (320 + 4)


def test_timed_variants_compute_the_same_update():
    """The per-task Adam(fused) loop and AdaTask's torch path are the same step."""
    checks = bandwidth.same_update(3, 5000, CPU, kernels=None)
    assert set(checks) == {"Adam(fused) loop", "per-parameter loop"}
    for check in checks.values():
        assert 0 < check.error < tolerance(torch.float32)


def test_bandwidth_row_has_numbers(tmp_path):
    row, facts = bandwidth.measure(_run(tmp_path), 2, 20_000, torch.bfloat16, kernels=None)
    assert len(row) == len(bandwidth.HEADERS)
    assert row[:3] == ["bfloat16", "2", "2e+04"]
    for cell in (row[4], row[7], row[8], row[9]):  # copy, torch path, the two loops
        assert NUMBER.search(cell) and "GB/s" in cell
    assert row[5] == "—" and facts == {"pct": None, "speedup": None}


# --- section 3: host syncs ------------------------------------------------------------------
def test_sync_capture_finds_the_nonfinite_check(monkeypatch):
    """Make the non-finite check's CUDA call warn as sync debug mode does: every capture must
    point at the optimizer's non-finite guard (loss values, then J), none inside the
    aggregator."""
    original = torch._amp_foreach_non_finite_check_and_unscale_
    calls = []

    def warns(*args):
        calls.append(1)
        warnings.warn(syncs.MESSAGE, UserWarning, stacklevel=2)
        return original(*args)

    step, _ = syncs.step_fn(_case("MGDA"), CPU)
    step()
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", warns)
    with syncs.capture_syncs() as sites:
        step()
        warnings.warn("unrelated", UserWarning, stacklevel=1)
    assert len(sites) == len(calls) >= 2  # the loss values, then the gradients
    for site in sites:
        assert re.fullmatch(r"mtl_optim/\w+\.py:\d+ \w+\(\) \(from backward\(\)\)", site.where)
        assert "_amp_foreach_non_finite_check_and_unscale_" in site.why
        assert not site.in_method


def test_sync_site_inside_a_method():
    package = Path(mtl_optim.__file__).resolve().parent
    frames = [
        syncs.traceback.FrameSummary(str(package / "optimizer.py"), 10, "backward", line="x"),
        syncs.traceback.FrameSummary(
            str(package / "aggregators" / "_mgda.py"), 42, "weights", line="w.item()"
        ),
        syncs.traceback.FrameSummary("/x/torch/functional.py", 7, "norm", line="y"),
    ]
    site = syncs.site_of(frames)
    assert site.in_method
    assert site.where == "mtl_optim/aggregators/_mgda.py:42 weights() (from backward())"
    assert site.why == "`w.item()` → torch/functional.py:7 norm()"
    outside = syncs.site_of(frames[2:])
    assert outside.where.startswith("outside mtl_optim") and not outside.in_method


# --- sections 4 and 5 -----------------------------------------------------------------------
def test_step_time_against_torchjd(tmp_path):
    tjd = torchjd_step.torchjd_modules()
    if isinstance(tjd, str):
        pytest.skip(tjd)
    row, ratios = torchjd_step.measure(_run(tmp_path), "MLP", 2, "UPGrad", tjd)
    assert len(row) == len(torchjd_step.HEADERS)
    assert all(NUMBER.search(c) for c in row[4:8]) and set(ratios) == {"J", "G"}
    errors = dict(part.split(": ") for part in row[-1].split("; "))
    assert set(errors) == {"ours (G)", "TorchJD autojac", "TorchJD autogram"}
    assert all(float(e) < 1e-5 for e in errors.values())  # same combination of the same J


def test_step_time_without_torchjd(tmp_path):
    row, ratios = torchjd_step.measure(_run(tmp_path), "MLP", 2, "UPGrad", "not installed")
    assert ratios == {} and row[6] == row[7] == "—" and "not importable" in row[8]
    assert NUMBER.search(row[4]) and NUMBER.search(row[5])


def test_gramian_routes_agree(tmp_path):
    row, ratio = gramian.measure(_run(tmp_path), 3, 10_000, kernels=None)
    assert ratio is None and row[2] == "—" and "no Triton" in row[-1]
    errors = [float(re.search(r"err ([^)]+)\)", cell).group(1)) for cell in row[3:6]]
    assert errors[0] < 1e-14 and errors[1] < 1e-14  # the float64 routes
    assert 1e-9 < errors[2] < 1e-5  # float32 accumulation, for reference
    assert all(NUMBER.search(cell) for cell in row[3:6])


# --- the whole suite on the CPU -------------------------------------------------------------
def test_suite_writes_every_table(tmp_path, monkeypatch):
    monkeypatch.setattr(bandwidth, "plan", lambda run: ([2], [10**4], [torch.float32]))
    monkeypatch.setattr(gramian, "plan", lambda run: ([2], [10**4]))
    monkeypatch.setattr(torchjd_step, "plan", lambda run: ([2], ["UPGrad"]))
    monkeypatch.setattr(torchjd_step, "models", _only_mlp(torchjd_step.models))
    few = [c for c in cases(correctness.K) if c.label in ("MGDA", "FAMO", "AdaTask(Adam)")]
    monkeypatch.setattr(correctness, "cases", lambda k: few)
    run = suite.main(["--quick", "--out", str(tmp_path)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        f"{n}.md" for n in ["00-summary", *sorted(m.NAME for _, m, _ in suite.SECTIONS)]
    ]
    for path in tmp_path.iterdir():
        assert path.read_text().splitlines()[2].startswith("Device: CPU only")
    text = (tmp_path / "01-correctness.md").read_text()
    assert "3 methods agree, 0 do not" in text and "needs CUDA" in text
    assert NUMBER.search((tmp_path / "02-adatask-bandwidth.md").read_text())
    assert "Skipped: needs CUDA" in (tmp_path / "03-host-syncs.md").read_text()
    assert NUMBER.search((tmp_path / "05-gramian.md").read_text())
    summary = (tmp_path / "00-summary.md").read_text()
    assert "not run" not in summary and "crashed" not in summary
    assert run.targets == []  # CPU numbers are never reported against the GPU targets


def _only_mlp(models):
    return lambda big: {"MLP": models(big)["MLP"]}


def test_time_guard_skips_and_says_so(tmp_path):
    run = _run(tmp_path, seconds=0)
    bandwidth.main(run, budget=10)
    text = (tmp_path / f"{bandwidth.NAME}.md").read_text()
    assert text.count("skipped: time guard") == 4 and not NUMBER.search(text)
    suite.main(["--quick", "--out", str(tmp_path), "--budget", "0"])
    summary = (tmp_path / "00-summary.md").read_text()
    assert summary.count("skipped: time guard") == len(suite.SECTIONS)


# --- the CUDA-only code paths, dry-run on the CPU ---------------------------------------------
class _HostEvent:
    """``torch.cuda.Event`` stand-in: the host clock."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1e3


class _CudaRun(Run):
    """A run that takes the suite's CUDA branches, on CPU tensors."""

    cuda = True


def test_cuda_code_paths_dry_run(tmp_path, monkeypatch):
    """Every CUDA-only branch of sections 1-5 runs end to end with CPU stand-ins for events,
    sync debug mode and memory statistics, and the Triton kernels through the interpreter, so
    that the first call on a lent GPU does not find a slip in them."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1, set by conftest on CPU)")
    modes = ["default"]
    original_check = torch._amp_foreach_non_finite_check_and_unscale_

    def check(*args):  # the non-finite check syncs, as on a GPU
        if modes[-1] == "error":
            raise RuntimeError(syncs.MESSAGE)
        if modes[-1] == "warn":
            warnings.warn(syncs.MESSAGE, UserWarning, stacklevel=2)
        return original_check(*args)

    cuda = torch.cuda
    for name, value in {
        "Event": _HostEvent,
        "synchronize": lambda device=None: None,
        "set_sync_debug_mode": modes.append,
        "empty_cache": lambda: None,
        "memory_allocated": lambda device=None: 0,
        "reset_peak_memory_stats": lambda device=None: None,
        "max_memory_allocated": lambda device=None: 5 * 2**20,
    }.items():
        monkeypatch.setattr(cuda, name, value)
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", check)
    monkeypatch.setattr(suite_common, "FLUSH_BYTES", 4096)
    few = [c for c in cases(3, gramian_route=True) if c.label in ("MGDA (Gramian route)", "FAMO")]
    monkeypatch.setattr(correctness, "cases", lambda k: few)
    monkeypatch.setattr(syncs, "cases", lambda k, gramian_route: few)
    monkeypatch.setattr(correctness, "kernel_tests", lambda run, timeout: ("1 passed", True, ""))
    monkeypatch.setattr(bandwidth, "plan", lambda run: ([2], [5000], [torch.float32]))
    monkeypatch.setattr(bandwidth, "CHECK_N", {"cuda": 5000})
    monkeypatch.setattr(gramian, "plan", lambda run: ([3], [5000]))
    monkeypatch.setattr(torchjd_step, "plan", lambda run: ([2], ["MGDA"]))
    small = torchjd_step.models
    monkeypatch.setattr(torchjd_step, "models", lambda big: {"MLP": small(False)["MLP"]})
    # TorchJD's own variants run in test_step_time_against_torchjd; here ours (CUDA branches)
    monkeypatch.setattr(torchjd_step, "torchjd_modules", lambda: "TorchJD left out")

    run = _CudaRun(out=tmp_path, device=CPU, quick=True, deadline=Deadline(300), header="H")
    for module in (correctness, syncs, gramian, bandwidth, torchjd_step):
        module.main(run, budget=120)
    text = {p.stem: p.read_text() for p in tmp_path.iterdir()}
    assert "2 methods agree, 0 do not" in text["01-correctness"]
    assert "1 passed" in text["01-correctness"]
    rows = [ln for ln in text["03-host-syncs"].splitlines() if ln.startswith("| ")][1:]
    assert len(rows) == 2  # MGDA (Gramian route), FAMO
    for row in rows:  # each non-finite check is a sync: one for the losses, one or more later
        count = int(row.split("|")[2])
        sites = re.findall(r"(\d+)× mtl_optim/\w+\.py:\d+ \w+\(\)", row)
        assert count >= 2 and sum(map(int, sites)) == count
        assert "raises at mtl_optim/" in row and "disagrees" not in row
    assert "(from update_weighting())" in rows[1]  # FAMO's re-evaluated losses are checked
    assert "**missed**" in text["03-host-syncs"]
    fused = text["02-adatask-bandwidth"].splitlines()
    row = next(ln for ln in fused if ln.startswith("| float32 | 2 |"))
    assert len(NUMBER.findall(row)) == 6  # copy, fused, fused flat, torch path, two loops
    check_row = next(ln for ln in fused if ln.startswith("| 2 |"))
    assert check_row.count(" ok") == 4  # fused, fused flat and the loops compute the update
    gram_row = next(ln for ln in text["05-gramian"].splitlines() if ln.startswith("| 3 |"))
    assert len(NUMBER.findall(gram_row)) == 4 and "faster" in gram_row
    step_row = next(ln for ln in text["04-step-time-torchjd"].splitlines() if "| MLP" in ln)
    cells = step_row.split("|")
    assert NUMBER.search(cells[5]) and NUMBER.search(cells[6])  # ours (J), ours (G)
    assert cells[11].strip().startswith("5.0 / 5.0 / — / —")  # peak MiB from the CUDA stats
    assert any(t.startswith("Host syncs") for t in run.targets)
    assert any(t.startswith("Gramian") for t in run.targets)
