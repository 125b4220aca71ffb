"""A pool replica: a Serve replica that owns a placement group of N bundles and drives one worker group.

Serve creates the placement group (``placement_group_bundles``) and puts this actor in bundle 0; the
executor places the rank actors one per bundle. Requests run one at a time (collectives must be issued in
the same order on every rank). When the group fails, the replica rebuilds it in the same placement group and
retries the request once; ``check_health`` does the same for failures between requests, and raises (so that
Serve replaces the whole replica) only when a rebuild fails.
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from rayxdit.config import PoolConfig
from rayxdit.request import EncodedResult, GenerateRequest
from rayxdit.runtime.executor import GroupError
from rayxdit.runtime.ray_executor import RayExecutor
from rayxdit.serve.api import PoolUnavailableError

logger = logging.getLogger("ray.serve")


class PoolReplica:
    def __init__(self, pool: PoolConfig):
        self.pool = pool
        replica = serve.get_replica_context().replica_tag
        self.executor = RayExecutor.for_pool(pool, name=f"{pool.name}-{replica}")
        self.executor.start()
        self.lock = asyncio.Lock()

    async def generate(self, request: GenerateRequest) -> EncodedResult:
        async with self.lock:
            for attempt in (1, 2):
                try:
                    if self.executor.broken:
                        await asyncio.to_thread(self.executor.rebuild)
                    result = await self.executor.generate_async(request)
                    result.timings["ranks"] = self.pool.ranks
                    result.timings["attempts"] = attempt
                    return result
                except GroupError as error:
                    logger.warning("%s (attempt %d)", error, attempt)
                    last_error = error
                except Exception as error:  # rebuild failed: let the health check replace the replica
                    if not self.executor.broken:
                        raise
                    last_error = error
            raise PoolUnavailableError(f"{self.pool.name}: {last_error}")

    async def check_health(self) -> None:
        if self.lock.locked():
            return  # a running request detects failures itself and rebuilds
        if await self.executor.healthy():
            return
        async with self.lock:
            await asyncio.to_thread(self.executor.rebuild)

    def worker_pids(self) -> list[int]:
        return self.executor.pids()
