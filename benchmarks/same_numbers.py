"""Does a change keep every method's numbers? Train every method a few steps with this checkout
and with another git revision, and compare the parameters bit for bit.

    python -m benchmarks.same_numbers --against c6b088c

Runs each revision in its own subprocess (``PYTHONPATH`` pointing at a temporary ``git
worktree`` of the revision), every exported aggregator (Jacobian and ``auto`` routes), every
exported weighting and AdaTask over four bases, in float64 and float32, with ``end_epoch`` and
``update_weighting`` called as a training loop would. Prints the configurations whose digests
differ and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

K = 3
STEPS = 6
ROOT = Path(__file__).resolve().parents[1]


class _Net(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 2) for _ in range(K))
        self.to(dtype)

    def losses(self, x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [((h(z) - y) ** 2).mean() for h, y in zip(self.heads, ys)]


def _run(make, dtype: torch.dtype) -> str:
    model = _Net(dtype)
    opt = make(model)
    g = torch.Generator().manual_seed(2)
    for step in range(STEPS):
        x = torch.randn(16, 5, generator=g, dtype=dtype)
        ys = [(i + 1) * torch.randn(16, 2, generator=g, dtype=dtype) for i in range(K)]
        opt.zero_grad()
        opt.backward(model.losses(x, ys))
        opt.step()
        if opt.weighting is not None:
            with torch.no_grad():
                opt.update_weighting(model.losses(x, ys))
        if step % 3 == 2:
            opt.end_epoch()
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().double().numpy().tobytes())
    return h.hexdigest()[:16]


# ``benchmarks.methods.exported`` and ``default_instance`` again, on purpose: this file runs
# against another revision's ``mtl_optim`` with nothing else of this checkout importable.
def _exported(module) -> dict[str, type]:
    from mtl_optim import aggregators, weighting

    bases = (aggregators.Aggregator, weighting.Weighting)
    return {
        name: cls
        for name in module.__all__
        if isinstance(cls := getattr(module, name), type)
        and issubclass(cls, bases)
        and not inspect.isabstract(cls)
        and cls not in (aggregators.WeightedAggregator, aggregators.GramianWeightedAggregator)
    }


def default_instance(cls: type, num_tasks: int, **extra):
    """``cls`` with its defaults and whichever of the usual required arguments it takes."""
    given = {"num_tasks": num_tasks, "seed": 0, "steps_per_epoch": 10, "n_groups": 2, **extra}
    accepted = inspect.signature(cls).parameters
    return cls(**{key: value for key, value in given.items() if key in accepted})


def digests() -> dict[str, str]:
    """Every configuration's digest, with the ``mtl_optim`` found on ``sys.path``."""
    import mtl_optim
    from mtl_optim import aggregators, weighting

    exported = _exported
    warnings.simplefilter("ignore")
    out = {}
    for dtype in (torch.float64, torch.float32):
        for name, cls in sorted(exported(aggregators).items()):
            for route in ("jacobian", "auto"):
                out[f"{name}/{route}/{dtype}"] = _run(
                    lambda m, cls=cls, route=route, dtype=dtype: mtl_optim.MTLOptimizer(
                        m.parameters(),
                        lr=1e-2,
                        aggregator=default_instance(cls, K, dtype=dtype),
                        route=route,
                    ),
                    dtype,
                )
        for name, cls in sorted(exported(weighting).items()):
            out[f"{name}/{dtype}"] = _run(
                lambda m, cls=cls, dtype=dtype: mtl_optim.MTLOptimizer(
                    m.parameters(), lr=1e-2, weighting=default_instance(cls, K, dtype=dtype)
                ),
                dtype,
            )
        for base in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
            out[f"AdaTask({base.__name__})/{dtype}"] = _run(
                lambda m, base=base: mtl_optim.AdaTask(
                    m.parameters(), base=base, lr=1e-2, weight_decay=0.01
                ),
                dtype,
            )
    return out


def _digests_of(path: Path, cwd: str) -> dict[str, str]:
    """The digests with the ``mtl_optim`` of checkout ``path`` (this file runs as a script in
    a neutral directory, so nothing else is found first)."""
    env = {**os.environ, "PYTHONPATH": str(path)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--digests"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    where, result = done.stdout.strip().splitlines()[-2:]
    if Path(where).resolve().parents[1] != path.resolve():
        raise SystemExit(f"imported mtl_optim from {where}, expected {path}")
    return eval(result)  # noqa: S307 - our own repr of a dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="the git revision to compare with")
    parser.add_argument("--digests", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.digests:  # the subprocess: print where mtl_optim is from, and the digests
        import mtl_optim

        result = digests()
        print(mtl_optim.__file__)
        print(repr(result))
        return 0
    if not args.against:
        parser.error("--against REV is required")
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), args.against],
            cwd=ROOT,
            check=True,
        )
        try:
            old = _digests_of(tree, tmp)
            new = _digests_of(ROOT, tmp)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    for key in differ:
        print(f"differs: {key}: {old.get(key)} -> {new.get(key)}")
    print(f"{len(new) - len(differ)} of {len(new)} configurations bit-identical to {args.against}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
