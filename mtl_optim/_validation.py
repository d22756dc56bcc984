"""Argument checks shared by the methods, one of each kind, with one wording for the errors.

Convention: a value of the wrong type raises ``TypeError``, a value of the right type outside
its range raises ``ValueError``; both name the argument and show what was given. ``bool`` is
not accepted where an ``int`` is asked for. See docs/design.md, "Where helpers live".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

__all__ = [
    "check_indices",
    "check_int",
    "check_nonnegative",
    "check_num_tasks",
    "check_partition",
    "positive",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int = 0, *, optional: bool = False) -> Any:
    """``value`` if it is an ``int`` at least ``minimum`` (or ``None`` when ``optional``).

    Raises:
        TypeError: ``value`` is not an ``int`` (a ``bool`` or a float such as ``2.0`` is not).
        ValueError: ``value`` is below ``minimum``.
    """
    if value is None and optional:
        return None
    allowed = f"an int >= {minimum}" + (" or None" if optional else "")
    if not _is_int(value):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_num_tasks(num_tasks: Any) -> int:
    """``num_tasks`` as an ``int >= 1`` (see :func:`check_int`)."""
    return check_int("num_tasks", num_tasks, 1)


def positive(name: str, value: float) -> float:
    """Validate a strictly positive hyperparameter (NaN is rejected too)."""
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return value


def check_nonnegative(losses: Tensor, who: str) -> None:
    """Raise ``ValueError`` if any loss is negative (its logarithm is undefined)."""
    if bool((losses.detach() < 0).any()):
        raise ValueError(
            f"{who} takes the log of the losses and needs them >= 0, got {losses.detach().tolist()}"
        )


def check_indices(
    name: str, values: Iterable[Any], n: int, *, permutation: bool = False
) -> list[int]:
    """``values`` as a list of distinct ``int`` indices in ``[0, n)``; with ``permutation``,
    every index exactly once.

    Raises:
        ValueError: an entry is not an ``int`` in range, an index repeats, or (``permutation``)
            one is missing.
    """
    chosen = list(values)
    if not all(_is_int(t) and 0 <= t < n for t in chosen):
        raise ValueError(f"{name} must be indices in [0, {n}), got {chosen!r}")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{name} has repeated entries: {chosen!r}")
    if permutation and len(chosen) != n:
        raise ValueError(f"{name} must be a permutation of range({n}), got {chosen!r}")
    return chosen


def check_partition(
    name: str, groups: Iterable[Iterable[Any]], num_tasks: int | None = None
) -> tuple[tuple[int, ...], ...]:
    """``groups`` as a tuple of sorted tuples, checked to partition ``range(K)`` into non-empty
    groups: every task index (an ``int``) in exactly one group. ``K`` is ``num_tasks`` when
    given, else the number of indices in the groups.

    Raises:
        ValueError: a group is empty, an entry is not an ``int``, a task is in two groups, or
            the groups do not cover ``range(K)`` exactly.
    """
    out = tuple(tuple(g) for g in groups)
    members = [t for g in out for t in g]
    k = len(members) if num_tasks is None else num_tasks
    problem = None
    if not out or not all(out):
        problem = "an empty group"
    elif not all(_is_int(t) for t in members):
        problem = "an entry that is not an int"
    elif len(set(members)) != len(members):
        problem = "a task in more than one group"
    elif sorted(members) != list(range(k)):
        problem = f"tasks outside range({k}) or missing"
    if problem is not None:
        raise ValueError(
            f"{name} must partition the tasks range({k}) into non-empty groups; found "
            f"{problem} in {[list(g) for g in out]!r}"
        )
    return tuple(tuple(sorted(g)) for g in out)
