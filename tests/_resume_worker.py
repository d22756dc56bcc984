"""Train every method, checkpoint to disk, resume in a fresh process (``test_resume.py``).

python _resume_worker.py first  <dir>   # N steps, then torch.save(model + optimizer)
python _resume_worker.py second <dir>   # fresh objects, load, M more steps, save params
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import batches, make_model

import mtl_optim
from benchmarks.methods import default_instance, exported
from mtl_optim import aggregators, weighting

K = 3
N, M = 6, 6
EPOCH = 3


def _build(cls):
    return default_instance(cls, K, steps_per_epoch=EPOCH, dtype=torch.float64)


def methods():
    """name -> optimizer factory, for every exported aggregator and weighting, and AdaTask."""
    out = {}
    for name, cls in exported(aggregators).items():
        out[f"agg-{name}"] = lambda p, cls=cls: mtl_optim.MTLOptimizer(
            p, base=torch.optim.SGD, lr=0.05, momentum=0.9, aggregator=_build(cls)
        )
    for name, cls in exported(weighting).items():
        out[f"w-{name}"] = lambda p, cls=cls: mtl_optim.MTLOptimizer(
            p, base=torch.optim.Adam, lr=1e-2, weighting=_build(cls)
        )
    for base in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        out[f"adatask-{base.__name__}"] = lambda p, base=base: mtl_optim.AdaTask(
            p, base=base, lr=1e-2
        )
    out["adatask-pcgrad-igb"] = lambda p: mtl_optim.AdaTask(
        p, lr=1e-2, aggregator=aggregators.PCGrad(seed=0), weighting=weighting.IGB()
    )
    out["nash-gramian-route"] = lambda p: mtl_optim.MTLOptimizer(
        p, base=torch.optim.SGD, lr=0.05, aggregator=aggregators.NashMTL(), route="gramian"
    )
    return out


def run(factory, model, opt, steps):
    data = batches(K, N + M, seed=1)
    for s in steps:
        x, ys = data[s]
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()
        with torch.no_grad():
            opt.update_weighting(model.losses(x, ys))  # FAMO's weight step; a no-op elsewhere
        if (s + 1) % EPOCH == 0:
            opt.end_epoch()


def uninterrupted(name):
    model = make_model(K, seed=0)
    opt = methods()[name](model.parameters())
    run(None, model, opt, range(N + M))
    return [p.detach().clone() for p in model.parameters()]


def main(phase: str, out: Path) -> None:
    torch.set_num_threads(1)
    for name, factory in methods().items():
        if phase == "first":
            model = make_model(K, seed=0)
            opt = factory(model.parameters())
            run(factory, model, opt, range(N))
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / f"{name}.pt")
        else:
            model = make_model(K, seed=123)  # a different init: everything must come from disk
            opt = factory(model.parameters())
            ckpt = torch.load(out / f"{name}.pt", weights_only=False)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            run(factory, model, opt, range(N, N + M))
            torch.save([p.detach() for p in model.parameters()], out / f"{name}.final.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
