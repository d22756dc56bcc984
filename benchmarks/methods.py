"""The benchmark's methods, built by name: every one is Adam with the same learning rate,
driven by an mtl_optim method with its official defaults.

``stl`` builds plain Adam; the loop trains one single-task model per task with it (the Δm
baseline). Method-specific settings are the classes' defaults (e.g. UW's log-variances train
with lr 0.025, FAMO clips the shared gradient to norm 1); random methods are seeded with the
run's seed.
The mtl_optim names are looked up when a method is built, so the registry also lists methods
whose classes may not exist in an older checkout; :func:`unavailable` says which.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

import mtl_optim
from mtl_optim import aggregators, weighting

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "STL",
    "Context",
    "Method",
    "build",
    "default_instance",
    "exported",
    "unavailable",
]

STL = "stl"


@dataclass(frozen=True)
class Context:
    """What a factory may need besides the parameters."""

    num_tasks: int
    seed: int
    lr: float
    steps_per_epoch: int


@dataclass(frozen=True)
class Method:
    """``build(params, ctx)`` returns the optimizer; ``reevaluate``: after ``step()`` the loop
    hands ``opt.update_weighting`` the same batch's losses recomputed without a graph (FAMO)."""

    label: str
    build: Callable[[Iterable[Tensor], Context], mtl_optim.MTLOptimizer]
    reevaluate: bool = False


def _adam(
    params: Iterable[Tensor],
    ctx: Context,
    aggregator: aggregators.Aggregator | None = None,
    weighting_: weighting.Weighting | None = None,
) -> mtl_optim.MTLOptimizer:
    return mtl_optim.MTLOptimizer(
        params, base=torch.optim.Adam, aggregator=aggregator, weighting=weighting_, lr=ctx.lr
    )


def _agg(make: Callable[[Context], aggregators.Aggregator]) -> Callable:
    return lambda params, ctx: _adam(params, ctx, aggregator=make(ctx))


def _weighting(make: Callable[[Context], weighting.Weighting]) -> Callable:
    return lambda params, ctx: _adam(params, ctx, weighting_=make(ctx))


METHODS: dict[str, Method] = {
    STL: Method("STL (one model per task)", _adam),
    "equal": Method("Equal weighting", _adam),
    "adatask": Method(
        "AdaTask", lambda params, ctx: mtl_optim.AdaTask(params, base=torch.optim.Adam, lr=ctx.lr)
    ),
    "nash": Method("Nash-MTL", _agg(lambda ctx: aggregators.NashMTL())),
    "mgda": Method("MGDA", _agg(lambda ctx: aggregators.MGDA())),
    "pcgrad": Method("PCGrad", _agg(lambda ctx: aggregators.PCGrad(seed=ctx.seed))),
    "cagrad": Method("CAGrad", _agg(lambda ctx: aggregators.CAGrad())),
    "imtlg": Method("IMTL-G", _agg(lambda ctx: aggregators.IMTLG())),
    "igb": Method("IGB", _weighting(lambda ctx: weighting.IGB())),
    "igbrl": Method(
        "IGB-RL",
        _weighting(lambda ctx: weighting.IGBRL(steps_per_epoch=ctx.steps_per_epoch, seed=ctx.seed)),
    ),
    "rlw": Method("RLW", _weighting(lambda ctx: weighting.RLW(seed=ctx.seed))),
    "uw": Method("UW", _weighting(lambda ctx: weighting.Uncertainty(ctx.num_tasks))),
    "famo": Method("FAMO", _weighting(lambda ctx: weighting.FAMO(ctx.num_tasks)), reevaluate=True),
    "dwa": Method("DWA", _weighting(lambda ctx: weighting.DWA())),
    "gls": Method("GLS", _weighting(lambda ctx: weighting.GLS())),
    "gradnorm": Method("GradNorm", _weighting(lambda ctx: weighting.GradNorm(ctx.num_tasks))),
    "si": Method("Scale-invariant", _weighting(lambda ctx: weighting.ScaleInvariant())),
    "stch": Method("STCH", _weighting(lambda ctx: weighting.STCH())),
    "dbmtl": Method("DB-MTL", _weighting(lambda ctx: weighting.DBMTL())),
}

#: What ``python -m benchmarks`` runs by default (``stl`` gives the Δm baseline).
DEFAULT_METHODS = (STL, "equal", "adatask", "nash", "mgda", "pcgrad", "igb", "rlw", "uw", "famo")


def build(name: str, params: Iterable[Tensor], ctx: Context) -> mtl_optim.MTLOptimizer:
    """The optimizer of method ``name`` (a key of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name].build(params, ctx)


def unavailable(name: str, num_tasks: int = 2) -> str | None:
    """Why method ``name`` cannot be built in this checkout (e.g. a class not written yet),
    or ``None`` when it can."""
    probe = nn.Linear(1, 1)
    try:
        build(name, probe.parameters(), Context(num_tasks, 0, 1e-3, 1))
    except (AttributeError, ImportError) as e:
        return f"{name}: {e}"
    return None


def exported(module: ModuleType) -> dict[str, type]:
    """The concrete method classes that ``mtl_optim.aggregators`` or ``.weighting`` exports."""
    bases = (aggregators.Aggregator, weighting.Weighting)
    return {
        name: cls
        for name in module.__all__
        if isinstance(cls := getattr(module, name), type)
        and issubclass(cls, bases)
        and not inspect.isabstract(cls)
        and cls not in (aggregators.WeightedAggregator, aggregators.GramianWeightedAggregator)
    }


def default_instance(cls: type, num_tasks: int, **extra: Any) -> Any:
    """``cls`` with its defaults, filling the arguments some methods require: ``num_tasks``,
    ``seed=0``, ``steps_per_epoch=10``, ``n_groups=2``, and whichever of ``extra`` it accepts
    (e.g. ``dtype``)."""
    given = {"num_tasks": num_tasks, "seed": 0, "steps_per_epoch": 10, "n_groups": 2, **extra}
    accepted = inspect.signature(cls).parameters
    return cls(**{key: value for key, value in given.items() if key in accepted})
