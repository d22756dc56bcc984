"""The partial-labels benchmark (``benchmarks/partial_labels.py``) on a tiny MultiDigits slice:
the label draw and budgets, its runs against a plain-torch loop, and the quick path's table."""

from __future__ import annotations

import math
import re

import pytest
import torch

from benchmarks.data import multidigits
from benchmarks.methods import METHODS
from benchmarks.metrics import task_loss
from benchmarks.models import build_model
from benchmarks.partial_labels import (
    MODES,
    VARIANTS,
    eval_losses,
    label_mask,
    main,
    run,
    schedule,
)


@pytest.fixture(scope="module")
def tiny():
    return multidigits(0).head(256, 200)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_label_mask_labels_one_random_half_of_the_tasks(k):
    mask = label_mask(4000, k, torch.Generator().manual_seed(1))
    sizes = mask.sum(1)
    assert set(sizes.tolist()) == ({k // 2, k // 2 + 1} if k % 2 else {k // 2})
    assert sizes.min() >= 1
    # half of the labels in expectation, every task labelled in about half of the batches
    assert abs(sizes.double().mean().item() - k / 2) < 0.05
    assert ((mask.double().mean(0) - 0.5).abs() < 0.05).all()
    again = label_mask(4000, k, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)


def test_schedules_share_batches_and_keep_the_label_budget():
    n, k, epochs, bs = 300, 3, 3, 64
    full, partial, zero, subset, short = (
        schedule(n, k, mode, 7, epochs, bs)
        for mode in ("full", "partial", "zero", "subset", "subset-epochs")
    )

    def ids(s):
        return [idx.tolist() for idx, _ in s.steps]

    assert ids(full) == ids(partial) == ids(zero)
    assert [m.tolist() for _, m in partial.steps if m is not None] == [
        m.tolist() for _, m in zero.steps if m is not None
    ]
    steps = epochs * math.ceil(n / bs)
    batches = [idx for idx, _ in full.steps if len(idx)]
    assert len(batches) == steps and full.labels == n * k
    # a sample keeps the same labelled tasks in every epoch: no removed label is ever seen
    seen: dict[int, list[bool]] = {}
    for idx, m in partial.steps:
        for i in idx.tolist():
            assert seen.setdefault(i, m.tolist()) == m.tolist()
    assert len(seen) == n
    assert partial.labels == sum(sum(m) for m in seen.values())
    # the subset: ceil(kept / K) samples with every label, one pass = each sample once
    n_keep = math.ceil(partial.labels / k)
    assert subset.labels == n_keep * k and 0 <= subset.labels - partial.labels < k
    passes = [[]]
    for idx, m in subset.steps:
        assert m is None
        passes[-1] += idx.tolist() if len(idx) else []
        if not len(idx):
            passes.append([])
    kept = set(passes[0])
    assert len(passes[0]) == len(kept) == n_keep
    assert all(set(p) <= kept and len(p) == len(set(p)) for p in passes)
    assert sum(1 for idx, _ in subset.steps if len(idx)) == steps
    assert sum(1 for idx, _ in short.steps if len(idx)) == epochs * math.ceil(n_keep / bs)
    with pytest.raises(ValueError, match="mode must be one of"):
        schedule(n, k, "half", 7, epochs, bs)


@pytest.mark.parametrize("mode", ["partial", "zero", "full"])
def test_equal_weighting_runs_equal_plain_torch_adam_on_the_labelled_losses(tiny, mode):
    """Equal weighting with ``None`` = torch's Adam on the sum of the labelled tasks' losses
    (an unlabelled head keeps grad None and does not move); zero-fill adds ``0 * loss``."""
    epochs, bs, lr = 2, 64, 1e-2
    got = run(tiny, mode, "equal", 0, epochs, bs, lr)
    torch.manual_seed(0)
    model = build_model(tiny)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for idx, labelled in schedule(len(tiny.train), 3, mode, 0, epochs, bs).steps:
        if not len(idx):
            continue
        out = model(tiny.train.x[idx])
        total = 0
        for i, (t, o, y) in enumerate(zip(tiny.tasks, out, tiny.train.ys)):
            loss = task_loss(t, o, y[idx])
            if labelled is None or labelled[i]:
                total = total + loss
            elif mode == "zero":
                total = total + 0 * loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
    torch.testing.assert_close(
        torch.tensor(got.losses), torch.tensor(eval_losses(model, tiny.test, tiny)), rtol=1e-4,
        atol=1e-5,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["equal", "adatask", "mgda", "uw"])
def test_partial_training_lowers_every_task_loss(method):
    """Half of the labels, the benchmark's lr, 24 steps: every task's held-out loss falls
    (by about 0.08-0.1 nats here) below that of the same untrained model."""
    data = multidigits(0).head(768, 200)
    torch.manual_seed(0)
    untrained = eval_losses(build_model(data), data.test, data)
    got = run(data, "partial", method, 0, epochs=2, batch_size=64, lr=1e-3)
    assert got.labels < len(data.train) * 3 and got.steps == 24
    assert len(got.losses) == 3
    assert all(a < b - 0.02 for a, b in zip(got.losses, untrained)), (got.losses, untrained)


def test_quick_path_writes_a_table_with_every_row_and_finite_numbers(tmp_path):
    text = main(["--quick", "--train", "192", "--eval", "100", "--out", str(tmp_path)])
    page = (tmp_path / "partial_labels-quick.md").read_text()
    assert page == text + "\n"
    rows = [line for line in page.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "left acc %" in header and "Δm vs full, same method %" in header
    assert len(body) == len(VARIANTS)
    for (mode, method), row in zip(VARIANTS, body):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:2] == [MODES[mode], METHODS[method].label]
        numbers = [float(v) for c in cells[2:] for v in re.findall(r"-?\d+(?:\.\d+)?|nan|inf", c)]
        assert len(numbers) == 2 * 5 + 3  # 3 metrics, 2 Δm (mean ± std), labels, steps, s
        assert all(math.isfinite(v) for v in numbers)
    full_equal = body[0].split("|")
    assert full_equal[6].strip() == "0.00 ± 0.00"  # Δm of the reference against itself
