"""What every model family provides to the engine: :class:`DiffusionAdapter`, the hooks of the loop.

A model adapter wraps one loaded diffusers pipeline and supplies the family-specific pieces (text encoding,
latent layout, one transformer call, VAE decode, and how parallelism is applied to its plain model). The
loops that call them are the same for every family and live beside it: the standard sharded loop
(``models/loop.py``) and PipeFusion's (``models/pipefusion.py``); the engine picks one.

Every hook takes the :class:`~rayxdit.models.running.RunningRequest`: what belongs to one request lives
there, never on the adapter, which holds only the model, its add-ons and its parallel layout.
"""

from __future__ import annotations

import inspect
import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import diffusers
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents
from PIL import Image

from rayxdit.config import ConfigError, ParallelConfig
from rayxdit.limits import ModelLimits, ResolvedRequest, cfg_scale, uses_cfg
from rayxdit.models.families import Family
from rayxdit.models.host_copy import CopyRead
from rayxdit.models.running import RunningRequest, SourceImage
from rayxdit.models.step_cache import BLOCK_LISTS, FirstBlockCache, apply_first_block_cache
from rayxdit.parallel.cfg import branches_for_rank
from rayxdit.parallel.mesh import ParallelState
from rayxdit.parallel.sequence import split_sizes
from rayxdit.parallel.shard import shard_weights
from rayxdit.parallel.spatial import RowBands, decode_bands, parallelize_vae_decoder
from rayxdit.request import ControlInput, GenerateRequest, RequestError
from rayxdit.schedulers import FLOW, SAMPLERS, options_from, sampler


def scheduler_config(scheduler: Any) -> dict[str, Any]:
    """A scheduler's config as its ``scheduler_config.json`` holds it (the class name included)."""
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


def begin_at(scheduler: Any, index: int) -> None:
    """Start ``scheduler`` at step ``index`` of its schedule (DDIM has no index to set: it reads the
    timestep it is given)."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)


def steps_alone(scheduler: Any) -> bool:
    """Whether ``scheduler`` steps without history and with one model call per step (PipeFusion steps each
    patch of the image apart, so it needs one)."""
    return any(entry.single_step and entry.scheduler_class == type(scheduler).__name__ for entry in SAMPLERS)


def decode_image(data: bytes) -> Image.Image:
    """An input image's bytes (PNG, JPEG, WebP...) as RGB pixels."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def ip_adapter_weights(location: str, default_weight: str) -> tuple[str, str, str]:
    """Where an IP-Adapter's weights are, as diffusers' ``load_ip_adapter`` takes it: (directory or hub id,
    subfolder, weight file name). ``location`` is a weights file (``dir/ip-adapter.safetensors``), a
    directory or hub id holding ``default_weight``, or a hub file or folder path
    (``h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors``, ``h94/IP-Adapter/sdxl_models``)."""
    path = Path(location)
    if path.is_file():
        return str(path.parent), "", path.name
    if path.is_dir() or location.count("/") <= 1:
        return location, "", default_weight
    repo, rest = "/".join(location.split("/")[:2]), location.split("/")[2:]
    if rest[-1].endswith((".safetensors", ".bin")):
        return repo, "/".join(rest[:-1]), rest[-1]
    return repo, "/".join(rest), default_weight


class DiffusionAdapter(ABC):
    """One diffusers pipeline family, adapted to the sharded denoising loop."""

    family: ClassVar[Family]
    """The family's traits as plain data (pipeline class, defaults, heads and blocks): :mod:`rayxdit.models.families`."""
    weights_read_directly: ClassVar[tuple[str, ...]] = ()
    """The transformer's children whose weights the adapter applies itself, not through their ``forward``:
    they stay whole on every rank under ``shard_weights``."""

    def __init__(self, pipeline: Any, model_dir: str | None = None, limits: ModelLimits | None = None):
        self.pipeline = pipeline
        denoiser = getattr(pipeline, self.family.denoiser_subfolder)
        self.limits = limits or self.family.limits_for(
            dict(denoiser.config), scheduler_config(pipeline.scheduler), model_dir
        )
        self.state = ParallelState.single(pipeline.device)
        self.pipefusion_patches = 0
        self.warmup_steps = 1
        self.vae_bands: RowBands | None = None
        self.step_cache: FirstBlockCache | None = None
        self.cache_threshold = 0.0
        """The step cache's threshold for requests that send none (see :meth:`cache_threshold_for`)."""
        self.weights_arriving: CopyRead | None = None
        """The weights' read from the node's host copy (:mod:`rayxdit.models.host_copy`), which may still be
        filling them (its ``wait()`` returns once they are in place); None when they were read from the
        checkpoint or built."""

    # ----- facts about the model --------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.family.heads_in(self.transformer.config)

    @property
    def num_layers(self) -> int:
        return self.family.layers_in(self.transformer.config)

    @property
    def device(self) -> torch.device:
        return self.state.device

    # ----- adapters ---------------------------------------------------------------------------------------
    def load_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Load LoRA adapters with diffusers' own loader and fuse them into the weights. Call before
        :meth:`parallelize`: every parallel method then sees plain (fused) linear layers."""
        if not loras:
            return
        names = []
        for index, (location, _) in enumerate(loras):
            path = Path(location)
            kwargs = {"weight_name": path.name} if path.is_file() else {}
            source = str(path.parent) if path.is_file() else location
            name = f"lora{index}"
            self.pipeline.load_lora_weights(source, adapter_name=name, **kwargs)
            names.append(name)
        self.pipeline.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        self.pipeline.fuse_lora(adapter_names=names)
        self.pipeline.unload_lora_weights()  # the fused weights stay; the PEFT wrappers go

    @property
    def lora_components(self) -> list[str]:
        """The pipeline's components adapters from ``lora_sources`` may update: those diffusers loads LoRA
        layers into for this pipeline (the denoisers; Flux's CLIP and SDXL's two text encoders)."""
        loadable = getattr(type(self.pipeline), "_lora_loadable_modules", [self.family.denoiser_subfolder])
        return [name for name in loadable if getattr(self.pipeline, name, None) is not None]

    def load_ip_adapter(self, location: str, image_encoder: str | None) -> None:
        """An IP-Adapter's weights and image encoder (call before :meth:`parallelize`)."""
        raise ConfigError(f"{self.family.pipeline_class}: IP-Adapters are implemented for Flux and SDXL")

    @property
    def ip_adapter_loaded(self) -> bool:
        """Whether an IP-Adapter is loaded (diffusers registers its image encoder with the pipeline)."""
        return getattr(self.pipeline, "image_encoder", None) is not None

    controlnets: dict[str, torch.nn.Module] = {}  # noqa: RUF012 - replaced per instance by attach_controlnets
    """The ControlNets loaded beside the model, by the name requests use."""

    controlnet_class: ClassVar[str | None] = None
    """diffusers' ControlNet class the family takes (None: no ControlNets)."""

    def attach_controlnets(self, nets: dict[str, torch.nn.Module]) -> None:
        """ControlNets by name, parallelized with the model (call before :meth:`parallelize`)."""
        if self.controlnet_class is None:
            raise ConfigError(f"{self.family.pipeline_class}: ControlNets are implemented for Flux and SDXL")
        for name, net in nets.items():
            if type(net).__name__ != self.controlnet_class:
                raise ConfigError(
                    f"controlnet '{name}' is a {type(net).__name__}; {self.family.pipeline_class} takes "
                    f"{self.controlnet_class}"
                )
            self.check_controlnet(name, net)
        self.controlnets = dict(nets)

    def check_controlnet(self, name: str, net: torch.nn.Module) -> None:
        """Refuse (ConfigError) a ControlNet of the right class that this family cannot run exactly."""
        return  # by default every ControlNet of the family's class runs exactly

    def controlnet_for(self, control: ControlInput) -> str:
        """The name of the ControlNet that reads ``control``'s image; RequestError if none fits."""
        if not self.controlnets:
            raise RequestError("control_image: this model runs without ControlNets", "control_image")
        if control.controlnet is None and len(self.controlnets) > 1:
            raise RequestError(f"controlnet: name one of {', '.join(self.controlnets)}", "controlnet")
        name = control.controlnet or next(iter(self.controlnets))
        if name not in self.controlnets:
            raise RequestError(
                f"controlnet '{name}' is not loaded here; loaded: {', '.join(self.controlnets)}", "controlnet"
            )
        return name

    # ----- quantization -----------------------------------------------------------------------------------
    def quantize(self, method: str) -> None:
        """``fp8``: torchao's float8 dynamic activations with per-row weight scales for the linear layers of
        the transformer blocks (embedders and the output projection stay in the model's dtype). Call before
        :meth:`parallelize` and :meth:`compile`. Refused where the GPU has no float8 tensor cores."""
        if method != "fp8":
            raise ConfigError(f"quantize={method!r}: only fp8 is supported")
        device = next(self.transformer.parameters()).device
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            raise ConfigError(
                f"quantize=fp8 needs an NVIDIA GPU with float8 tensor cores (Ada or Hopper, compute "
                f"capability 8.9+); this rank runs on {where}"
            )
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
        except ImportError as error:
            raise ConfigError(f"quantize=fp8 needs torchao: pip install 'rayxdit[fp8]' ({error})") from None
        in_blocks = {
            id(module)
            for name in BLOCK_LISTS
            if isinstance(blocks := getattr(self.transformer, name, None), torch.nn.ModuleList)
            for module in blocks.modules()
        }

        def eligible(module: torch.nn.Module, _: str) -> bool:  # float8 GEMMs want multiples of 16
            return (
                isinstance(module, torch.nn.Linear)
                and id(module) in in_blocks
                and module.in_features % 16 == 0
                and module.out_features % 16 == 0
            )

        quantize_(
            self.transformer,
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            filter_fn=eligible,
        )

    # ----- step caching -----------------------------------------------------------------------------------
    def enable_step_cache(self, threshold: float) -> None:
        """First-Block Cache around the transformer's blocks (``rayxdit.models.step_cache``), ``threshold``
        by default; after :meth:`parallelize`, before :meth:`compile`."""
        if not hasattr(self.transformer, "transformer_blocks") and not hasattr(self.transformer, "blocks"):
            raise ConfigError(
                f"{self.family.pipeline_class}: step caching needs a transformer (this is a UNet)"
            )
        if self.state.axis("pipefusion").size > 1:
            raise ConfigError("step caching and PipeFusion do not combine exactly; use one of them")
        group = None
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            group = torch.distributed.group.WORLD  # cfg x sp: every rank of this worker group
        self.step_cache = apply_first_block_cache(self.transformer, group)
        self.cache_threshold = threshold

    def cache_threshold_for(self, request: GenerateRequest) -> float:
        """The First-Block Cache threshold ``request`` runs with (0: exact); RequestError when it asks for
        caching on a model that runs without it."""
        if request.cache_threshold is None:
            return self.cache_threshold if self.step_cache is not None else 0.0
        if request.cache_threshold > 0 and self.step_cache is None:
            raise RequestError(
                "cache_threshold: this model runs without step caching (set cache_threshold in its pool or "
                "--cache-threshold to enable it)",
                "cache_threshold",
            )
        return request.cache_threshold

    # ----- parallelism ------------------------------------------------------------------------------------
    def parallelize(
        self,
        state: ParallelState,
        attention: str = "auto",
        pipefusion_patches: int = 0,
        warmup_steps: int = 1,
        vae_parallel: bool = True,
    ) -> None:
        """Apply the parallel methods of ``state`` to the plain model. Call once, before compiling.
        ``attention`` picks the GPU kernel of sequence-parallel attention; ``pipefusion_patches`` (0: one per
        stage) and ``warmup_steps`` (synchronous steps before stale keys/values are used) tune PipeFusion;
        ``vae_parallel`` splits the VAE decode into bands of rows over the sequence-parallel ranks."""
        self._check_parallel(state.config)
        self.state = state
        self.pipefusion_patches = pipefusion_patches
        self.warmup_steps = warmup_steps
        self._parallelize(state, attention)
        if vae_parallel and state.axis("pipefusion").size == 1 and self.supports_vae_bands:
            self.vae_bands = parallelize_vae_decoder(self.pipeline.vae, state.axis("sp"))

    @abstractmethod
    def _parallelize(self, state: ParallelState, attention: str) -> None: ...

    def _check_parallel(
        self, config: ParallelConfig | None = None, shard_weights: bool = False, offload: bool = False
    ) -> None:
        """The model card's :meth:`~rayxdit.limits.ModelCard.check_parallel` (the family's traits, the
        model's heads and blocks) for ``config`` (the group's by default) and the memory modes asked for."""
        denoiser = getattr(self.pipeline, self.family.denoiser_subfolder)
        card = self.family.card("", dict(denoiser.config), self.limits)
        card.check_parallel(config or self.state.config, shard_weights, offload)

    def offload(self) -> None:
        """Keep the pipeline's weights in host memory, each block brought to the device just before it runs
        (diffusers' group offloading; on a CUDA stream, the next block's copy overlaps this one's compute);
        after :meth:`parallelize`."""
        self._check_parallel(offload=True)
        device = self.state.device
        self.pipeline.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=device.type == "cuda",
        )

    def shard_weights(self) -> None:
        """Spread the transformer's weights over the group's ranks (:mod:`rayxdit.parallel.shard`); after
        :meth:`parallelize`. Collective."""
        self._check_parallel(shard_weights=True)
        shard_weights(self.transformer, self.state.world, self.state.device, self.weights_read_directly)

    def compile(self, backend: str = "inductor") -> None:
        """torch.compile the transformer's repeated blocks (regional: one compile per block type).

        Inductor's peak-memory reordering is off: it would move independent work (Flux's MLP branch) past the
        end of an in-flight attention transfer, which is exactly the work meant to hide that transfer.
        ``backend`` other than inductor (``eager``) lets a test count what dynamo traces without compiling.
        """
        # PipeFusion's buffered attention runs outside the graph (one break per block).
        fullgraph = self.state.axis("pipefusion").size == 1
        options = {"options": {"reorder_for_peak_memory": False}} if backend == "inductor" else {}
        compile_repeated_blocks(self.transformer, fullgraph=fullgraph, backend=backend, **options)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    # ----- request handling -------------------------------------------------------------------------------
    def resolve(self, request: GenerateRequest) -> ResolvedRequest:
        """Fill in defaults and check the model's limits; raises :class:`RequestError`."""
        nets = [self.controlnets[self.controlnet_for(control)] for control in request.controls]
        modes = [control.mode for control in request.controls if control.mode is not None]
        # A mode goes to every ControlNet of the request, as in diffusers; only union ones read it.
        if modes and not any(getattr(net, "union", False) for net in nets):
            raise RequestError("control_mode: only union ControlNets take a mode", "control_mode")
        if request.ip_adapter_image is not None and not self.ip_adapter_loaded:
            raise RequestError("ip_adapter_image: this model runs without an IP-Adapter", "ip_adapter_image")
        return self.limits.resolve(request)

    # ----- family-specific steps ----------------------------------------------------------------------------
    @abstractmethod
    def encode(self, req: RunningRequest, branch: int) -> Any:
        """Text conditioning of ``branch`` (CONDITIONAL/UNCONDITIONAL), already sharded for this rank."""

    @abstractmethod
    def initial_latents(self, req: RunningRequest) -> tuple[torch.Tensor, Any]:
        """The full initial noise ``[B, tokens, C]``, identical on every rank (seeded per image), and the
        family's token positions for this rank's shard (passed back to :meth:`predict`). With an input
        image, also sets ``req.source`` (drawing from the same generators in diffusers' order: the image's
        latent sample first, then the noise)."""

    def encode_source(self, req: RunningRequest, generators: list[torch.Generator]) -> SourceImage:
        """The request's image (and mask) as diffusers' img2img and inpainting pipelines prepare them:
        resized to the request's size, one latent sample drawn with the first image's generator (diffusers
        encodes the one input image once and repeats it; before the noise is drawn), in the loop's layout.
        The mask is binarized and resized to the latents (nearest), 1 where the image is repainted."""
        pipe = self.pipeline
        request = req.request
        pixels = pipe.image_processor.preprocess(
            decode_image(request.image), height=req.height, width=req.width
        )
        clean = self.encode_pixels(pixels, generators[0]).repeat(req.batch, 1, 1, 1)
        mask = None
        if request.mask is not None:
            processor = VaeImageProcessor(
                vae_scale_factor=pipe.image_processor.config.vae_scale_factor,
                vae_latent_channels=clean.shape[1],
                do_normalize=False,
                do_binarize=True,
                do_convert_grayscale=True,
            )
            repaint = processor.preprocess(decode_image(request.mask), height=req.height, width=req.width)
            repaint = torch.nn.functional.interpolate(repaint, size=clean.shape[-2:]).to(clean)
            mask = self.latent_tokens(repaint.repeat(req.batch, clean.shape[1], 1, 1))
        return SourceImage(self.latent_tokens(clean), mask)

    def latent_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents ``[B, C, H, W]`` in the loop's layout ``[B, tokens, C']`` (families that take input
        images)."""
        raise NotImplementedError(f"{type(self).__name__} takes no input images")

    def strength_schedule(
        self, scheduler: Any, timesteps: torch.Tensor, steps: int, strength: float
    ) -> torch.Tensor:
        """The tail of the schedule an img2img request runs (diffusers' ``get_timesteps``): the last
        ``int(steps x strength)`` of its ``steps`` steps; the scheduler starts there. Counted in steps, not
        timesteps: Heun has two timesteps a step, PLMS one more at the start."""
        start = self.first_step(steps, strength)
        begin_at(scheduler, start * scheduler.order)
        return timesteps[start * scheduler.order :]

    @staticmethod
    def first_step(steps: int, strength: float) -> int:
        """The schedule's first step an img2img request runs (diffusers' Flux and SD3 pipelines)."""
        return int(max(steps - min(steps * strength, steps), 0))

    def noised(self, scheduler: Any, clean: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor):
        """``clean`` latents noised to ``timestep`` (flow matching: the straight line towards ``noise``; the
        multistep solvers' ``add_noise`` draws the same line on their flow sigmas)."""
        if hasattr(scheduler, "scale_noise"):
            return scheduler.scale_noise(clean, timestep, noise)
        return scheduler.add_noise(clean, noise, timestep)

    def predicted_clean(
        self, scheduler: Any, latents: torch.Tensor, prediction: torch.Tensor, stepped: Any
    ) -> torch.Tensor:
        """This step's prediction of the clean latents (a preview's): what the sampler computed on the way
        (``pred_original_sample``: Euler, DDIM, ...), else for a flow model the straight line back from
        ``latents`` along the velocity ``prediction`` at the step's sigma; else the stepped latents."""
        clean = getattr(stepped, "pred_original_sample", None)
        if clean is not None:
            return clean
        index = getattr(scheduler, "step_index", None)
        if self.family.prediction == FLOW and index and getattr(scheduler, "sigmas", None) is not None:
            return latents - float(scheduler.sigmas[index - 1]) * prediction
        return stepped.prev_sample

    def new_scheduler(self, req: RunningRequest) -> Any:
        """A fresh scheduler for one request: the checkpoint's own, or the sampler the request names
        (:mod:`rayxdit.schedulers`), built from the checkpoint's config."""
        own = self.pipeline.scheduler
        if req.request.scheduler is None:
            return type(own).from_config(own.config)
        entry = sampler(req.request.scheduler, self.family.prediction)
        scheduler_class = getattr(diffusers, entry.scheduler_class)
        # Only the options this class has: diffusers warns of every other key, on every request.
        accepted = inspect.signature(scheduler_class.__init__).parameters
        config = {key: value for key, value in own.config.items() if key in accepted}
        return scheduler_class.from_config(config, **options_from(scheduler_config(own), entry))

    def first_latents(
        self,
        scheduler: Any,
        image: torch.Tensor,
        timestep: torch.Tensor,
        noise: torch.Tensor,
        masked: bool,
        strength: float,
    ) -> torch.Tensor:
        """Where an img2img (or, ``masked``, inpainting) request's loop starts: the image noised to its
        first step."""
        return self.noised(scheduler, image, timestep, noise)

    @abstractmethod
    def make_scheduler(self, req: RunningRequest, num_tokens: int) -> tuple[Any, torch.Tensor]:
        """A fresh scheduler for this request and its timesteps."""

    @abstractmethod
    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor, cond: Any, positions: Any, req: RunningRequest
    ) -> torch.Tensor:
        """The noise prediction of this rank's token shard."""

    @abstractmethod
    def vae_latents(self, latents: torch.Tensor, req: RunningRequest) -> torch.Tensor:
        """Full final latents (the loop's layout) -> the VAE decoder's input ``[B, C, H, W]``, unscaled."""

    supports_vae_bands: ClassVar[bool] = True
    """Whether the VAE is a 2D ``AutoencoderKL`` whose decode can be split into bands of rows."""

    def decode(self, latents: torch.Tensor, req: RunningRequest) -> list | None:
        """Full latents -> PIL images on the driver (None elsewhere). With VAE bands, every rank of the
        driver's sp group decodes its band of rows and the driver gathers them."""
        return self._decoded(self.vae_latents(latents, req))

    def _decoded(self, latents: torch.Tensor) -> list | None:
        """The VAE decoder's input -> PIL images on the driver (None elsewhere); with VAE bands a collective
        of the driver's sp group (its decoder is patched for bands: only this path decodes right)."""
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype)
        bands = self.vae_bands
        if bands is not None and latents.shape[2] >= bands.axis.size:
            rows = split_sizes(latents.shape[2], bands.axis.size)
            start = sum(rows[: bands.axis.index])
            image = decode_bands(vae, bands, latents[:, :, start : start + rows[bands.axis.index]], rows)
        elif self.state.is_driver:
            image = vae.decode(latents, return_dict=False)[0]
        else:
            return None
        if not self.state.is_driver:
            return None
        return self.pipeline.image_processor.postprocess(image, output_type="pil")

    PREVIEW_DOWNSCALE: ClassVar[int] = 2
    """A preview decodes latents pooled this much per side (a quarter of the VAE's work: one full-size decode
    of a 1024px Flux image is ~0.11 s on an H200, 3% of the request), then is resized to the image's size."""
    PREVIEW_POOLED_FROM: ClassVar[int] = 512
    """Images smaller than this (pixels, either side) get previews decoded from their latents as they are:
    cheap already."""

    def preview(self, latents: torch.Tensor, req: RunningRequest) -> list | None:
        """Full predicted clean latents -> PIL preview images of the request's size on the driver (None
        elsewhere), decoded as :meth:`decode` decodes (by the ranks that decode) from latents pooled
        PREVIEW_DOWNSCALE per side."""
        latents = self.vae_latents(latents, req)
        if latents.ndim == 4 and min(req.width, req.height) >= self.PREVIEW_POOLED_FROM:
            latents = torch.nn.functional.avg_pool2d(latents, self.PREVIEW_DOWNSCALE)
        images = self._decoded(latents)
        if images is None:
            return None
        size = (req.width, req.height)
        return [image if image.size == size else image.resize(size) for image in images]

    def decodes_here(self) -> bool:
        """Whether this rank takes part in the decode: the driver, and its sp group under VAE bands."""
        return self.state.is_driver or (self.vae_bands is not None and self.state.axis("cfg").index == 0)

    # ----- PipeFusion stage hooks (families with supports_pipefusion) ---------------------------------------
    def pipefusion_attentions(self) -> list[torch.nn.Module]:
        """The attention modules of this stage's blocks (they get per-request key/value buffers)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement PipeFusion")

    def text_tokens(self, cond: Any) -> int:
        """Text tokens of one branch's conditioning (the sequence is ``[text, image]``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement PipeFusion")

    @property
    def stage_width(self) -> int:
        """Width of the activations passed from stage to stage."""
        raise NotImplementedError(f"{type(self).__name__} does not implement PipeFusion")

    def stage_forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: Any,
        positions: Any,
        req: RunningRequest,
        text_index: torch.Tensor,
        image_index: torch.Tensor,
        unit: dict[str, Any],
        link: Any,
    ) -> torch.Tensor:
        """This stage's blocks on one unit of work: latent rows in (first stage) or the previous stage's
        activations; noise rows out (last stage) or activations for the next stage."""
        raise NotImplementedError(f"{type(self).__name__} does not implement PipeFusion")

    # ----- classifier-free guidance ------------------------------------------------------------------------
    @classmethod
    def uses_cfg(cls, request: GenerateRequest) -> bool:
        """Whether this request runs two branches per step."""
        return uses_cfg(cls.family.guidance_is_cfg, request, cls.family.limits.default_guidance)

    @classmethod
    def cfg_scale(cls, request: GenerateRequest) -> float:
        return cfg_scale(cls.family.guidance_is_cfg, request, cls.family.limits.default_guidance)

    # ----- the loop ---------------------------------------------------------------------------------------
    @staticmethod
    def noise_generators(req: RunningRequest) -> list[torch.Generator]:
        """One CPU generator per image, seeded ``seed + i``: every rank draws the same full noise."""
        return [torch.Generator("cpu").manual_seed(req.request.seed + i) for i in range(req.batch)]

    def generators_after_source(self, req: RunningRequest) -> list[torch.Generator]:
        """The request's noise generators, once its input image (img2img, inpainting) has drawn its latent
        sample from them and set ``req.source``: diffusers draws that sample before the noise."""
        generators = self.noise_generators(req)
        if req.request.image is not None:
            req.source = self.encode_source(req, generators)
        return generators

    def encode_pixels(
        self, pixels: torch.Tensor, generator: Any = None, sample_mode: str = "sample"
    ) -> torch.Tensor:
        """Preprocessed pixels ``[B, 3, H, W]`` -> VAE latents, shifted and scaled as the denoiser takes them
        (a sample drawn with ``generator``: one or one per image; ``argmax``: the mean)."""
        vae = self.pipeline.vae
        encoded = vae.encode(pixels.to(self.device, vae.dtype))
        latents = retrieve_latents(encoded, generator=generator, sample_mode=sample_mode)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).to(self.transformer.dtype)

    def token_sizes(self, num_tokens: int, positions: Any) -> list[int]:
        """Tokens per rank of the sp group (contiguous shards in order). Even by default; families whose
        layers need aligned shards (a UNet's strided convolutions) override it."""
        return split_sizes(num_tokens, self.state.axis("sp").size)

    def model_input(self, scheduler: Any, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The denoiser's input for this step: the latents, scaled where the scheduler wants it."""
        return latents

    def prepare(self, req: RunningRequest) -> None:
        """Set what a request changes on the model's shared modules before its first call (an IP-Adapter's
        scale, which diffusers' processors read from themselves): every request sets it anew, so none sees
        another's. Families with such knobs override it."""
        return

    def encode_branches(self, req: RunningRequest) -> dict[int, Any]:
        """Conditioning of the branches this rank computes (one branch per rank under cfg parallelism)."""
        branches = branches_for_rank(self.state.axis("cfg"), self.uses_cfg(req.request))
        return {branch: self.encode(req, branch) for branch in branches}


def repeated_block_types(model: torch.nn.Module) -> set[str]:
    """The class names of ``model``'s repeated blocks: those diffusers declares (``_repeated_blocks``), else
    (SD3's transformer in diffusers 0.42 declares none) the classes of the blocks in its top-level
    ModuleLists of more than one block (``transformer_blocks``), not of lists deeper down (an attention's
    ``to_out`` is a Linear and a Dropout)."""
    declared = getattr(model, "_repeated_blocks", None)
    if declared:
        return set(declared)
    return {
        type(block).__name__
        for child in model.children()
        if isinstance(child, torch.nn.ModuleList) and len(child) > 1
        for block in child
    }


def compile_repeated_blocks(model: torch.nn.Module, **options: Any) -> None:
    """torch.compile each repeated block of ``model`` in place (regional compilation: one graph per block
    type, as diffusers' ``compile_repeated_blocks``, which refuses a model that declares no block types)."""
    types = repeated_block_types(model)
    if not types:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to compile")
    for module in model.modules():
        if type(module).__name__ in types:
            module.compile(**options)
