"""What every method object (aggregator or weighting) shares: checkpointing and repr."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Method:
    """A method is stateless unless it overrides ``state_dict`` / ``load_state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def clone_state(state: Any) -> Any:
    """A copy of a ``state_dict``-like tree: tensors cloned, dicts/lists/tuples rebuilt, other
    leaves (numbers, strings, None) shared. Much cheaper than ``copy.deepcopy`` per step."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(clone_state(v) for v in state)
    return state


class Seeded(Method):
    """A method that draws from its own CPU ``torch.Generator``, never the global RNG.

    ``seed=None`` seeds it nondeterministically. The generator's state is in ``state_dict()``
    under ``"generator"``, so a resumed run draws the same numbers.
    """

    def __init__(self, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def generator_on(self, device: torch.device) -> torch.Generator:
        """The generator to draw with on ``device``: the CPU generator itself on the CPU;
        elsewhere a generator on ``device`` seeded with one draw of it (a CPU read, no host
        sync), so that no random tensor has to be copied to the device."""
        if device.type == "cpu":
            return self.generator
        seed = int(torch.randint(0, 2**63 - 1, (), generator=self.generator))
        return torch.Generator(device=device).manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "generator" not in state:
            raise ValueError(f"{self!r}: the state has no 'generator' entry")
        self.generator.set_state(state.pop("generator").clone())
        super().load_state_dict(state)


def present_tasks(method: Any, rows: int) -> tuple[Tensor | None, int]:
    """``(present, K)`` for a call of ``method`` (aggregator or weighting) on ``rows`` rows or
    losses: ``(None, rows)`` when every task is present (partial labels: see
    docs/adding-a-method.md, "Partial labels").

    Raises:
        ValueError: ``present`` is set but is not an increasing 1-D integer tensor of ``rows``
            indices in ``[0, all_tasks)``.
    """
    present = method.present
    if present is None:
        return None, rows
    k = method.all_tasks
    if (
        not isinstance(present, Tensor)
        or present.dim() != 1
        or present.dtype not in (torch.int64, torch.int32)
        or present.numel() != rows
        or not isinstance(k, int)
        or rows > k
    ):
        raise ValueError(
            f"{method!r}: present must be the increasing (m,) int64 indices of the rows' tasks "
            f"among all_tasks = K; got present={present!r}, all_tasks={k!r} for {rows} rows"
        )
    cpu = present.cpu()
    if rows and (int(cpu[0]) < 0 or int(cpu[-1]) >= k or bool((cpu[1:] <= cpu[:-1]).any())):
        raise ValueError(
            f"{method!r}: present must be increasing indices in [0, {k}), got {cpu.tolist()}"
        )
    return cpu.to(torch.int64), k
