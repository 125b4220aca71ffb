"""One rank's engine: the model loaded on this rank's device with the group's parallelism applied.

Each rank's :class:`~rayxdit.runtime.worker.RankWorker` joins the process group, builds the mesh and creates
one ``Engine``; the executor then calls :meth:`Engine.generate` on every rank at once.
"""

from __future__ import annotations

import torch

from rayxdit.config import EngineConfig, parse_lora
from rayxdit.models.base import DiffusionAdapter
from rayxdit.models.registry import component_location, load_adapter, load_controlnets, resolve_dtype
from rayxdit.parallel.control import UNCONTROLLED, StepControl
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import GenerateRequest, GenerateResult


def pick_device(local_index: int) -> torch.device:
    """This rank's device: its GPU when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", local_index % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class Engine:
    """A loaded, parallelized model on one rank."""

    def __init__(self, config: EngineConfig, state: ParallelState):
        self.config = config
        self.state = state
        self.adapter: DiffusionAdapter = load_adapter(
            config.model, state.device, resolve_dtype(config.dtype, state.device)
        )
        # Order matters: LoRAs are fused into plain weights first, parallelism then rewrites attention
        # processors, and compile must see the final modules.
        self.adapter.load_loras([parse_lora(lora) for lora in config.loras])
        if config.controlnets:  # parallelized with the model below
            device, dtype = state.device, resolve_dtype(config.dtype, state.device)
            self.adapter.attach_controlnets(load_controlnets(config.controlnets, device, dtype))
        if config.ip_adapter:  # its attention processors, kept by parallelize below
            self.adapter.load_ip_adapter(
                component_location(config.ip_adapter), config.ip_adapter_image_encoder
            )
        if config.quantize:  # on plain fused weights, before parallelism rewrites the blocks
            self.adapter.quantize(config.quantize)
        self.adapter.parallelize(
            state, config.attention, config.pipefusion_patches, config.warmup_steps, config.vae_parallel
        )
        if config.cache_threshold > 0:  # around the parallel blocks, outside what compile compiles
            self.adapter.enable_step_cache(config.cache_threshold)
        if config.compile:
            self.adapter.compile()

    def generate(
        self,
        request: GenerateRequest,
        output: str = "pil",
        progress: bool = False,
        control: StepControl = UNCONTROLLED,
    ) -> GenerateResult | None:
        """Collective: every rank of the group calls it with the same request; rank 0 gets the result.
        ``control`` may stop it at a step boundary (every rank alike)."""
        return self.adapter.generate(request, output=output, progress=progress, control=control)
