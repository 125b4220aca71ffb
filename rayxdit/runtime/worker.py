"""One rank of a worker group: joins the group's process group, owns the engine, answers the executor.

Every per-rank operation is a method of :class:`RankWorker`, declared once here. Executors host one worker
per rank (a spawned process or a Ray actor) and reach it only through ``collective_rpc(method, args)``; a
new operation (warm-up, cancel, metrics, profile) is one method here and works under both executors.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from rayxdit.config import EngineConfig
from rayxdit.request import EncodedResult, GenerateRequest

if TYPE_CHECKING:
    from torch.distributed import TCPStore

    from rayxdit.engine import Engine

CONTROL_METHODS = frozenset({"ping"})
"""Methods a rank answers while another call runs (health checks must not wait for a request); every
executor gives them a path of their own."""


class RankWorker:
    """One rank. Created by an executor inside the process or actor that owns the rank's device; by then Ray
    has set ``CUDA_VISIBLE_DEVICES`` (``device_index`` 0) or the local executor picks GPU ``rank``."""

    def __init__(self, rank: int, world_size: int, device_index: int, env: dict[str, str] | None = None):
        # Forwarded by the executor (HF_TOKEN, HF_HOME, proxies, NCCL settings) before anything reads them.
        os.environ.update(env or {})
        self.rank = rank
        self.world_size = world_size
        self.device_index = device_index
        self.device: str | None = None
        self.engine: Engine | None = None
        self._store: TCPStore | None = None

    def open_rendezvous(self, host: str | None, timeout_s: float) -> tuple[str, int]:
        """Rank 0: the group's rendezvous store on a port the OS picks and this process holds from then on
        (nothing can take it between choosing and binding). ``host`` None: this node's Ray address."""
        from rayxdit.parallel.mesh import open_store

        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        self._store = open_store(host, self.world_size, timeout_s)
        return host, self._store.port

    def init_distributed(self, host: str, port: int, timeout_s: float) -> str:
        """Collective: join the default process group at rank 0's store. Returns the device used."""
        from rayxdit.engine import pick_device
        from rayxdit.parallel.mesh import init_distributed

        device = pick_device(self.device_index)
        init_distributed(self.rank, self.world_size, device, host, port, timeout_s, store=self._store)
        self.device = str(device)
        return self.device

    def load(self, config: EngineConfig) -> None:
        """Collective: build the mesh and load the model with its parallelism applied."""
        import torch

        from rayxdit.engine import Engine
        from rayxdit.parallel.mesh import build_parallel_state

        device = torch.device(self.device or "cpu")
        self.engine = Engine(config, build_parallel_state(config.parallel, device))

    def generate(
        self, request: GenerateRequest, output: str = "pil", progress: bool = False
    ) -> EncodedResult | None:
        """Collective: every rank gets the same request; rank 0 returns the PNG-encoded result (or, with
        ``output="latent"``, the final latents), the others None."""
        assert self.engine is not None, "load() first"
        result = self.engine.generate(request, output=output, progress=progress)
        return result.encode() if result is not None else None

    def ping(self) -> int:
        """Liveness: the rank's process id."""
        return os.getpid()

    def close(self) -> None:
        """Leave the process group (the process or actor ends right after)."""
        from rayxdit.parallel.mesh import destroy_distributed

        destroy_distributed()
