"""Task grouping (TAG): inter-task affinity, the grouping search, random task groups."""

from ._affinity import TaskAffinity
from ._plot import plot_affinity
from ._random import RandomTaskGrouping
from ._select import Grouping, select_groups

__all__ = ["Grouping", "RandomTaskGrouping", "TaskAffinity", "plot_affinity", "select_groups"]
