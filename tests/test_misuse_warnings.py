"""Misuse made loud, once: epoch-based weightings without ``opt.end_epoch()``, FAMO without
``opt.update_weighting()``; and silence in the loops that use them correctly."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from conftest import TwoTask, train_two_task, two_task_data

import mtl_optim
from mtl_optim import weighting as W

EPOCH_BASED = {
    "DWA": lambda: W.DWA(),
    "IGB": lambda: W.IGB(),
    "IGBRL": lambda: W.IGBRL(steps_per_epoch=4, seed=0),
    "GradNorm": lambda: W.GradNorm(2, initial="epoch", dtype=torch.float64),
    "STCH": lambda: W.STCH(),
    "GroupedUncertainty": lambda: W.GroupedUncertainty(num_tasks=2, n_groups=1),
    "ConstrainedUncertainty": lambda: W.ConstrainedUncertainty(2),
}


def sgd(model, weighting):
    return mtl_optim.MTLOptimizer(
        model.parameters(), base=torch.optim.SGD, lr=1e-2, weighting=weighting
    )


def run(opt, model, steps: int, *, epoch_every: int | None = None, famo: bool = True) -> None:
    """``steps`` plain steps on the two-task problem, closing an epoch every ``epoch_every``."""
    x, ys = two_task_data(nonlinear=True)
    for step in range(steps):
        losses = [((out - y) ** 2).mean() for out, y in zip(model(x), ys)]
        opt.zero_grad()
        opt.backward(losses)
        opt.step()
        if famo:
            with torch.no_grad():
                opt.update_weighting([((out - y) ** 2).mean() for out, y in zip(model(x), ys)])
        if epoch_every is not None and step % epoch_every == epoch_every - 1:
            opt.end_epoch()


def model_and_opt(weighting):
    torch.manual_seed(0)
    model = TwoTask(nonlinear=True).double()
    return model, sgd(model, weighting)


@pytest.mark.parametrize("name", list(EPOCH_BASED))
def test_epoch_based_weighting_without_end_epoch_warns_once(name):
    weighting = EPOCH_BASED[name]()
    weighting.end_epoch_warning_after = 5  # the default (10 000) is checked below
    model, opt = model_and_opt(weighting)
    with pytest.warns(UserWarning) as record:
        run(opt, model, 12)
    ours = [w for w in record if "end_epoch" in str(w.message)]
    assert len(ours) == 1  # once, not at every later step
    message = str(ours[0].message)
    assert repr(weighting) in message and "5 batches" in message
    assert "opt.end_epoch() once at the end of every epoch" in message
    assert ours[0].filename == __file__  # points at the user's loop, not into the package


@pytest.mark.parametrize("name", list(EPOCH_BASED))
def test_epoch_based_weighting_in_a_correct_loop_is_silent(name):
    weighting = EPOCH_BASED[name]()
    weighting.end_epoch_warning_after = 5
    model, opt = model_and_opt(weighting)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        run(opt, model, 24, epoch_every=4)  # 6 epochs of 4 batches


def test_default_threshold_is_10000_batches_and_none_disables():
    assert W.Weighting.end_epoch_warning_after == 10_000
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64)
    dwa = W.DWA()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(9_999):
            dwa(losses)
        assert record == []
        dwa(losses)  # the 10 000th batch of the epoch
        assert len(record) == 1 and "10000 batches" in str(record[0].message)
        dwa(losses)
        assert len(record) == 1
    quiet = W.DWA()
    quiet.end_epoch_warning_after = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10_001):
            quiet(losses)


def test_epoch_warning_count_survives_a_checkpoint():
    # the count of the open epoch is in the state: a run resumed past the threshold does not
    # warn again; one resumed before it warns when it gets there, once
    weighting = W.IGB()
    weighting.end_epoch_warning_after = 5
    model, opt = model_and_opt(weighting)
    with pytest.warns(UserWarning, match="end_epoch"):
        run(opt, model, 6)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = W.IGB()
    fresh.end_epoch_warning_after = 5
    model2, opt2 = model_and_opt(fresh)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(opt2, model2, 6)  # batches 7..12 of the same open epoch: already warned about
    early = W.IGB()
    early.end_epoch_warning_after = 5
    model3, opt3 = model_and_opt(early)
    run(opt3, model3, 3)
    state = opt3.state_dict()
    late = W.IGB()
    late.end_epoch_warning_after = 5
    model4, opt4 = model_and_opt(late)
    opt4.load_state_dict(state)
    with pytest.warns(UserWarning, match="5 batches") as record:
        run(opt4, model4, 5)  # batches 4..8: the 5th batch of the epoch warns
    assert len([w for w in record if "end_epoch" in str(w.message)]) == 1


def test_famo_without_update_weighting_warns_once_at_the_second_step():
    famo = W.FAMO(2, dtype=torch.float64)
    model, opt = model_and_opt(famo)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(opt, model, 1, famo=False)
        assert record == []  # one step alone is not (yet) a missed weight step
        run(opt, model, 1, famo=False)
        assert len(record) == 1
        run(opt, model, 5, famo=False)
        assert len(record) == 1  # once
    warning = record[0]
    assert warning.category is UserWarning and warning.filename == __file__
    message = str(warning.message)
    assert repr(famo) in message and "opt.update_weighting(losses)" in message
    # and indeed nothing moved: the logits are still 0 (uniform weights)
    assert torch.equal(famo.logits.detach(), torch.zeros(2, dtype=torch.float64))


def test_famo_in_a_correct_loop_is_silent_and_learns():
    def make_opt(model):
        return sgd(model, W.FAMO(2, dtype=torch.float64))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt, _, _ = train_two_task(make_opt, nonlinear=True, steps=20)  # calls update_weighting
    assert not torch.equal(opt.weighting.logits.detach(), torch.zeros(2, dtype=torch.float64))


def test_famo_after_a_missed_weight_step_recovers_without_a_second_warning():
    famo = W.FAMO(2, dtype=torch.float64)
    model, opt = model_and_opt(famo)
    with pytest.warns(UserWarning, match="update_weighting"):
        run(opt, model, 3, famo=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(opt, model, 5)  # the loop fixed: silent, and the weights move again
    assert not torch.equal(famo.logits.detach(), torch.zeros(2, dtype=torch.float64))
