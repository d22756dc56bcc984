"""FSDP2 (``fully_shard``) on two gloo processes, float64: every method equals one process on
the whole batch, checkpoints resume bit-identically, and methods that cannot shard refuse."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

from _fsdp_worker import configs, mixed_precision_reference, train, worker  # noqa: E402
from helpers import spawn_two_ranks  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    return spawn_two_ranks(worker, tmp, list(configs()))


@pytest.mark.parametrize("name", list(configs()))
def test_two_sharded_ranks_equal_one_process_on_the_whole_batch(ranks, name):
    single = train(name)
    for r in range(2):
        for p, q in zip(ranks[r][name], single):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    half = train(name, 0, 2)
    assert any(not torch.equal(p, q) for p, q in zip(half, single)), (
        "half a batch in one process must differ, or the comparison proves nothing"
    )


def test_unsharded_parameters_kept_through_the_k_passes_give_the_same_update(ranks):
    single = train("adatask+upgrad")
    for r in range(2):
        for p, q in zip(ranks[r]["keep"], single):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["adatask+pcgrad", "uncertainty+mgda", "nash"])
def test_dcp_checkpoint_resumes_bit_identically(ranks, name):
    for r in range(2):
        result = ranks[r]["resume"][name]
        straight, resumed = result["params"]
        assert all(torch.equal(p, q) for p, q in zip(straight, resumed)), name
        saved, loaded = result["state_keys"]
        assert saved == loaded
        assert result["state_equal"]


def test_dcp_checkpoint_of_two_ranks_resumes_on_one(ranks):
    straight, _ = ranks[0]["resume"]["adatask+pcgrad"]["params"]
    for p, q in zip(straight, ranks[0]["one-rank"]):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("moco", "MoCo keeps a (K, d) state"),
        ("gradnorm", "reads the per-task gradients"),
        ("gramian-route", "route='gramian' is not supported"),
        ("features", "features= is not supported"),
        ("plain-heads", "that the losses reach are plain tensors, not sharded by fully_shard"),
    ],
)
def test_methods_that_cannot_shard_refuse_at_the_first_backward(ranks, name, words):
    for r in range(2):
        message, untouched = ranks[r]["refusals"][name]
        assert words in message, message
        assert untouched


def test_mixed_precision_policy_bf16_parameters_fp32_reduce(ranks):
    mixed = [ranks[r]["mixed"] for r in range(2)]
    assert mixed[0]["jacobian_dtype"] == torch.float32
    assert mixed[0]["grad_dtypes"] == {torch.float32}
    assert mixed[0]["grad_type"] == "DTensor"
    assert mixed[0]["param_dtypes"] == {torch.float32}
    for p, q in zip(*(m["params"] for m in mixed)):
        assert torch.equal(p, q)
    # bf16 forward and backward: the shared gradient of the first step is the float32 one up to
    # bf16 rounding (measured ~2 units of bf16's eps / 2; allowed: 4 eps)
    eps = torch.finfo(torch.bfloat16).eps
    for p, q in zip(mixed[0]["grads"], mixed_precision_reference()):
        assert (p - q).norm() <= 4 * eps * q.norm()
        assert not torch.equal(p, q)  # bf16 really ran
