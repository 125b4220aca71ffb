"""The Ray executor: one rank actor per placement-group bundle (serving and batch jobs).

As vLLM's Ray executor does, each rank is an actor pinned to bundle ``i`` of the placement group it is given,
or of the one its caller runs in (``ray.util.get_current_placement_group()``: a Serve replica's own group),
and the driver's ``HF_TOKEN``, caches, proxies and NCCL settings are forwarded to it. Rank actors are never
restarted on their own (``max_restarts=0``): a dead rank leaves its peers stuck in collectives, so the whole
group is rebuilt instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayxdit.config import ConfigError, EngineConfig, WorkerGroupConfig
from rayxdit.request import RequestError, RequestStopped
from rayxdit.runtime.executor import PING_TIMEOUT_S, Executor, GroupError, Method, read_outcome
from rayxdit.runtime.forked import FORK_TIMEOUT_S, ForkedRank
from rayxdit.runtime.placement import never_placeable, rank_actor_options
from rayxdit.runtime.rank_process import OUT_OF_MEMORY, is_out_of_memory
from rayxdit.runtime.worker import CONTROL_METHODS, RankWorker


class RayExecutor(Executor):
    """Ranks as Ray actors, one per bundle of ``placement_group`` (default: the caller's own group)."""

    def __init__(
        self,
        world_size: int,
        config: EngineConfig | None,
        rank_options: Sequence[dict[str, Any]],
        placement_group: PlacementGroup | None = None,
        telemetry_pool: str | None = None,
        fork_ranks: bool = True,
        fork_timeout_s: float = FORK_TIMEOUT_S,
        **options: Any,
    ):
        """``telemetry_pool``: publish each rank's GPU (NVML) as gauges with this pool label. ``fork_ranks``:
        each rank's work runs in a child of its node's fork server (:mod:`rayxdit.runtime.forked`), which
        must fork it within ``fork_timeout_s``."""
        super().__init__(world_size, config, **options)
        self.telemetry_pool = telemetry_pool
        self.fork_ranks = fork_ranks
        self.fork_timeout_s = fork_timeout_s
        self.rank_options = [dict(option) for option in rank_options]
        self.placement_group = placement_group or ray.util.get_current_placement_group()
        self.workers: list[ray.actor.ActorHandle] = []

    @classmethod
    def for_group(
        cls, group: WorkerGroupConfig, placement_group: PlacementGroup | None = None, name: str | None = None
    ) -> RayExecutor:
        """The executor of one worker group (a pool replica's, a batch actor's): its ranks, engine and
        timeouts; its telemetry labelled with the group's name."""
        return cls(
            group.ranks,
            group.engine,
            [rank_actor_options(group, rank) for rank in range(group.ranks)],
            placement_group,
            telemetry_pool=group.name,
            fork_ranks=group.fork_ranks,
            fork_timeout_s=group.fork_timeout_s,
            name=name or group.name,
            collective_timeout_s=group.collective_timeout_s,
            call_timeout_s=group.request_timeout_s,
            cancel_grace_s=group.cancel_grace_s,
        )

    def _rendezvous_host(self) -> str | None:
        return None  # rank 0 listens on its own node's address

    def _launch(self) -> None:
        # Calls run one at a time, in order (collectives must be issued in the same order on every rank),
        # except control calls (ping, cancel, progress), answered by threads of their own while one runs.
        rank_class = ForkedRank if self.fork_ranks else RankWorker
        worker_class = ray.remote(concurrency_groups={"control": 2})(rank_class)
        self.workers = []
        for rank, options in enumerate(self.rank_options):
            options = dict(options)
            bundle = options.pop("placement_group_bundle_index", rank)
            if self.placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=bundle
                )
            forked = {"fork_timeout_s": self.fork_timeout_s, "env": dict(self.env)} if self.fork_ranks else {}
            if self.env and not self.fork_ranks:
                options["runtime_env"] = {"env_vars": dict(self.env)}
            options["name"] = f"rayxdit-{self.name}-g{self.generation}-rank{rank}"
            # Ray has set CUDA_VISIBLE_DEVICES to the bundle's GPU: the rank's device index is 0.
            self.workers.append(
                worker_class.options(**options).remote(
                    rank, self.world_size, 0, telemetry_pool=self.telemetry_pool, **forked
                )
            )

    def _kill(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []

    def pids(self) -> list[int]:
        return ray.get([worker.ping.remote() for worker in self.workers], timeout=PING_TIMEOUT_S)

    def _submit(self, method: Method, args: tuple, kwargs: dict, ranks: Sequence[int]) -> list[ray.ObjectRef]:
        if not isinstance(method, str):
            if self.fork_ranks:  # the function runs in the forked rank, with its RankWorker
                return [self.workers[rank].call.remote(method, args, kwargs) for rank in ranks]
            return [self.workers[rank].__ray_call__.remote(method, *args, **kwargs) for rank in ranks]
        options = {"concurrency_group": "control"} if method in CONTROL_METHODS else {}
        return [
            getattr(self.workers[rank], method).options(**options).remote(*args, **kwargs) for rank in ranks
        ]

    def _rank_error(self, error: BaseException, rank: int) -> Exception:
        cause = error.cause if isinstance(error, RayTaskError) else error
        if isinstance(cause, RequestError):
            return RequestError(str(cause), cause.param)
        if isinstance(cause, RequestStopped):
            return RequestStopped(cause.reason, cause.step)
        if isinstance(error, RayActorError):
            return GroupError(f"worker group {self.name}: rank {rank} died", cause="rank_died")
        if isinstance(error, RayTaskError):
            lines = str(error).strip().splitlines()
            # An allocation failure in a forked rank (RankFailed) or in the actor itself
            starved = getattr(cause, "out_of_memory", False) or is_out_of_memory(cause)
            return GroupError(
                f"worker group {self.name}: rank {rank} failed: {lines[-1] if lines else error!r}",
                cause=OUT_OF_MEMORY if starved else "rank_error",
            )
        return GroupError(f"worker group {self.name}: rank {rank}: {error!r}")

    def _hung(self, ranks: Sequence[int], timeout: float | None) -> GroupError:
        return GroupError(
            f"worker group {self.name}: no answer from ranks {list(ranks)} within {timeout or 0:.0f} s (a rank hung)",
            cause="rank_hung",
        )

    def _call(
        self, method: Method, args: tuple, kwargs: dict, timeout: float | None, ranks: Sequence[int]
    ) -> list[Any]:
        ranks = list(ranks)
        refs = self._submit(method, args, kwargs, ranks)
        rank_of = {ref: rank for ref, rank in zip(refs, ranks, strict=True)}
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(refs)
        while pending:  # fail as soon as one rank fails, not when the slowest answers
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
            if not ready:
                raise self._hung([rank_of[ref] for ref in pending], timeout)
            try:
                ray.get(ready[0])
            except Exception as error:
                failure = self._rank_error(error, rank_of[ready[0]])
                if isinstance(failure, (RequestError, RequestStopped)) and pending:
                    # Not a fault: every rank leaves the call alike; return once they all have.
                    ray.wait(pending, num_returns=len(pending), timeout=self.cancel_grace_s)
                raise failure from error
        return ray.get(refs)

    async def _call_async(
        self, method: Method, args: tuple, kwargs: dict, timeout: float | None, ranks: Sequence[int]
    ) -> list[Any]:
        ranks = list(ranks)
        futures = [asyncio.wrap_future(ref.future()) for ref in self._submit(method, args, kwargs, ranks)]
        for future in futures:  # every rank's error is read here or dropped on purpose, never left unread
            future.add_done_callback(read_outcome)
        rank_of = dict(zip(futures, ranks, strict=True))
        try:
            done, pending = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
            failed = [future for future in futures if future in done and future.exception() is not None]
            if failed:
                failure = self._rank_error(failed[0].exception(), rank_of[failed[0]])
                if isinstance(failure, (RequestError, RequestStopped)) and pending:
                    # Not a fault: every rank leaves the call alike; return once they all have.
                    await asyncio.wait(pending, timeout=self.cancel_grace_s)
                raise failure from failed[0].exception()
            if pending:
                raise self._hung([rank_of[future] for future in futures if future in pending], timeout)
            return [future.result() for future in futures]
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()  # stops waiting here; the ranks themselves are dealt with by the caller


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of every alive node of the connected cluster (Ray's public ``ray.nodes()``)."""
    return [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]


def check_placeable(group: WorkerGroupConfig, started_here: bool) -> str | None:
    """Raise :class:`ConfigError` at once when ``group`` can never be placed (instead of a
    placement group pending forever): certain on a cluster this process started (``started_here``: no
    autoscaler can add nodes). On a cluster joined by address an autoscaler may still add a node that fits:
    the problem is returned, for a warning."""
    problem = never_placeable(group, cluster_nodes())
    if problem and started_here:
        raise ConfigError(f"worker group {group.name}: {problem}")
    return f"worker group {group.name}: {problem}" if problem else None
