"""Two processes (gloo, CPU): ranks agree, and equal one process on the whole batch."""

from __future__ import annotations

import pytest
import torch
from _ddp_worker import configs, train, worker
from helpers import spawn_two_ranks

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    return spawn_two_ranks(worker, tmp, list(configs()))


@pytest.mark.parametrize("name", [*configs(), "adatask-ddp-wrapped"])
def test_parameters_are_identical_on_both_ranks(ranks, name):
    for p0, p1 in zip(ranks[0][name], ranks[1][name]):
        assert torch.equal(p0, p1), name


@pytest.mark.parametrize("name", [n for n, (_, exact) in configs().items() if exact])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(ranks, name):
    single = train(name)
    for p, q in zip(ranks[0][name], single):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(p, q) for p, q in zip(train(name, 0, 2), single)), (
        "half a batch in one process must differ, or the comparison proves nothing"
    )


def test_ddp_wrapped_model_with_no_sync_matches_the_plain_run(ranks):
    for p, q in zip(ranks[0]["adatask-ddp-wrapped"], ranks[0]["adatask"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
