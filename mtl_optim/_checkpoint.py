"""Checkpoints of an ``MTLOptimizer``: what ``state_dict`` records and how loading stays atomic.

``state_dict()`` is the base optimizer's ``state_dict`` plus an ``"mtl"`` entry: the class
names of the base optimizer, the optimizer itself, the aggregator and the weighting (checked on
load), K, the shared parameters (flat indices) and their cohorts, the methods' own state, and
whatever a subclass adds through ``extra_state``. Loading first checks everything that can be
checked without changing anything; if a method's ``load_state_dict`` still fails, every piece
of state is put back as it was.
"""

from __future__ import annotations

import copy
from typing import Any

from ._host import Host
from ._method import clone_state

__all__ = ["identity", "load", "save"]

_WHAT = {
    "base": "base optimizer",
    "optimizer": "optimizer",
    "aggregator_class": "aggregator",
    "weighting_class": "weighting",
}


def identity(obj: Any) -> str | None:
    """The class name of a class or instance (``None`` for ``None``), as checkpoints record it:
    the qualified name without the module, so that moving a class keeps checkpoints valid."""
    if obj is None:
        return None
    return (obj if isinstance(obj, type) else type(obj)).__qualname__


def _identities(opt: Host) -> dict[str, str | None]:
    return {
        "base": identity(opt.base_class),
        "optimizer": identity(type(opt)),
        "aggregator_class": identity(opt.aggregator),
        "weighting_class": identity(opt.weighting),
    }


def save(opt: Host, base_state: dict[str, Any]) -> dict[str, Any]:
    """``base_state`` (the base optimizer's ``state_dict``) with the ``"mtl"`` entry added."""
    engine = opt._engine
    base_state["mtl"] = {
        **_identities(opt),
        "num_tasks": engine.num_tasks,
        "shared": engine.shared_indices(opt.param_groups) if engine.ready else None,
        "cohorts": [s.cohort for s in engine.slices for _ in s.params] if engine.ready else None,
        "aggregator": None if opt.aggregator is None else opt.aggregator.state_dict(),
        "weighting": None if opt.weighting is None else opt.weighting.state_dict(),
        **opt.extra_state(),
    }
    base_state["mtl"] = engine.to_checkpoint(base_state["mtl"], opt.param_groups)
    return base_state


def load(opt: Host, state_dict: dict[str, Any]) -> None:
    """Load ``state_dict`` into ``opt`` atomically (see the module docstring)."""
    state_dict = dict(state_dict)
    mtl = state_dict.pop("mtl", None)
    if mtl is None:
        raise ValueError("not an MTLOptimizer state_dict: the 'mtl' entry is missing")
    mtl = opt._engine.from_checkpoint(mtl, opt.param_groups)  # sharded: DTensors to local
    _check(opt, state_dict, mtl)
    engine = opt._engine
    before = (
        copy.deepcopy(opt._base.state_dict()),
        None if opt.aggregator is None else clone_state(opt.aggregator.state_dict()),
        None if opt.weighting is None else clone_state(opt.weighting.state_dict()),
        opt.extra_state(),
        dict(engine.__dict__),  # set_shared rebinds, never mutates, these attributes
        opt._layout,
    )
    try:
        _load(opt, state_dict, mtl)
    except Exception:
        engine.__dict__.update(before[4])
        opt._layout = before[5]
        opt._base.load_state_dict(before[0])
        if before[1] is not None:
            opt.aggregator.load_state_dict(before[1])
        if before[2] is not None:
            opt.weighting.load_state_dict(before[2])
        opt.load_extra_state(before[3])
        raise


def _check(opt: Host, state_dict: dict[str, Any], mtl: dict[str, Any]) -> None:
    """Refuse a checkpoint that does not fit, naming what differs (nothing changes)."""
    for key, value in _identities(opt).items():
        if key in mtl and mtl[key] != value:
            raise ValueError(
                f"this checkpoint was written with {_WHAT[key]} {mtl[key]}, but this optimizer "
                f"has {value}; build the optimizer with the same {_WHAT[key]} to load it"
            )
    groups = state_dict.get("param_groups", [])
    if len(groups) != len(opt.param_groups) or any(
        len(saved["params"]) != len(g["params"]) for saved, g in zip(groups, opt.param_groups)
    ):
        raise ValueError(
            "this checkpoint's param groups do not match this optimizer's (number of groups "
            f"or of parameters per group: saved {[len(g['params']) for g in groups]}, here "
            f"{[len(g['params']) for g in opt.param_groups]})"
        )
    k, mine = mtl["num_tasks"], opt._engine.num_tasks
    if k is not None and mine is not None and k != mine:
        raise ValueError(
            f"this checkpoint has K = {k} tasks, but this optimizer was trained with K = {mine}"
        )
    if mtl["shared"] is not None:
        flat = [p for g in opt.param_groups for p in g["params"]]
        if max(mtl["shared"], default=-1) >= len(flat):
            raise ValueError("this checkpoint names shared parameters this optimizer lacks")
        probe = type(opt._engine)()  # only the column layout (local under FSDP2) is needed
        shared = {id(flat[i]) for i in mtl["shared"]}
        probe.set_shared(opt.param_groups, shared, _cohorts(opt, mtl))
        opt.check_extra_state(mtl, probe.slices)


def _cohorts(opt: Host, mtl: dict[str, Any]) -> dict[int, int]:
    flat = [p for g in opt.param_groups for p in g["params"]]
    cohorts = mtl.get("cohorts") or [0] * len(mtl["shared"])
    return {id(flat[i]): c for i, c in zip(mtl["shared"], cohorts)}


def _load(opt: Host, state_dict: dict[str, Any], mtl: dict[str, Any]) -> None:
    opt._base.load_state_dict(state_dict)
    if mtl["shared"] is not None:
        flat = [p for g in opt.param_groups for p in g["params"]]
        shared = {id(flat[i]) for i in mtl["shared"]}
        opt._engine.set_shared(opt.param_groups, shared, _cohorts(opt, mtl))
        opt._engine.num_tasks = mtl["num_tasks"]
        opt._layout = opt._param_layout()
    if opt.aggregator is not None and mtl["aggregator"] is not None:
        opt.aggregator.load_state_dict(mtl["aggregator"])
    if opt.weighting is not None and mtl["weighting"] is not None:
        opt.weighting.load_state_dict(mtl["weighting"])
    opt.load_extra_state(mtl)
    opt._new_window()
