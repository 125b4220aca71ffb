"""The application's shared state: one Serve replica that every router and pool replica reaches by handle.

Router replicas are interchangeable, so what a later request needs lives here, not in one of them:

- **Load.** Pool replicas report every second whether their worker group is up; routers ask here which
  pool takes a request, and the choice (the pure ``routing.choose_pool`` over the whole application's
  load) is admitted here at once, so two routers cannot both see the same free replica. Reservations end
  when the router reports the request finished, or at their expiry if that router died.
- **Images** made with ``response_format=url``: kept for a TTL within a byte budget, retrievable through any
  router replica.

If this replica restarts, routing recovers within a heartbeat; stored images are lost (clients get 404).
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

from rayxdit.config import PoolConfig, RouterConfig, ServeConfig
from rayxdit.serve.routing import PoolLoad, choose_pool

HEARTBEAT_S = 1.0
"""How often pool replicas report."""
STALE_AFTER_S = 5.0
"""A replica not heard from for this long is gone (scaled down, or dead)."""


@dataclass
class _Replica:
    ready: bool
    seen: float


class ImageStore:
    """Bytes by id, each kept ``ttl_s`` seconds, oldest evicted first beyond ``max_bytes``."""

    def __init__(self, ttl_s: float, max_bytes: int):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self.bytes = 0

    def _evict(self, now: float, room: int = 0) -> None:
        while self.items and (next(iter(self.items.values()))[1] < now or self.bytes + room > self.max_bytes):
            data, _ = self.items.popitem(last=False)[1]
            self.bytes -= len(data)

    def put(self, data: bytes, now: float | None = None) -> str | None:
        """Store ``data``; None if it alone exceeds the budget."""
        now = time.monotonic() if now is None else now
        if len(data) > self.max_bytes:
            return None
        self._evict(now, len(data))
        key = uuid.uuid4().hex
        self.items[key] = (data, now + self.ttl_s)
        self.bytes += len(data)
        return key

    def get(self, key: str, now: float | None = None) -> bytes | None:
        now = time.monotonic() if now is None else now
        self._evict(now)
        entry = self.items.get(key)
        return None if entry is None else entry[0]


class AppState:
    """Deployed once per application (``num_replicas: 1``); see the module docstring."""

    def __init__(self, config: ServeConfig):
        self.pools: dict[str, PoolConfig] = {pool.name: pool for pool in config.pools}
        self.pools_by_model: dict[str, list[PoolConfig]] = defaultdict(list)
        for pool in config.pools:
            self.pools_by_model[pool.served_model_name].append(pool)
        self.replicas: dict[str, dict[str, _Replica]] = defaultdict(dict)
        self.reservations: dict[str, tuple[str, float]] = {}  # request id -> (pool, expires at)
        router: RouterConfig = config.router
        self.images = ImageStore(router.image_ttl_s, router.max_stored_bytes)

    # ----- load -----------------------------------------------------------------------------------------
    def report(self, pool: str, replica: str, ready: bool) -> None:
        """A pool replica's heartbeat."""
        self.replicas[pool][replica] = _Replica(ready, time.monotonic())

    def loads(self) -> dict[str, PoolLoad]:
        """Every pool's ready replicas and outstanding requests, as of now."""
        now = time.monotonic()
        for replicas in self.replicas.values():
            for name in [name for name, seen in replicas.items() if now - seen.seen > STALE_AFTER_S]:
                del replicas[name]
        for request_id in [rid for rid, (_, expires) in self.reservations.items() if expires < now]:
            del self.reservations[request_id]
        outstanding: dict[str, int] = defaultdict(int)
        for pool, _ in self.reservations.values():
            outstanding[pool] += 1
        return {
            name: PoolLoad(
                ready_replicas=sum(r.ready for r in self.replicas[name].values()),
                outstanding=outstanding[name],
            )
            for name in self.pools
        }

    def route(
        self, model: str, cost: float, request_id: str, hold_s: float, exclude: list[str]
    ) -> str | None:
        """The pool that takes the request (admitted at once, held ``hold_s`` at most), or None when every
        pool of ``model`` is excluded (the router tried them: full or down)."""
        order = choose_pool(self.pools_by_model[model], cost, self.loads(), frozenset(exclude))
        if not order:
            return None
        self.reservations[request_id] = (order[0].name, time.monotonic() + hold_s)
        return order[0].name

    def finish(self, request_id: str) -> None:
        self.reservations.pop(request_id, None)

    def readiness(self) -> dict[str, Any]:
        """Per served model: whether it can take a request now. A model is ready when one of its pools has
        a ready replica, or when all its pools scale from zero (the first request starts one)."""
        loads = self.loads()
        models = {}
        for model, pools in self.pools_by_model.items():
            warm = any(loads[pool.name].ready_replicas for pool in pools)
            models[model] = warm or all(pool.min_replicas == 0 for pool in pools)
        return {
            "ready": all(models.values()),
            "models": models,
            "pools": {k: vars(v) for k, v in loads.items()},
        }

    # ----- images -----------------------------------------------------------------------------------------
    def put_image(self, data: bytes) -> str | None:
        return self.images.put(data)

    def get_image(self, key: str) -> bytes | None:
        return self.images.get(key)
