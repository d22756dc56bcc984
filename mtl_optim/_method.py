"""What every method object (aggregator or weighting) shares: checkpointing and repr."""

from __future__ import annotations

from typing import Any


class Method:
    """A method is stateless unless it overrides ``state_dict`` / ``load_state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state {sorted(state)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def positive(name: str, value: float) -> float:
    """Validate a strictly positive hyperparameter (NaN is rejected too)."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value
