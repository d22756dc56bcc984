"""Checkpoints of an ``MTLOptimizer`` (or ``AdaTask``) on a model sharded with FSDP2.

With sharded parameters, ``opt.state_dict()`` holds ``DTensor``\\ s for everything that is laid out
like a parameter (the base optimizer's moments, AdaTask's per-task moments as one
``(K, *p.shape)`` tensor per shared parameter) and plain tensors and values for what every rank
holds alike (the methods' state, random generators, K, the shared set), so
``torch.distributed.checkpoint`` (DCP) saves each rank's part once::

    import torch.distributed.checkpoint as dcp
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=path)

DCP loads *into* a state dict of the right layout, which an optimizer has only after its first
steps. :func:`optimizer_template` builds that layout from the checkpoint's metadata, for a freshly
built model and optimizer (same modules passed to ``fully_shard``, same param groups, same
methods)::

    from mtl_optim.fsdp import optimizer_template
    state = {"model": model.state_dict(), "optim": optimizer_template(opt, path)}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optim"])

Resuming on the same number of ranks continues bit-identically. The layout does not depend on
the number of ranks, so DCP can also load it on a different one (the continuation then equals
the uninterrupted run up to the rounding of the reductions).
"""

from __future__ import annotations

from typing import Any

import torch

from ._sharded_layout import is_sharded, like, stacked

__all__ = ["optimizer_template"]


def optimizer_template(
    optimizer: torch.optim.Optimizer,
    checkpoint_id: Any,
    key: str = "optim",
    *,
    storage_reader: Any = None,
) -> dict[str, Any]:
    """A state dict laid out like the optimizer state saved under ``key`` at ``checkpoint_id``,
    for ``torch.distributed.checkpoint.load`` to fill and ``optimizer.load_state_dict`` to take.

    Args:
        optimizer: the freshly built optimizer (its parameters already sharded).
        checkpoint_id: the checkpoint's path (as for ``dcp.load``).
        key: the entry of the saved state dict that holds ``optimizer.state_dict()``.
        storage_reader: a DCP ``StorageReader``; default: ``FileSystemReader(checkpoint_id)``.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    reader = storage_reader if storage_reader is not None else FileSystemReader(checkpoint_id)
    metadata = reader.read_metadata()
    paths = metadata.planner_data or {}
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    root: dict[Any, Any] = {}
    found = False
    for fqn, meta in metadata.state_dict_metadata.items():
        path = paths.get(fqn)
        if path is None or path[0] != key:
            continue
        found = True
        rest = tuple(path[1:])
        if rest and rest[0] == "state" and len(rest) > 1:
            rest = (rest[0], int(rest[1]), *rest[2:])  # torch optimizers key state by index
        value = None if isinstance(meta, BytesStorageMetadata) else _tensor(rest, meta, flat)
        _insert(root, rest, value)
    if not found:
        raise ValueError(f"the checkpoint at {checkpoint_id!r} has no entry {key!r}")
    root.setdefault("state", {})  # a stateless base (plain SGD) saves no tensor there
    return root


def _tensor(path: tuple, meta: Any, flat: list[torch.Tensor]) -> torch.Tensor:
    """An empty tensor to load ``path`` into: a ``DTensor`` where the saved one was laid out
    like a parameter, else a plain CPU tensor."""
    size, dtype = tuple(meta.size), meta.properties.dtype
    param = _owner(path, flat)
    if param is not None and is_sharded(param):
        shape = tuple(param.to_local().shape)
        if size == tuple(param.shape):
            return like(param, torch.zeros(shape, dtype=dtype, device=param.device))
        if size[1:] == tuple(param.shape):
            local = torch.zeros((size[0], *shape), dtype=dtype, device=param.device)
            return stacked(param, local, size[0])
    return torch.zeros(size, dtype=dtype)


def _owner(path: tuple, flat: list[torch.Tensor]) -> torch.Tensor | None:
    """The parameter a saved tensor belongs to: base state ``state/<i>/<name>``, AdaTask's
    ``mtl/task_state/<slice>/<name>/<i>`` and ``mtl/parked/<i>/<name>``."""
    index = None
    if len(path) == 3 and path[0] == "state":
        index = path[1]
    elif len(path) == 5 and path[:2] == ("mtl", "task_state"):
        index = path[4]
    elif len(path) == 4 and path[:2] == ("mtl", "parked") and path[3] != "step":
        index = path[2]
    try:
        return flat[int(index)] if index is not None else None
    except (ValueError, IndexError):
        return None


def _insert(root: dict, path: tuple, value: Any) -> None:
    """Set ``root[path[0]][path[1]]... = value``, making dicts, or lists where DCP recorded
    integer steps (it records list positions as integers and dict keys as strings)."""
    node: Any = root
    for step, nxt in zip(path[:-1], path[1:]):
        child = _get(node, step)
        if child is None:
            child = [] if isinstance(nxt, int) and not _keyed_by_int(step) else {}
            _set(node, step, child)
        node = child
    _set(node, path[-1], value)


def _get(node: Any, step: Any) -> Any:
    if isinstance(node, list):
        return node[step] if step < len(node) else None
    return node.get(step)


def _set(node: Any, step: Any, value: Any) -> None:
    if isinstance(node, list):
        node.extend([None] * (step + 1 - len(node)))
    node[step] = value


def _keyed_by_int(step: Any) -> bool:
    return step == "state"  # the base optimizer's state: a dict keyed by parameter index
