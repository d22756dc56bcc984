"""Partial labels at the aggregator level: ``present`` / ``all_tasks`` set around a call on the
rows of the present tasks (the optimizer's side is tested with ``opt.backward``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from benchmarks.methods import default_instance, exported
from mtl_optim import aggregators
from mtl_optim.aggregators import (
    ConFIG,
    DualProj,
    GradDrop,
    GradVac,
    MoCo,
    NashMTL,
    PCGrad,
    Random,
    UPGrad,
)

F64 = torch.float64
K, D = 4, 6
P = [0, 2, 3]  # task 1 is missing
MISSING = [1]
NAMES = sorted(exported(aggregators))
#: orders or weights drawn per task: the reference is the restriction of a K-task draw
DRAWS_PER_TASK = {"Random", "PCGrad", "GradVac"}
STATEFUL = {"NashMTL", "FairGrad", "SDMGrad", "MoCo", "ExcessMTL", "GradVac"}
SEEDED = {"Random", "PCGrad", "GradVac", "GradDrop"}


def build(name: str, **extra):
    return default_instance(exported(aggregators)[name], num_tasks=K, **extra)


def jac(seed: int, k: int = K, d: int = D) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


@contextmanager
def missing(agg, present: list[int] = P, k: int = K) -> Iterator[None]:
    """What the optimizer does around a call while some task is missing."""
    agg.present = torch.tensor(present, dtype=torch.int64)
    agg.all_tasks = k
    try:
        yield
    finally:
        agg.present = None
        agg.all_tasks = None


def call(agg, kind: str, j: torch.Tensor) -> torch.Tensor:
    return agg(j) if kind == "forward" else getattr(agg, kind)(j)


def kinds(name: str) -> list[str]:
    cls = exported(aggregators)[name]
    weighted = issubclass(cls, aggregators.WeightedAggregator)
    return ["forward", "transform"] + (["weights"] if weighted else [])


def copy_generator(agg) -> torch.Generator:
    g = torch.Generator()
    g.set_state(agg.generator.get_state())
    return g


def restricted_orders(keys: torch.Tensor, present: list[int]) -> dict[int, list[int]]:
    """Task i's visiting order among the present tasks: the others sorted by i's keys."""
    return {i: sorted((j for j in present if j != i), key=lambda j: float(keys[i, j])) for i in P}


def test_every_public_aggregator_supports_missing_tasks():
    assert set(NAMES) == {
        "AlignedMTL", "CAGrad", "ConFIG", "DualProj", "ExcessMTL", "FairGrad", "GradDrop",
        "GradVac", "IMTLG", "Mean", "MGDA", "MoCo", "NashMTL", "PCGrad", "Random", "SDMGrad",
        "Sum", "UPGrad",
    }  # fmt: skip
    for name in NAMES:
        agg = build(name)
        assert agg.supports_missing and agg.present is None and agg.all_tasks is None


# ---------------------------------------------------------------- 1. the m-row definition


@pytest.mark.parametrize("present", [P, [1, 2], [3]], ids=str)
@pytest.mark.parametrize("name", [n for n in NAMES if n not in DRAWS_PER_TASK])
def test_first_call_is_the_aggregator_on_the_present_rows(name, present):
    """Fresh state: with tasks missing the result is a fresh instance's on the m rows (for
    GradDrop the draws are one per column, so the same seed gives the same masks)."""
    j = jac(0)
    m = len(present)
    for kind in kinds(name):
        agg, ref = build(name), build(name)
        with missing(agg, present):
            out = call(agg, kind, j[present])
        expected = call(ref, kind, j[present])
        assert agg.present is None and agg.all_tasks is None
        assert out.shape == expected.shape == {"forward": (D,), "transform": (m, D)}.get(kind, (m,))
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_mean_divides_by_m_and_sum_sums_the_present_rows():
    j = jac(1)
    for name, expected in (("Mean", j[P].mean(dim=0)), ("Sum", j[P].sum(dim=0))):
        agg = build(name)
        with missing(agg):
            torch.testing.assert_close(agg(j[P]), expected, rtol=0, atol=0)
            torch.testing.assert_close(
                agg.weights(j[P]).sum(), torch.tensor(3.0 if name == "Sum" else 1.0, dtype=F64)
            )


@pytest.mark.parametrize(
    ("full", "restricted"),
    [
        (UPGrad([0.1, 0.2, 0.3, 0.4]), UPGrad([0.1, 0.3, 0.4])),
        (DualProj([0.1, 0.2, 0.3, 0.4]), DualProj([0.1, 0.3, 0.4])),
        (ConFIG([1.0, 2.0, 3.0, 4.0]), ConFIG([1.0, 3.0, 4.0])),
        (GradDrop([0.0, 0.5, 0.25, 1.0], seed=3), GradDrop([0.0, 0.25, 1.0], seed=3)),
    ],
    ids=["UPGrad", "DualProj", "ConFIG", "GradDrop"],
)
def test_per_task_settings_are_read_at_the_present_tasks(full, restricted):
    j = jac(2)
    with missing(full):
        out = full.transform(j[P])
    torch.testing.assert_close(out, restricted.transform(j[P]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="4 tasks"):  # K entries are needed, not m
        with missing(restricted):
            restricted.transform(j[P])


@pytest.mark.parametrize("agg_cls", [aggregators.MGDA, MoCo])
def test_loss_normalisation_takes_the_present_losses(agg_cls):
    j, losses = jac(3), torch.tensor([0.5, 2.0, 1.5, 3.0], dtype=F64)
    for given in (losses, losses[P]):  # K values read at P, or the m values themselves
        agg, ref = agg_cls(normalization="loss"), agg_cls(normalization="loss")
        agg.set_losses(given)
        ref.set_losses(losses[P])
        with missing(agg):
            out = agg(j[P])
        torch.testing.assert_close(out, ref(j[P]), rtol=0, atol=0)


# ---------------------------------------------------------------- 2. state: freeze, re-index


def warm(agg, calls: int = 2) -> None:
    for seed in range(10, 10 + calls):
        agg(jac(seed))


def reference_state(name: str, state: dict) -> dict:
    """The state of an m-task instance: the present tasks' entries of ``state``, with weights
    that live on a simplex (or sum to K) rescaled to the m-task convention."""
    if name == "NashMTL":
        return {"alpha": state["alpha"][P], "step": state["step"]}
    if name == "FairGrad":
        return {"w": state["w"][P]}
    if name == "SDMGrad":
        return {"w": state["w"][P] / state["w"][P].sum()}
    if name == "MoCo":
        lam = state["lambda"][P]
        return {"y": state["y"][P], "lambda": lam / lam.sum(), "step": state["step"]}
    assert name == "ExcessMTL"
    w = state["w"][P]
    return {"sq_sum": state["sq_sum"][P], "initial": state["initial"][P], "w": w * 3 / w.sum()}


#: the per-task entries of each state (dimension 0 indexes the tasks), and how the present
#: entries of the K-task state relate to the m-task reference's state after the call
PER_TASK = {
    "NashMTL": ["alpha"],
    "FairGrad": ["w"],
    "SDMGrad": ["w"],
    "MoCo": ["y", "lambda"],
    "ExcessMTL": ["sq_sum", "initial", "w"],
}


@pytest.mark.parametrize("name", sorted(PER_TASK))
def test_missing_entries_frozen_present_entries_move_as_an_m_task_instance(name):
    agg = build(name)
    warm(agg)
    before = agg.state_dict()
    ref = build(name)
    ref.load_state_dict(reference_state(name, before))
    j = jac(4)
    with missing(agg):
        out = agg(j[P])
    expected = ref(j[P])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    after, ref_after = agg.state_dict(), ref.state_dict()
    for key in PER_TASK[name]:
        assert torch.equal(after[key][MISSING], before[key][MISSING]), key  # bit-identical
        present = after[key][P]
        if name in ("SDMGrad", "MoCo") and key in ("w", "lambda"):  # back to their former total
            want = before[key][P].sum() * ref_after[key]
        elif name == "ExcessMTL" and key == "w":
            want = ref_after[key] * (before[key][P].sum() / 3)
        else:
            want = ref_after[key]
        torch.testing.assert_close(present, want, rtol=0, atol=0, msg=key)
        if key != "initial":  # ExcessMTL's references are kept once set
            assert not torch.equal(present, before[key][P]), key  # the present entries moved
    if name in ("SDMGrad", "MoCo"):  # the K weights stay on the simplex
        key = "w" if name == "SDMGrad" else "lambda"
        torch.testing.assert_close(after[key].sum(), torch.tensor(1.0, dtype=F64))
    if name == "ExcessMTL":
        torch.testing.assert_close(after["w"].sum(), torch.tensor(float(K), dtype=F64))


def test_moco_counts_the_steps_of_each_task():
    agg = MoCo()
    warm(agg)
    assert "task_steps" not in agg.state_dict()  # unchanged format while no task was missing
    with missing(agg):
        agg(jac(4)[P])
    state = agg.state_dict()
    assert state["step"] == 3 and state["task_steps"].tolist() == [3, 2, 3, 3]
    # next all-present call: task 1 takes its third tracking step, the others their fourth
    j = jac(5)
    y = state["y"]
    beta = torch.tensor([0.5 / n**0.5 for n in (4, 3, 4, 4)], dtype=F64)[:, None]
    agg(j)
    torch.testing.assert_close(agg.state_dict()["y"], y - beta * (y - j), rtol=1e-15, atol=0)
    assert agg.state_dict()["task_steps"].tolist() == [4, 3, 4, 4]


def plain_gradvac(j, targets, orders, beta):
    """GradVac on explicit vectors (the paper's Algorithm 1) for the rows ``P`` of ``j``."""
    targets = targets.clone()
    rows = []
    for i in P:
        g = j[i].clone()
        for k in orders[i]:
            gk = j[k]
            cos = float(g @ gk / (g.norm() * gk.norm()))
            t = float(targets[i, k])
            if cos < t:
                g = (
                    g
                    + g.norm()
                    * (t * (1 - cos**2) ** 0.5 - cos * (1 - t**2) ** 0.5)
                    / (gk.norm() * (1 - t**2) ** 0.5)
                    * gk
                )
            targets[i, k] = (1 - beta) * t + beta * cos
        rows.append(g)
    return torch.stack(rows), targets


def test_gradvac_moves_the_targets_of_present_pairs_only():
    agg = GradVac(seed=5)
    warm(agg)
    # high targets, so that nearly every visit corrects and the visiting order matters
    state = agg.state_dict()
    state["targets"] = 0.3 + 0.4 * torch.rand(K, K, generator=torch.Generator().manual_seed(1))
    agg.load_state_dict(state)
    before = agg.targets.clone()
    keys = torch.rand(K, K, generator=copy_generator(agg), dtype=torch.float32)
    j = jac(4)
    with missing(agg):
        rows = agg.transform(j[P])
    want_rows, want_targets = plain_gradvac(j, before, restricted_orders(keys, P), agg.beta)
    torch.testing.assert_close(rows, want_rows, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(agg.targets, want_targets, rtol=1e-12, atol=1e-14)
    reversed_orders = {i: o[::-1] for i, o in restricted_orders(keys, P).items()}
    assert not torch.allclose(rows, plain_gradvac(j, before, reversed_orders, agg.beta)[0])
    assert torch.equal(agg.targets[1], before[1]) and torch.equal(agg.targets[:, 1], before[:, 1])


def test_state_is_sized_by_k_when_the_first_call_misses_a_task():
    j = jac(6)
    shapes = {
        "NashMTL": ("alpha", (K,)),
        "FairGrad": ("w", (K,)),
        "SDMGrad": ("w", (K,)),
        "MoCo": ("y", (K, D)),
        "ExcessMTL": ("sq_sum", (K, D)),
        "GradVac": ("targets", (K, K)),
    }
    for name, (key, shape) in shapes.items():
        agg = build(name)
        with missing(agg):
            agg(j[P])
        assert tuple(agg.state_dict()[key].shape) == shape, name
        agg(j)  # an all-present call follows on the K-task state
        assert tuple(agg.state_dict()[key].shape) == shape, name
    moco = MoCo()
    with missing(moco):
        moco(j[P])
    torch.testing.assert_close(moco.state_dict()["lambda"][1], torch.tensor(0.25, dtype=F64))
    assert moco.state_dict()["y"][1].eq(0).all()


# ---------------------------------------------------------------- 3. random draws


@pytest.mark.parametrize("present", [P, [3]], ids=str)
@pytest.mark.parametrize("name", sorted(SEEDED))
def test_generator_advances_as_in_an_all_present_call(name, present):
    j = jac(7)
    agg, twin = build(name, seed=11), build(name, seed=11)
    for kind in kinds(name):
        with missing(agg, present):
            call(agg, kind, j[present])
        call(twin, kind, j)
        assert torch.equal(agg.generator.get_state(), twin.generator.get_state()), kind


def test_random_weights_are_the_softmax_of_the_present_draws():
    agg = Random(seed=4)
    logits = torch.randn(K, generator=torch.Generator().manual_seed(4), dtype=F64)
    with missing(agg):
        w = agg.weights(jac(8)[P])
    torch.testing.assert_close(w, torch.softmax(logits[P], dim=0), rtol=0, atol=0)


def plain_pcgrad(j, orders):
    rows = []
    for i in P:
        g = j[i].clone()
        for k in orders[i]:
            dot = g @ j[k]
            if dot < 0:
                g = g - dot / (j[k] @ j[k]) * j[k]
        rows.append(g)
    return torch.stack(rows)


def test_pcgrad_visits_the_present_tasks_in_their_order_among_all_k():
    agg = PCGrad(seed=9)
    j = torch.tensor(  # conflicting rows, so that the order matters
        [[1.0, 0.2, -0.5], [0.3, -1.0, 0.4], [-0.8, 0.5, 0.6], [0.1, 0.9, -1.0]], dtype=F64
    )
    keys = torch.rand(K, K, generator=copy_generator(agg), dtype=torch.float32)
    orders = restricted_orders(keys, P)
    with missing(agg):
        rows = agg.transform(j[P])
    torch.testing.assert_close(rows, plain_pcgrad(j, orders), rtol=1e-14, atol=1e-15)
    # the order matters here: another order among the present tasks gives other rows
    reversed_orders = {i: o[::-1] for i, o in orders.items()}
    assert not torch.allclose(rows, plain_pcgrad(j, reversed_orders))


# ---------------------------------------------------------------- 4. checkpoints


@pytest.mark.parametrize("name", sorted(STATEFUL | SEEDED))
def test_state_dict_round_trip_after_a_call_with_a_missing_task(name):
    agg = build(name)
    warm(agg, 1)
    with missing(agg):
        agg(jac(9)[P])
    resumed = build(name, seed=123)  # another seed: the generator state must come back too
    resumed.load_state_dict(agg.state_dict())
    for j_next, present in ((jac(10)[[0, 1]], [0, 1]), (jac(11), None)):
        if present is None:
            out, again = agg(j_next), resumed(j_next)
        else:
            with missing(agg, present), missing(resumed, present):
                out, again = agg(j_next), resumed(j_next)
        torch.testing.assert_close(out, again, rtol=0, atol=0)


# ---------------------------------------------------------------- misuse


@pytest.mark.parametrize("present", [[2, 0, 3], [0, 2, 4], [0, 2]], ids=["order", "range", "len"])
def test_a_malformed_present_set_is_refused_before_anything_changes(present):
    agg = NashMTL()
    warm(agg)
    before = agg.state_dict()
    with pytest.raises(ValueError, match="present"):
        with missing(agg, present):
            agg(jac(12)[P])
    after = agg.state_dict()
    assert torch.equal(after["alpha"], before["alpha"]) and after["step"] == before["step"]
