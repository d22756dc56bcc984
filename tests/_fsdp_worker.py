"""Training runs used by ``test_fsdp.py``: one process on the whole batch, or a rank of a model
sharded with FSDP2 (``fully_shard``) holding its half of every batch."""

from __future__ import annotations

import os

import torch
from conftest import batches, make_model
from helpers import run_rank
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import mtl_optim
from mtl_optim import aggregators, weighting

K = 3
STEPS = 5
WIDTH, D_OUT = 7, 3  # 7 rows split 4 + 3 and 3 rows split 2 + 1: uneven shards on 2 ranks


def configs():
    """name -> optimizer factory; each must equal one process on the whole batch."""

    def mtl(agg=None, wgt=None, base=torch.optim.SGD, **kw):
        kw.setdefault("lr", 0.05 if base is torch.optim.SGD else 1e-2)
        return lambda p: mtl_optim.MTLOptimizer(p, base=base, aggregator=agg, weighting=wgt, **kw)

    return {
        "adatask": lambda p: mtl_optim.AdaTask(p, base=torch.optim.Adam, lr=1e-2),
        "upgrad": mtl(aggregators.UPGrad()),
        "mgda": mtl(aggregators.MGDA()),
        "nash": mtl(aggregators.NashMTL()),  # also clips the shared gradient (max_norm=1)
        "pcgrad": mtl(aggregators.PCGrad(seed=0)),
        "graddrop": mtl(aggregators.GradDrop(seed=0)),
        "cagrad": mtl(aggregators.CAGrad()),
        "alignedmtl": mtl(aggregators.AlignedMTL()),
        "config": mtl(aggregators.ConFIG()),
        "fairgrad": mtl(aggregators.FairGrad()),  # clips too (max_norm=1)
        "gradvac": mtl(aggregators.GradVac(seed=0)),
        "uncertainty": mtl(
            wgt=weighting.Uncertainty(K, dtype=torch.float64), base=torch.optim.Adam
        ),
        "uncertainty+mgda": mtl(
            aggregators.MGDA(), weighting.Uncertainty(K, dtype=torch.float64), torch.optim.Adam
        ),
        "adatask+upgrad": lambda p: mtl_optim.AdaTask(
            p, base=torch.optim.Adam, lr=1e-2, aggregator=aggregators.UPGrad()
        ),
        "adatask+pcgrad": lambda p: mtl_optim.AdaTask(
            p, base=torch.optim.Adam, lr=1e-2, aggregator=aggregators.PCGrad(seed=0)
        ),
    }


def shard(model: torch.nn.Module, **kw) -> torch.nn.Module:
    """FSDP2 on the trunk, on each head and on the root."""
    fully_shard(model.trunk, reshard_after_forward=False, **kw)
    for head in model.heads:
        fully_shard(head, reshard_after_forward=False, **kw)
    fully_shard(model, reshard_after_forward=False, **kw)
    return model


def full(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every parameter as one whole tensor (all-gathered from the shards)."""
    out = []
    for p in model.parameters():
        p = p.detach()
        out.append((p.full_tensor() if hasattr(p, "full_tensor") else p).clone())
    return out


def part(x, ys, rank: int, world: int):
    n = x.shape[0] // world
    rows = slice(rank * n, (rank + 1) * n)
    return x[rows], [y[rows] for y in ys]


def train(
    name: str,
    rank: int = 0,
    world: int = 1,
    sharded: bool = False,
    steps: int = STEPS,
    keep: bool = False,
) -> list[torch.Tensor]:
    """Train config ``name`` for ``steps`` steps on this rank's share of every batch.

    ``keep``: the sharded model keeps its unsharded parameters through the K backward passes
    (``set_reshard_after_backward(False)``) and reshards once after ``opt.backward``."""
    model = make_model(K, seed=0, width=WIDTH, d_out=D_OUT)
    if sharded:
        shard(model)
    opt = configs()[name](model.parameters())
    for x, ys in batches(K, steps, seed=1, d_out=D_OUT):
        x, ys = part(x, ys, rank, world)
        opt.zero_grad()
        if keep:
            model.set_reshard_after_backward(False)
        opt.backward(model.losses(x, ys))
        if keep:
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        opt.step()
    return full(model)


def refusals() -> dict[str, tuple[str, bool]]:
    """Methods that cannot shard: the error message, and whether the parameters and the
    optimizer state stayed untouched."""
    cases = {
        "moco": dict(aggregator=aggregators.MoCo()),
        "gradnorm": dict(weighting=weighting.GradNorm(K, dtype=torch.float64)),
        "gramian-route": dict(aggregator=aggregators.MGDA(), route="gramian"),
        "features": dict(aggregator=aggregators.MGDA()),
        "plain-heads": dict(aggregator=aggregators.MGDA()),
    }
    out = {}
    x, ys = batches(K, 1, seed=1, d_out=D_OUT)[0]
    for name, kw in cases.items():
        model = make_model(K, seed=0, width=WIDTH, d_out=D_OUT)
        if name == "plain-heads":  # only the trunk sharded: the heads stay plain tensors
            fully_shard(model.trunk, reshard_after_forward=False)
        else:
            shard(model)
        opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.SGD, lr=0.1, **kw)
        before = full(model)
        try:
            if name == "features":
                z = model.trunk(x)
                losses = [((h(z) - y) ** 2).mean() for h, y in zip(model.heads, ys)]
                opt.backward(losses, features=z)
            else:
                opt.backward(model.losses(x, ys))
            message = ""
        except ValueError as error:
            message = str(error)
        untouched = (
            all(torch.equal(a, b) for a, b in zip(before, full(model)))
            and all(p.grad is None for p in model.parameters())
            and opt.num_tasks is None
        )
        out[name] = (message, untouched)
    return out


def resume(name: str, rank: int, world: int, path: str) -> dict[str, object]:
    """Train 3 steps, save with torch.distributed.checkpoint, train 2 more; then a fresh model
    and optimizer load the checkpoint and train the same 2 steps."""
    import torch.distributed.checkpoint as dcp

    from mtl_optim.fsdp import optimizer_template

    data = batches(K, 5, seed=3, d_out=D_OUT)

    def run(model, opt, chunk):
        for x, ys in chunk:
            x, ys = part(x, ys, rank, world)
            opt.zero_grad()
            opt.backward(model.losses(x, ys))
            opt.step()

    def local_state(opt):
        flat = {}

        def walk(prefix, obj):
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}", v)
            elif isinstance(obj, (list, tuple)):
                for i, v in enumerate(obj):
                    walk(f"{prefix}.{i}", v)
            elif isinstance(obj, torch.Tensor):
                flat[prefix] = (obj.to_local() if hasattr(obj, "to_local") else obj).clone()

        walk("", opt.state_dict())
        return flat

    model = shard(make_model(K, seed=0, width=WIDTH, d_out=D_OUT))
    opt = configs()[name](model.parameters())
    run(model, opt, data[:3])
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)
    saved = local_state(opt)
    run(model, opt, data[3:])
    straight = full(model)

    model = shard(make_model(K, seed=5, width=WIDTH, d_out=D_OUT))  # other initial values
    opt = configs()[name](model.parameters())
    state = {"model": model.state_dict(), "optim": optimizer_template(opt, path)}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    loaded = local_state(opt)
    run(model, opt, data[3:])
    return {
        "params": (straight, full(model)),
        "state_keys": (sorted(saved), sorted(loaded)),
        "state_equal": all(k in loaded and torch.equal(v, loaded[k]) for k, v in saved.items()),
    }


def resume_on_one_rank(name: str, rank: int, world: int, path: str) -> list | None:
    """Rank 0 alone (a one-rank mesh) loads the two-rank checkpoint :func:`resume` wrote after
    3 steps and trains the last 2 steps on the whole batch; ``None`` on the other ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import DeviceMesh

    from mtl_optim.fsdp import optimizer_template

    alone = torch.distributed.new_group([0])
    if rank != 0:
        return None
    mesh = DeviceMesh.from_group(alone, "cpu")
    model = shard(make_model(K, seed=5, width=WIDTH, d_out=D_OUT), mesh=mesh)
    opt = configs()[name](model.parameters())
    opt.process_group = alone
    state = {"model": model.state_dict(), "optim": optimizer_template(opt, path)}
    dcp.load(state, checkpoint_id=path, process_group=alone)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])
    for x, ys in batches(K, 5, seed=3, d_out=D_OUT)[3:]:
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()
    return full(model)


def mixed_precision(rank: int, world: int) -> dict[str, object]:
    """AdaTask + UPGrad under MixedPrecisionPolicy(bf16 parameters, fp32 reduce), float32
    master parameters: the per-task gradients of the first step and the parameters after 3
    steps, with the dtypes the optimizer saw."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(
        make_model(K, seed=0, width=WIDTH, d_out=D_OUT, dtype=torch.float32), mp_policy=policy
    )
    opt = mtl_optim.AdaTask(
        model.parameters(), base=torch.optim.Adam, lr=1e-2, aggregator=aggregators.UPGrad()
    )
    seen = {}
    for step, (x, ys) in enumerate(batches(K, 3, seed=1, d_out=D_OUT, dtype=torch.float32)):
        x, ys = part(x, ys, rank, world)
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        if step == 0:
            seen["jacobian_dtype"] = opt._engine.jacobian.dtype
            seen["grad_dtypes"] = {p.grad.dtype for p in opt.shared_params}
            seen["grad_type"] = type(opt.shared_params[0].grad).__name__
            seen["grads"] = [p.grad.full_tensor() for p in opt.shared_params]
        opt.step()
    seen["params"] = full(model)
    seen["param_dtypes"] = {p.dtype for p in model.parameters()}
    return seen


def mixed_precision_reference() -> list[torch.Tensor]:
    """The shared gradients of :func:`mixed_precision`'s first step in one float32 process."""
    model = make_model(K, seed=0, width=WIDTH, d_out=D_OUT, dtype=torch.float32)
    opt = mtl_optim.AdaTask(
        model.parameters(), base=torch.optim.Adam, lr=1e-2, aggregator=aggregators.UPGrad()
    )
    x, ys = batches(K, 1, seed=1, d_out=D_OUT, dtype=torch.float32)[0]
    opt.backward(model.losses(x, ys))
    return [p.grad.clone() for p in opt.shared_params]


def worker(rank: int, world: int, init_method: str, out_dir: str, names: list[str]) -> None:
    def collect() -> dict:
        results: dict[str, object] = {name: train(name, rank, world, True) for name in names}
        results["keep"] = train("adatask+upgrad", rank, world, True, keep=True)
        results["refusals"] = refusals()
        results["resume"] = {
            name: resume(name, rank, world, os.path.join(out_dir, f"ckpt-{name}"))
            for name in ("adatask+pcgrad", "uncertainty+mgda", "nash")
        }
        results["mixed"] = mixed_precision(rank, world)
        results["one-rank"] = resume_on_one_rank(
            "adatask+pcgrad", rank, world, os.path.join(out_dir, "ckpt-adatask+pcgrad")
        )
        return results

    run_rank(rank, world, init_method, out_dir, collect)
