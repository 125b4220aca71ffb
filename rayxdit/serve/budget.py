"""The budget of ranks (GPUs) an application's pools share: configured, or the cluster's; asked of Ray
through its public API, and cached (routing reads it per request, the sizing policy per tick)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

logger = logging.getLogger("ray.serve")


def rank_budget(budget_ranks: int | None, accelerators: Iterable[str]) -> float:
    """The ranks the pools share: ``budget_ranks`` when configured; infinite for CPU pools (Serve's
    placement decides, nothing to share); else the GPUs the cluster has now (``ray.cluster_resources``).
    On an autoscaling cluster, set ``elastic.budget_ranks`` to the most GPUs it may reach (the shipped
    cluster and Serve configs do). Asks Ray (a call to the cluster): callers cache it
    (:class:`BudgetCache`)."""
    if budget_ranks is not None:
        return float(budget_ranks)
    if all(kind == "cpu" for kind in accelerators):
        return math.inf
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


class BudgetCache:
    """:func:`rank_budget`, asked of the cluster at most every ``period_s`` (an autoscaling cluster may
    grow; every autoscaling tick and routing decision reads it). Not knowing it is no limit."""

    def __init__(self, budget_ranks: int | None, accelerators: Iterable[str], period_s: float = 30.0):
        self.budget_ranks = budget_ranks
        self.accelerators = tuple(accelerators)
        self.period_s = period_s
        self.checked = -math.inf
        self.value = math.inf

    def __call__(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if now - self.checked >= self.period_s:
            self.checked = now
            try:
                self.value = rank_budget(self.budget_ranks, self.accelerators)
            except Exception as error:
                logger.warning("the shared budget of ranks is unknown (%r): no limit assumed", error)
                self.value = math.inf
        return self.value
