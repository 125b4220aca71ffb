"""One rank's engine: the model loaded on this rank's device with the group's parallelism applied, and the
run of one request through it.

Each rank's :class:`~rayxdit.runtime.worker.RankWorker` joins the process group, builds the mesh and creates
one ``Engine``; the executor then calls :meth:`Engine.generate` on every rank at once. A request runs as

    resolve -> RunningRequest (its own state) -> prepare the shared modules -> encode this rank's branches
    -> the denoising loop (standard, or PipeFusion's) -> decode (bands of rows over the sp group, or rank 0)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from rayxdit.config import EngineConfig, parse_lora
from rayxdit.models.base import DiffusionAdapter
from rayxdit.models.catalog import component_location
from rayxdit.models.host_copy import own_storage
from rayxdit.models.loop import StandardLoop
from rayxdit.models.lora import LoraWeights
from rayxdit.models.pipefusion import PipeFusionLoop
from rayxdit.models.registry import ALL_COMPONENTS, load_adapter, load_controlnets, resolve_dtype
from rayxdit.models.running import RunningRequest
from rayxdit.parallel.control import UNCONTROLLED, StepControl
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import GenerateRequest, GenerateResult, RequestError, preview_steps

ADD_ON_ORDER = (
    "loras",
    "lora_sources",
    "controlnets",
    "ip_adapter",
    "quantize",
    "parallelize",
    "cache_threshold",
    "compile",
)
"""The order in which :class:`Engine` applies the engine's options to the plain model, and why: LoRAs are
fused into plain weights first (every parallel method then sees plain linear layers); ControlNets and the
IP-Adapter join before parallelism, which parallelizes them with the model and keeps the IP-Adapter's
weights in its processors; fp8 quantizes the fused weights before parallelism rewrites the blocks; the step
cache wraps the parallel blocks, outside what compile compiles; compile sees the final modules. Adapters from
``lora_sources`` are per request: the layers they may update are recorded after the load-time LoRAs are fused
(their exact copies include those) and before parallelism (a PipeFusion stage then knows which blocks it
dropped); each request's are fused into the weights right after it is resolved (``models/lora.py``)."""


def pick_device(local_index: int) -> torch.device:
    """This rank's device: its GPU when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", local_index % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def denoise(adapter: DiffusionAdapter, req: RunningRequest, conditions: dict[int, Any]) -> torch.Tensor:
    """The denoising loop the adapter's layout calls for (PipeFusion's with pipefusion stages, else the
    standard sharded loop); the full final latents."""
    loop = PipeFusionLoop if adapter.state.axis("pipefusion").size > 1 else StandardLoop
    return loop(adapter, req, conditions).run()


def cap_memory(device: torch.device, memory_gib: float | None) -> float | None:
    """What a rank on ``device`` may use, in GiB, capped at ``memory_gib`` through the caching allocator's
    per-process fraction (an allocation past it fails as an out-of-memory error does). None on a CPU."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    if memory_gib is None or memory_gib >= total:
        return total
    torch.cuda.set_per_process_memory_fraction(memory_gib / total, device)
    return memory_gib


class Engine:
    """A loaded, parallelized model on one rank."""

    def __init__(self, config: EngineConfig, state: ParallelState):
        self.config = config
        self.state = state
        device, dtype = state.device, resolve_dtype(config.dtype, state.device)
        began = time.perf_counter()
        self.capacity_gib = cap_memory(device, config.memory_gib)
        self.last_request: tuple[float, float] | None = None
        """The last request's work (megapixels x frames x images) and this rank's peak during it (GiB)."""
        # Sharded weights reach the GPU a module's shard at a time: the whole transformer never does.
        on_host = ("transformer",) if config.shard_weights and device.type == "cuda" else ()
        if config.offload:
            on_host = ALL_COMPONENTS
        # Weights from the node's host copy may arrive while the engine is set up and warmed up, unless an
        # add-on reads or changes their values as it loads (LoRAs fused at load, per-request LoRAs, fp8).
        changed_at_load = bool(config.loras or config.lora_sources or config.quantize)
        adapter = self.adapter = load_adapter(
            config.model,
            device,
            dtype,
            on_host,
            config.checkpoint,
            host_copy=config.host_copy,
            defer_weights=not changed_at_load,
        )
        built = _now(device)
        # In ADD_ON_ORDER.
        adapter.load_loras([parse_lora(lora) for lora in config.loras])
        self.loras = (
            LoraWeights(
                adapter.pipeline,
                adapter.lora_components,
                config.lora_sources,
                config.lora_max_rank,
                config.lora_resident,
                int(config.lora_host_cache_gib * 2**30),
                device,
                dtype,
            )
            if config.lora_sources
            else None
        )
        if config.controlnets:
            adapter.attach_controlnets(load_controlnets(config.controlnets, device, dtype))
        if config.ip_adapter:
            adapter.load_ip_adapter(component_location(config.ip_adapter), config.ip_adapter_image_encoder)
        if config.quantize:
            adapter.quantize(config.quantize)
            if adapter.weights_arriving is not None:  # the unquantized weights' buffer goes
                own_storage(adapter.transformer)
        adapter.parallelize(
            state, config.attention, config.pipefusion_patches, config.warmup_steps, config.vae_parallel
        )
        if config.cache_threshold > 0:
            adapter.enable_step_cache(config.cache_threshold)
        if config.shard_weights:
            adapter.shard_weights()
        if config.offload:
            adapter.offload()
        if config.compile:
            adapter.compile()
        self.load_seconds = {"model": round(built - began, 3), "add_ons": round(_now(device) - built, 3)}
        """Seconds of this engine's start: ``model`` (weights read or built, on the device), ``add_ons``
        (LoRAs, ControlNets, IP-Adapter, quantization, parallel processors, step cache, sharded weights;
        compile is lazy), and ``host_copy`` where the weights came from the node's host copy: the seconds of its
        read, once it is done (:meth:`weights_ready`; it may go on after the engine is built)."""
        if changed_at_load:  # load_adapter waited for the host copy's read: its seconds
            self.weights_ready()
        self.resident_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        """What the weights and buffers take on this rank's GPU after the start (None on a CPU)."""

    def weights_ready(self) -> float | None:
        """Wait until every weight is in place (a read from the node's host copy may still be filling them);
        the read's seconds, or None when the weights did not come from a host copy."""
        read = self.adapter.weights_arriving
        if read is None:
            return None
        self.load_seconds["host_copy"] = read.wait()
        return read.seconds

    @torch.inference_mode()
    def generate(
        self,
        request: GenerateRequest,
        output: str = "pil",
        progress: bool = False,
        control: StepControl = UNCONTROLLED,
        on_preview: Callable[[int, list], None] | None = None,
        warm_up: bool = False,
    ) -> GenerateResult | None:
        """Collective: every rank of the group calls it with the same request; rank 0 returns the result.

        ``output="latent"`` returns the final latents instead of images (parity tests compare those).
        ``control`` is checked at every step boundary: when the group agrees to stop, every rank raises
        :class:`~rayxdit.request.RequestStopped` at the same step. ``on_preview(index, images)`` gets, on the
        driver, the request's ``partial_images`` previews as they are made (the standard loop; PipeFusion's
        makes none); they change nothing of the final image. ``warm_up``: a request whose output is thrown away
        (a replica's warm-up, which compiles): it may run while weights are still arriving from the node's
        host copy; every other request waits for them (:meth:`weights_ready`).
        """
        if not warm_up:
            self.weights_ready()
        adapter = self.adapter
        resolved = adapter.resolve(request)
        timings: dict[str, float] = {}
        if self.loras is not None:
            started, before = time.perf_counter(), dict(self.loras.counts)
            if self.loras.apply(request.loras):
                timings["lora_swap_s"] = round(_now(self.state.device) - started, 4)
            for source in ("device", "host", "disk"):
                key = f"{source}_loads"
                timings[f"lora_{key}"] = self.loras.counts[key] - before[key]
            timings["lora_resident_bytes"] = self.loras.resident_bytes
        elif request.loras:
            raise RequestError(
                "loras: this model is served without LoRA sources (set lora_sources in its pool)", "loras"
            )
        req = RunningRequest(
            resolved,
            control=control,
            progress=progress,
            cache_threshold=adapter.cache_threshold_for(request),
        )
        if on_preview is not None and request.partial_images and self.state.config.pipefusion == 1:
            req.preview_steps = preview_steps(req.steps, request.partial_images)
            req.preview = self._previewer(req, on_preview)
        adapter.prepare(req)
        device = self.state.device
        if device.type == "cuda":  # this request's peak, reported with its timings
            torch.cuda.reset_peak_memory_stats(device)
        start = _now(device)
        conditions = adapter.encode_branches(req)
        timings["encode_s"] = _now(device) - start
        start = _now(device)
        latents = denoise(adapter, req, conditions)
        control.finish(req.steps)
        timings["denoise_s"] = _now(device) - start
        timings["steps"] = req.steps  # the resolved count (a request may leave it to the model's default)
        if adapter.step_cache is not None and adapter.step_cache.active:
            timings["cached_steps"] = adapter.step_cache.skipped_steps
        if output == "latent":
            return GenerateResult(latents=latents.cpu(), timings=timings) if self.state.is_driver else None
        if not adapter.decodes_here():
            return None
        start = _now(device)
        images = adapter.decode(latents, req)
        timings["decode_s"] = _now(device) - start
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            self.last_request = (resolved.work, peak)
            timings["peak_memory_gib"] = round(peak, 3)
        if not self.state.is_driver:
            return None
        return GenerateResult(images=images, timings=timings, frames_per_video=req.frames)

    def memory_report(self) -> dict[str, float] | None:
        """This rank's memory in GiB: ``capacity_gib`` (what it may use), ``resident_gib`` (after the start),
        and with the last request finished here, its ``work`` and ``peak_gib``. None on a CPU, which keeps no
        allocator statistics."""
        if self.resident_gib is None or self.capacity_gib is None:
            return None
        report = {"capacity_gib": self.capacity_gib, "resident_gib": self.resident_gib}
        if self.last_request is not None:
            report["work"], report["peak_gib"] = self.last_request
        return report

    def _previewer(self, req: RunningRequest, on_preview: Callable[[int, list], None]):
        """The loop's preview hook: the ranks that decode the image decode the predicted clean latents,
        cheaply (:meth:`~rayxdit.models.base.DiffusionAdapter.preview`), and the driver hands the images to
        ``on_preview``, numbered from 0."""
        made = 0

        def preview(latents: torch.Tensor) -> None:
            nonlocal made
            index, made = made, made + 1
            if not self.adapter.decodes_here():
                return
            images = self.adapter.preview(latents, req)
            if self.state.is_driver and images is not None:
                on_preview(index, images)

        return preview


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
