"""Two processes (gloo, CPU): ranks agree, and equal one process on the whole batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from _ddp_worker import configs, train, worker

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    names = list(configs())
    with socket.socket() as s:  # a free port for the TCP store on the loopback interface
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init = f"tcp://127.0.0.1:{port}"
    mp.spawn(worker, args=(2, init, str(tmp), names), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


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
