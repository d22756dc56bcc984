"""Every method the suite trains: each exported aggregator and weighting (built by
``benchmarks.methods.default_instance`` with its defaults) and AdaTask on each of its bases."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

import mtl_optim
from mtl_optim import aggregators, weighting

from ..methods import default_instance, exported

ADATASK_BASES: dict[str, tuple[type[torch.optim.Optimizer], dict]] = {
    "Adam": (torch.optim.Adam, {}),
    "AdamW": (torch.optim.AdamW, {"weight_decay": 0.01}),
    "RMSprop": (torch.optim.RMSprop, {}),
    "Adagrad": (torch.optim.Adagrad, {}),
}


@dataclass(frozen=True)
class Case:
    """``build(params)`` returns a fresh optimizer; ``post_step``: the weighting learns from
    the re-evaluated losses (``opt.update_weighting`` after ``step``, FAMO)."""

    label: str
    kind: str  # "aggregator", "weighting" or "adatask"
    build: Callable[[Iterable[Tensor]], mtl_optim.MTLOptimizer]
    post_step: bool = False


def _has_post_step(w: weighting.Weighting) -> bool:
    return type(w).post_step is not weighting.Weighting.post_step


def cases(k: int, lr: float = 1e-2, gramian_route: bool = False) -> list[Case]:
    """One case per exported aggregator (also with ``route="gramian"`` where it applies, if
    ``gramian_route``), per exported weighting and per AdaTask base."""
    out = []
    for name, cls in exported(aggregators).items():

        def agg(params, cls=cls, route="jacobian"):
            return mtl_optim.MTLOptimizer(
                params, aggregator=default_instance(cls, k), route=route, lr=lr
            )

        out.append(Case(name, "aggregator", agg))
        if gramian_route and issubclass(cls, aggregators.GramianWeightedAggregator):
            out.append(
                Case(
                    f"{name} (Gramian route)",
                    "aggregator",
                    lambda params, agg=agg: agg(params, route="gramian"),
                )
            )
    for name, cls in exported(weighting).items():

        def wgt(params, cls=cls):
            return mtl_optim.MTLOptimizer(params, weighting=default_instance(cls, k), lr=lr)

        post = _has_post_step(default_instance(cls, k))
        out.append(Case(name, "weighting", wgt, post_step=post))
    for name, (base, kw) in ADATASK_BASES.items():

        def ada(params, base=base, kw=kw):
            return mtl_optim.AdaTask(params, base=base, lr=lr, **kw)

        out.append(Case(f"AdaTask({name})", "adatask", ada))
    return out
