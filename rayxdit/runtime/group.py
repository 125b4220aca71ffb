"""A worker group: N rank actors in one placement group, one torch.distributed group, driven together.

The driver (a Serve replica or a batch actor) owns the group. A request is one ``generate`` call on every
rank at once; rank 0's result comes back. A dead rank, a rank error or a request that outlives its timeout
(a hung collective) marks the group broken; :meth:`WorkerGroup.rebuild` kills what is left and starts fresh
ranks in the same placement group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayxdit.config import PoolConfig
from rayxdit.request import GenerateRequest, GenerateResult, RequestError
from rayxdit.runtime.placement import rank_actor_options
from rayxdit.runtime.worker import RankWorker

logger = logging.getLogger("rayxdit.runtime")

STARTUP_TIMEOUT_S = 1800.0
PING_TIMEOUT_S = 10.0


class WorkerGroupError(RuntimeError):
    """The group failed (a rank died, raised, or hung); it must be rebuilt before the next request."""


class WorkerGroup:
    """The ranks of one pool replica. Not thread-safe: the owner serializes requests (collectives must be
    issued in the same order on every rank)."""

    def __init__(self, pool: PoolConfig, placement_group: PlacementGroup | None = None, name: str = "group"):
        self.pool = pool
        self.name = name
        self.placement_group = placement_group or ray.util.get_current_placement_group()
        self.workers: list[ray.actor.ActorHandle] = []
        self.generation = 0
        self.broken = True
        self.devices: list[str] = []
        self.start()

    # ----- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Create the rank actors, rendezvous at rank 0's address, load the model everywhere."""
        self.generation += 1
        begin = time.perf_counter()
        engine_config = self.pool.engine_config()
        worker_cls = ray.remote(RankWorker)
        self.workers = []
        for rank in range(self.pool.ranks):
            options = rank_actor_options(self.pool, rank)
            bundle = options.pop("placement_group_bundle_index")
            if self.placement_group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=bundle
                )
            options["name"] = f"rayxdit-{self.name}-g{self.generation}-rank{rank}"
            self.workers.append(
                worker_cls.options(**options).remote(engine_config, rank, self.pool.collective_timeout_s)
            )
        try:
            init_method = ray.get(self.workers[0].rendezvous_address.remote(), timeout=STARTUP_TIMEOUT_S)
            self.devices = ray.get(
                [w.start.remote(init_method) for w in self.workers], timeout=STARTUP_TIMEOUT_S
            )
        except Exception:
            self.shutdown()
            raise
        self.broken = False
        logger.info(
            "worker group %s generation %d up in %.1f s on %s",
            self.name,
            self.generation,
            time.perf_counter() - begin,
            self.devices,
        )

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        self.broken = True

    def rebuild(self) -> None:
        """Kill every rank and start a new generation in the same placement group."""
        logger.warning("rebuilding worker group %s (generation %d)", self.name, self.generation)
        self.shutdown()
        self.start()

    # ----- requests -------------------------------------------------------------------------------------
    def _submit(self, request: GenerateRequest) -> list[ray.ObjectRef]:
        if self.broken:
            raise WorkerGroupError(f"worker group {self.name} is broken; rebuild it first")
        return [worker.generate.remote(request) for worker in self.workers]

    def _failed(self, error: BaseException) -> BaseException:
        """Map a rank failure to what the caller should see, marking the group broken unless the request
        itself was at fault (then every rank rejected it before any collective, and the group is fine)."""
        cause = getattr(error, "cause", None) or error
        if isinstance(cause, RequestError):
            return RequestError(str(cause), cause.param)
        self.broken = True
        if isinstance(error, (GetTimeoutError, asyncio.TimeoutError, TimeoutError)):
            reason = f"no result within {self.pool.request_timeout_s:.0f} s (a rank hung)"
        elif isinstance(error, RayActorError):
            reason = "a rank died"
        elif isinstance(error, RayTaskError):
            reason = f"a rank failed: {str(error).strip().splitlines()[-1]}"
        else:
            reason = repr(error)
        return WorkerGroupError(f"worker group {self.name}: {reason}")

    def generate(self, request: GenerateRequest) -> GenerateResult:
        """Run one request on every rank; blocks. Raises WorkerGroupError or RequestError."""
        refs = self._submit(request)
        try:
            return ray.get(refs, timeout=self.pool.request_timeout_s)[0]
        except Exception as error:
            raise self._failed(error) from error

    async def generate_async(self, request: GenerateRequest) -> GenerateResult:
        """:meth:`generate` for asyncio owners (Serve replicas)."""
        refs = self._submit(request)
        try:
            results = await asyncio.wait_for(asyncio.gather(*refs), timeout=self.pool.request_timeout_s)
        except Exception as error:
            raise self._failed(error) from error
        return results[0]

    async def healthy(self) -> bool:
        """Every rank answers a ping (ranks answer while a request runs: they have a second thread)."""
        if self.broken:
            return False
        try:
            await asyncio.wait_for(asyncio.gather(*(w.ping.remote() for w in self.workers)), PING_TIMEOUT_S)
        except Exception:
            return False
        return True

    def pids(self) -> Sequence[int]:
        return ray.get([w.ping.remote() for w in self.workers], timeout=PING_TIMEOUT_S)
