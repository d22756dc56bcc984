"""Data parallelism across processes: the few collective operations the optimizer needs.

With ``torch.distributed`` initialised and more than one rank, every rank sees a different
slice of the batch. The optimizer then makes all ranks see the same numbers before anything is
decided: the loss values, the per-task gradient matrix (or Gramian) and the task-specific
gradients are averaged, and method state (RNG generators, SAC networks) is broadcast from rank
0 once, so that every rank computes the same weights and the same update. The average over
ranks of per-rank means equals the mean over the whole batch when ranks hold equal shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Replicas"]


class Replicas:
    """The process group the optimizer averages over (inactive with fewer than two ranks)."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        dist = torch.distributed
        self.active = dist.is_available() and dist.is_initialized()
        self.size = dist.get_world_size(group) if self.active else 1
        self.active = self.active and self.size > 1
        self.rank = dist.get_rank(group) if self.active else 0

    def mean_(self, tensors: Sequence[Tensor]) -> None:
        """Average ``tensors`` in place across ranks, one all-reduce per dtype and device."""
        self._all_reduce(tensors, 1.0 / self.size)

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum ``tensors`` in place across ranks, one all-reduce per dtype and device."""
        self._all_reduce(tensors, 1.0)

    def _all_reduce(self, tensors: Sequence[Tensor], factor: float) -> None:
        if not self.active or not tensors:
            return
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.device, t.dtype), []).append(t)
        for group in buckets.values():
            if len(group) == 1 and group[0].is_contiguous():
                flat = group[0]
                torch.distributed.all_reduce(flat, group=self.group)
                if factor != 1.0:
                    flat.mul_(factor)
                continue
            flat = torch.cat([t.reshape(-1) for t in group])
            torch.distributed.all_reduce(flat, group=self.group)
            if factor != 1.0:
                flat.mul_(factor)
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    def mean_grads(self, params: Sequence[Tensor]) -> None:
        """Average ``.grad`` of ``params`` across ranks. A parameter with a gradient on some rank
        but none on this one takes part with zeros (one all-reduce of the presence flags first,
        so every rank reduces the same list)."""
        if not self.active or not params:
            return
        device = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        torch.distributed.all_reduce(has, group=self.group)
        used = []
        for p, flag in zip(params, has.tolist()):
            if flag > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                used.append(p.grad)
        self.mean_(used)

    def broadcast_state(self, methods: Sequence[Any]) -> None:
        """Make every rank's method state (``state_dict``) equal to rank 0's."""
        if not self.active:
            return
        states = [None if m is None else m.state_dict() for m in methods]
        if self.rank == 0:
            states = [_to_cpu(s) for s in states]
        payload = [states]
        src = torch.distributed.get_global_rank(self.group, 0) if self.group is not None else 0
        torch.distributed.broadcast_object_list(payload, src=src, group=self.group)
        if self.rank != 0:
            for m, s in zip(methods, payload[0]):
                if m is not None and s is not None:
                    m.load_state_dict(s)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
