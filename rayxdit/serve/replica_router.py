"""Which replica of a pool takes a request: Serve's request router, told where adapters are.

Serve routes a pool's requests to its replicas; for pools that serve LoRA adapters per request
(``lora_sources``) this router ranks the replicas with :func:`rayxdit.serve.routing.adapter_tiers` (the pure
decision the fleet simulator calls too) from what Serve already knows: the request's adapter set (its
``multiplexed_model_id``, set by the dispatcher) and each replica's multiplexed ids (the sets it noted, as
many as its GPUs keep). Serve then takes the least busy free replica of the first tier that has one, and
asks again after a back-off when none does. Requests are matched to freed replicas in arrival order.
"""

from __future__ import annotations

import time

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from rayxdit.serve.routing import adapter_tiers

ROUTER_CLASS = "rayxdit.serve.replica_router:AdapterAwareRouter"
"""How a deployment's ``request_router_config`` names this router."""


class AdapterAwareRouter(FIFOMixin, RequestRouter):
    """Serve's router for pools with per-request adapters (see the module's docstring)."""

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        waited = time.time() - pending_request.created_at if pending_request is not None else 0.0
        by_id = {str(replica.replica_id): replica for replica in candidate_replicas}
        tiers = adapter_tiers(
            [(name, frozenset(replica.multiplexed_model_ids)) for name, replica in by_id.items()],
            key or None,
            waited,
        )
        return [[by_id[name] for name in tier] for tier in tiers]
