"""ImbalanceReport: the recorded numbers against a direct per-task computation, the page."""

from __future__ import annotations

import base64
import math
import pickle
import re
import struct

import pytest
import torch
from conftest import TwoTask, batches, make_model, two_task_data

import mtl_optim
from mtl_optim import aggregators, weighting
from mtl_optim.diagnostics import ImbalanceReport, TaskDominance

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _direct(model: TwoTask, losses: list[torch.Tensor]) -> torch.Tensor:
    """``J`` of the trunk by one ``torch.autograd.grad`` per task."""
    trunk = list(model.trunk.parameters())
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, trunk, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


OPTIMIZERS = {
    "mgda-sgd": lambda p: mtl_optim.MTLOptimizer(
        p, base=torch.optim.SGD, aggregator=aggregators.MGDA(), lr=0.05
    ),
    "equal-adam": lambda p: mtl_optim.MTLOptimizer(p, lr=0.01),
    "adatask": lambda p: mtl_optim.AdaTask(p, lr=0.01),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_records_norms_cosines_losses_and_weights_of_a_scripted_two_task_problem(name):
    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    x, ys = two_task_data(nonlinear=True)
    opt = OPTIMIZERS[name](model.parameters())
    report = ImbalanceReport(opt, task_names=["sin", "tanh"])
    expected_j, expected_losses, expected_weights = [], [], []
    for step in range(6):
        batch = slice(8 * step, 8 * step + 16)
        opt.zero_grad()
        losses = [((out - y[batch]) ** 2).mean() for out, y in zip(model(x[batch]), ys)]
        expected_j.append(_direct(model, losses))
        expected_losses.append(torch.stack([v.detach() for v in losses]))
        opt.backward(losses)
        w = opt.last_weights
        expected_weights.append(
            torch.full((2,), math.nan, dtype=torch.float64) if w is None else w.double()
        )
        opt.step()
    assert report.steps == 6
    j = torch.stack(expected_j)
    norms = j.norm(dim=2)
    cos = torch.einsum("tkd,tld->tkl", j, j) / (norms[:, :, None] * norms[:, None, :])
    torch.testing.assert_close(report.grad_norms, norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(report.cosines, cos, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(report.gramians, torch.einsum("tkd,tld->tkl", j, j))
    assert report.conflict.tolist() == (cos[:, 0, 1] < 0).double().tolist()
    losses = torch.stack(expected_losses)
    torch.testing.assert_close(report.losses, losses, rtol=0, atol=0)
    torch.testing.assert_close(report.loss_ratios, losses / losses[0], rtol=1e-15, atol=0)
    torch.testing.assert_close(report.weights, torch.stack(expected_weights), equal_nan=True)
    if name == "mgda-sgd":  # MGDA's row weights reach the report
        assert not report.weights.isnan().any()
    summary = report.summary()
    assert summary["tasks"] == ["sin", "tanh"] and summary["steps"] == 6
    assert summary["last_loss_ratio"] == pytest.approx((losses[-1] / losses[0]).tolist())
    assert summary["mean_conflict"] == pytest.approx((cos[:, 0, 1] < 0).double().mean().item())
    relative = norms / norms.mean(1, keepdim=True)
    assert summary["median_norm_ratio"] == pytest.approx(relative.median(0).values.tolist())
    assert (summary["dominated"] is None) == (name == "mgda-sgd")


def test_accumulated_window_gives_one_record_with_the_whole_windows_gradients():
    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    x, ys = two_task_data(nonlinear=True)
    opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.05)
    report = ImbalanceReport(opt)
    opt.zero_grad()
    total = 0
    for half in (slice(0, 32), slice(32, 64)):
        losses = [((out - y[half]) ** 2).mean() for out, y in zip(model(x[half]), ys)]
        total = total + _direct(model, losses)
        opt.backward(losses)
    opt.step()
    assert report.steps == 1
    torch.testing.assert_close(report.grad_norms[0], total.norm(dim=1), rtol=1e-10, atol=0)
    torch.testing.assert_close(report.losses[0], torch.stack([v.detach() for v in losses]))


def test_a_skipped_backward_records_nothing():
    model = make_model(2)
    opt = mtl_optim.MTLOptimizer(model.parameters(), lr=0.01)
    report = ImbalanceReport(opt)
    (x, ys), *_ = batches(2, 1)
    opt.zero_grad()
    losses = model.losses(x, ys)
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.backward([losses[0], losses[1] * float("nan")])
    opt.step()
    assert report.steps == 0


def _train(opt, model, steps: int, seed: int = 1) -> None:
    for x, ys in batches(len(model.heads), steps, seed=seed):
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()


def test_page_renders_without_a_display_as_png_and_html(tmp_path, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    model_eq, model_ada = make_model(3), make_model(3)
    eq = mtl_optim.MTLOptimizer(model_eq.parameters(), lr=0.01)
    ada = mtl_optim.AdaTask(model_ada.parameters(), lr=0.01)
    names = ["a", "b", "c"]
    base = ImbalanceReport(eq, names=model_eq.named_parameters(), task_names=names, label="EW")
    report = ImbalanceReport(ada, names=model_ada.named_parameters(), task_names=names)
    _train(eq, model_eq, 12)
    _train(ada, model_ada, 12)
    fig = report.figure(baseline=base)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:4] == [
        "loss ratio Lᵢ(t) / Lᵢ(0)",
        "task weights (AdaTask (Adam))",
        "gradient norm ratio ‖gᵢ‖ / meanⱼ ‖gⱼ‖",
        "conflict: share of task pairs with cos < 0",
    ]
    assert titles[4:6] == [
        "task dominance, mean rAU per layer\nEW",
        "task dominance, mean rAU per layer\nAdaTask (Adam)",
    ]
    heat = fig.axes[5]
    assert [t.get_text() for t in heat.get_yticklabels()] == [
        "trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias"
    ]  # fmt: skip
    png = report.save(tmp_path / "deep" / "page.png", baseline=base)
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (14 * 80, round(7.6 * 80))
    page = report.save(tmp_path / "page.html", baseline=base).read_text()
    assert page.startswith("<!doctype html>") and "<title>Task imbalance: AdaTask (Adam)" in page
    embedded = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert base64.b64decode(embedded.group(1))[:8] == PNG_SIGNATURE
    assert page.count("<tr><td>") == 6  # 3 tasks x (run, baseline)
    # without a baseline: one heatmap and the summary text
    alone = report.figure()
    assert sum(ax.get_title().startswith("task dominance") for ax in alone.axes) == 1


def test_storage_per_step_does_not_grow_with_the_model():
    sizes = {}
    for width in (4, 256):  # 60 vs 67,000 shared parameters
        model = make_model(3, width=width)
        opt = mtl_optim.MTLOptimizer(model.parameters(), lr=0.01)
        report = ImbalanceReport(opt, dominance=False)
        _train(opt, model, 3)
        sizes[width] = report.nbytes
        assert report.steps == 3
    # K² + 2K float64 numbers a step, room for 64 steps preallocated
    assert sizes[4] == sizes[256] == 64 * (3 * 3 + 2 * 3) * 8


def test_detach_stops_recording_and_a_pickled_report_still_renders(tmp_path):
    model = make_model(2)
    opt = mtl_optim.MTLOptimizer(model.parameters(), lr=0.01)
    report = ImbalanceReport(opt, names=model.named_parameters())
    _train(opt, model, 4)
    copy = pickle.loads(pickle.dumps(report))  # detached on the way
    assert copy.optimizer is None and copy.steps == 4
    torch.testing.assert_close(copy.gramians, report.gramians)
    assert copy.dominance()["names"] == report.dominance()["names"]
    report.detach()
    _train(opt, model, 2)
    assert report.steps == 4 and report.optimizer is None
    assert len(copy.figure().axes) == 7  # 4 panels, summary, heatmap, colour bar (drawn on save)


def test_refusals_name_the_problem():
    model = make_model(2)
    with pytest.raises(TypeError, match="MTLOptimizer or AdaTask"):
        ImbalanceReport(torch.optim.Adam(model.parameters()))
    nash = mtl_optim.MTLOptimizer(model.parameters(), aggregator=aggregators.NashMTL())
    with pytest.raises(TypeError, match="aggregator NashMTL does not sum the tasks"):
        ImbalanceReport(nash, dominance=True)
    auto = ImbalanceReport(nash)
    assert auto.dominance_note == "the aggregator NashMTL does not sum the tasks"
    famo = mtl_optim.MTLOptimizer(model.parameters(), weighting=weighting.FAMO(2))
    assert "clipping" in ImbalanceReport(famo).dominance_note
    with pytest.raises(RuntimeError, match="nothing recorded yet"):
        auto.figure()
    named = ImbalanceReport(mtl_optim.MTLOptimizer(model.parameters()), task_names=["a"])
    with pytest.raises(ValueError, match="task_names has 1 names for 2 tasks"):
        _train(named.optimizer, model, 1)


def test_baseline_must_have_as_many_tasks():
    reports = []
    for k in (2, 3):
        model = make_model(k)
        opt = mtl_optim.MTLOptimizer(model.parameters(), lr=0.01)
        reports.append(ImbalanceReport(opt, dominance=False))
        _train(opt, model, 2)
    with pytest.raises(ValueError, match="baseline has 2 tasks, this report 3"):
        reports[1].figure(baseline=reports[0])


def test_equal_weighting_dominance_equals_the_sum_aggregators():
    """TaskDominance on Adam without an aggregator attributes exactly as with ``Sum()``."""
    au = []
    for agg in (None, aggregators.Sum()):
        model = make_model(2)
        opt = mtl_optim.MTLOptimizer(model.parameters(), lr=0.01, aggregator=agg)
        dom = TaskDominance(opt)
        _train(opt, model, 4)
        au.append(dom.au)
    torch.testing.assert_close(au[0], au[1], rtol=0, atol=0)


def test_dominance_ignores_a_step_skipped_after_a_finite_micro_batch():
    model = make_model(2)
    opt = mtl_optim.MTLOptimizer(model.parameters(), lr=0.01)
    dom = TaskDominance(opt)
    _train(opt, model, 2)
    before = dom.au.clone()
    (x, ys), *_ = batches(2, 1, seed=3)
    opt.zero_grad()
    opt.backward(model.losses(x, ys))  # J of this micro-batch reaches the hook
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.backward([loss * float("nan") for loss in model.losses(x, ys)])
    opt.step()  # a no-op: Adam's step count stays, so nothing is attributed
    torch.testing.assert_close(dom.au, before, rtol=0, atol=0)


def test_partial_labels_record_nan_for_a_missing_task_and_ratios_from_its_first_loss(tmp_path):
    k = 3
    model = make_model(k)
    opt = mtl_optim.MTLOptimizer(
        model.parameters(), aggregator=aggregators.MGDA(), shared=list(model.trunk.parameters())
    )
    report = ImbalanceReport(opt)
    seen = []
    for step, (x, ys) in enumerate(batches(k, 4, seed=1)):
        opt.zero_grad()
        losses = model.losses(x, ys)
        seen.append([float(v.detach()) for v in losses])
        if step % 2 == 0:
            losses[1] = None
        opt.backward(losses)
        opt.step()
    recorded = report.losses
    assert recorded[0, 1].isnan() and recorded[2, 1].isnan()
    assert recorded[1, 1].item() == pytest.approx(seen[1][1], rel=1e-12)
    ratios = report.loss_ratios
    assert ratios[3, 1].item() == pytest.approx(seen[3][1] / seen[1][1], rel=1e-12)
    assert ratios[3, 0].item() == pytest.approx(seen[3][0] / seen[0][0], rel=1e-12)
    # the missing task's row of the Gramian is no measurement: NaN, and the others stay finite
    assert report.gramians[0, 1].isnan().all() and report.gramians[0, 0, [0, 2]].isfinite().all()
    summary = report.summary()
    assert math.isfinite(summary["last_loss_ratio"][1])
    assert all(math.isfinite(v) for v in summary["median_norm_ratio"])
    report.save(tmp_path / "page.png")
