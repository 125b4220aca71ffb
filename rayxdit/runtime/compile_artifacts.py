"""Compile artifacts shared across a cluster's nodes, so a replica on a node it has never run on does not
compile from scratch.

torch.compile keeps what it compiles (inductor's graphs, AOTAutograd entries, Triton kernels, autotuning
results) in a cache on the node's disk: a replica restarted on the same node compiles from it (measured on
one H200, Flux.1-dev shape at 1024 px: 25.5 s cold, 9.4 s from a warm cache). A node the autoscaler just
added, or one an elastic reshape lands on, has an empty cache. PyTorch's "mega-cache"
(``torch.compiler.save_cache_artifacts``/``load_cache_artifacts``) packs one process's artifacts into one
blob (7.5 MiB for that model) and unpacks it into another node's cache, which then compiles as a warm one
does (7.9 s measured).

Here one detached actor per cluster (:class:`ArtifactStore`, no CPU reserved) keeps the blobs, by engine
configuration and by each rank's fingerprint (its place in the group, torch version and device): a pool
replica loads its ranks' blobs before it warms up and, after, publishes what its ranks hold if the store
had none. Artifacts that do not fit (another torch, another GPU) are never offered: the fingerprint differs.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import ray

from rayxdit.config import EngineConfig
from rayxdit.runtime.executor import Executor
from rayxdit.runtime.placement import ON_THE_HEAD

logger = logging.getLogger("rayxdit.runtime")

STORE_NAME = "rayxdit-compile-artifacts"
STORE_NAMESPACE = "rayxdit"
STORE_BUDGET_BYTES = 2 * 2**30
"""The store drops the least recently used engine's blobs beyond this (a Flux.1-dev rank's: 7.5 MiB)."""


@ray.remote(num_cpus=0)
class ArtifactStore:
    """Compile-artifact blobs by engine key, then by rank fingerprint; least recently used engines go
    first past :data:`STORE_BUDGET_BYTES`."""

    def __init__(self, budget_bytes: int = STORE_BUDGET_BYTES):
        self.budget_bytes = budget_bytes
        self.blobs: OrderedDict[str, dict[str, bytes]] = OrderedDict()

    def get(self, engine_key: str) -> dict[str, bytes]:
        if engine_key in self.blobs:
            self.blobs.move_to_end(engine_key)
        return dict(self.blobs.get(engine_key, {}))

    def fingerprints(self, engine_key: str) -> set[str]:
        """The ranks whose blobs the store holds for ``engine_key`` (without sending the blobs)."""
        return set(self.blobs.get(engine_key, {}))

    def put(self, engine_key: str, blobs: dict[str, bytes]) -> None:
        self.blobs[engine_key] = {**self.blobs.get(engine_key, {}), **blobs}
        self.blobs.move_to_end(engine_key)
        while len(self.blobs) > 1 and self.size() > self.budget_bytes:
            self.blobs.popitem(last=False)

    def size(self) -> int:
        return sum(len(blob) for blobs in self.blobs.values() for blob in blobs.values())


def artifact_store() -> ray.actor.ActorHandle:
    """The cluster's store, started by the first replica that asks (it outlives every replica), on the head
    node (:data:`~rayxdit.runtime.placement.ON_THE_HEAD`: placed by Ray's default, it could land on the GPU
    node of the first replica that asked, which then stayed bought for good)."""
    return ArtifactStore.options(
        name=STORE_NAME,
        namespace=STORE_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        **ON_THE_HEAD,
        # Not in the placement group of the replica that asks first (Serve's capture it children, as the rank
        # actors must be): that group goes with the replica, and would take the store with it.
        scheduling_strategy="DEFAULT",
    ).remote()


def engine_key(engine: EngineConfig) -> str:
    """Everything about the engine that changes what torch.compile makes (model, parallel layout, dtype,
    attention kernel, add-ons)."""
    return hashlib.sha256(engine.model_dump_json().encode()).hexdigest()[:32]


async def load_artifacts(executor: Executor, engine: EngineConfig) -> int:
    """Give every rank the store's blobs for ``engine``; returns how many ranks loaded one (0: the store had
    none that fit, and the ranks compile as they would have)."""
    blobs = await artifact_store().get.remote(engine_key(engine))
    if not blobs:
        return 0
    loaded = await executor.collective_rpc_async("load_compile_artifacts", (blobs,))
    return sum(loaded)


async def publish_artifacts(executor: Executor, engine: EngineConfig) -> int:
    """After a warm-up: put the ranks' blobs in the store unless it holds them for every rank already.
    Returns the bytes published (0: nothing new)."""
    store = artifact_store()
    key = engine_key(engine)
    held = await store.fingerprints.remote(key)
    made = await executor.collective_rpc_async("compile_artifacts", ())
    new = {fingerprint: blob for fingerprint, blob in filter(None, made) if fingerprint not in held}
    published = sum(map(len, new.values()))
    if new:
        await store.put.remote(key, new)
        logger.info("published compile artifacts of %d rank(s) (%d bytes)", len(new), published)
    return published
