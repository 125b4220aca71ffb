"""One rank of a worker group as a Ray actor: joins the group's process group and runs the engine."""

from __future__ import annotations

import os

import ray

from rayxdit.config import EngineConfig
from rayxdit.request import GenerateRequest, GenerateResult
from rayxdit.runtime.local import encode_images, free_port


class RankWorker:
    """Created by :class:`~rayxdit.runtime.group.WorkerGroup`, one per placement-group bundle. Ray has set
    ``CUDA_VISIBLE_DEVICES`` to this rank's GPU by the time the engine starts, so the device is index 0."""

    def __init__(self, config: EngineConfig, rank: int, collective_timeout_s: float):
        self.config = config
        self.rank = rank
        self.collective_timeout_s = collective_timeout_s
        self.engine = None

    def rendezvous_address(self) -> str:
        """Rank 0's ``tcp://ip:port`` for ``init_process_group``: a free port on the node it runs on."""
        return f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"

    def start(self, init_method: str) -> str:
        """Collective: join the process group, build the mesh, load the model. Returns the device used."""
        from rayxdit.engine import pick_device, start_engine

        device = pick_device(0)
        self.engine = start_engine(self.config, self.rank, init_method, device, self.collective_timeout_s)
        return str(device)

    def generate(self, request: GenerateRequest) -> GenerateResult | None:
        """Collective: every rank gets the same request; rank 0 returns the PNG-encoded result."""
        result = self.engine.generate(request)
        return encode_images(result) if result is not None else None

    def ping(self) -> int:
        return os.getpid()
