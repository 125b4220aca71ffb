"""LoRA adapters per request: read once, kept on the device, fused into the weights for the requests that
name them, and taken out exactly.

Why fused and not run beside the weights: an unfused rank-64 adapter on every linear layer of Flux costs
10-16% of every step (measured on one H200; issue 27); fused, a request runs at the plain model's speed,
and only a change of adapters costs anything. A change restores the touched weights from exact copies
(taken the first time an adapter touches a layer) and adds the new adapters' updates with the arithmetic
of diffusers' ``fuse_lora`` (peft's ``merge``: ``W += (B @ A) * scaling``, one adapter after the other), so
a request with adapter X gets the weights a model fused with X at load has, and after any number of swaps
the plain model's weights are bit-identical to a fresh load. Weights change in place: compiled graphs
read them as inputs and are not traced again.

Which layers an adapter names is checked against the model as loaded (names and shapes recorded before
parallelism is applied): a PipeFusion stage updates only its own blocks, every other parallel method
replicates the weights, so each rank adds the same update to its copy. Reading and checking happen on
every rank alike before any collective: an adapter that does not fit is a :class:`RequestError` (HTTP 400)
and the group stays usable.
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rayxdit.loras import LoraNameError, find_lora
from rayxdit.request import LoraChoice, RequestError

PARAM = "loras"


@dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank update: ``down`` (peft's ``lora_A``: ``[r, in]``, convolutions ``[r, in, kh,
    kw]``), ``up`` (``lora_B``: ``[out, r]`` or ``[out, r, 1, 1]``) and ``scaling`` (alpha / r)."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes

    def to(self, device: torch.device, dtype: torch.dtype) -> LoraLayer:
        return LoraLayer(self.down.to(device, dtype), self.up.to(device, dtype), self.scaling)

    def delta(self, weight_shape: torch.Size, scale: float) -> torch.Tensor:
        """The update this layer adds at ``scale``, as peft's ``get_delta_weight`` computes it (half
        precision on the CPU in float32), in the adapter's dtype."""
        down, up, dtype = self.down, self.up, self.up.dtype
        if down.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            down, up = down.float(), up.float()
        scaling = self.scaling * scale
        if len(weight_shape) == 2:
            delta = (up @ down) * scaling
        elif tuple(weight_shape[2:4]) == (1, 1):
            delta = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(
                3
            ) * scaling
        else:
            delta = torch.nn.functional.conv2d(down.transpose(0, 1), up).transpose(0, 1) * scaling
        return delta.to(dtype)


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter's layers by their module's name in the pipeline (``transformer.blocks.0.attn1.to_q``)."""

    name: str
    layers: dict[str, LoraLayer]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())


def _unpack(loaded: object) -> tuple[dict, dict | None, dict | None]:
    """``lora_state_dict``'s answer, whose shape differs by pipeline: (state dict, network alphas or None,
    metadata or None)."""
    if not isinstance(loaded, tuple):
        return loaded, None, None
    if len(loaded) == 3:
        return loaded[0], loaded[1], loaded[2]
    return loaded[0], None, loaded[1]


def read_lora(
    pipeline_class: type, path: Path, name: str, components: Sequence[str], layers_known: Collection[str] = ()
) -> LoraAdapter:
    """Adapter ``name`` from the weights file ``path`` in any layout diffusers' loaders for
    ``pipeline_class`` read (diffusers', Kohya's, XLabs', BFL's...), with the ranks and alphas diffusers
    would give its peft layers. Only ``components`` (the denoisers and text encoders) may be adapted. A text
    encoder's layers are named as in ``layers_known`` (transformers' CLIP may or may not nest them under
    ``text_model``). CPU tensors as saved. Raises :class:`RequestError` naming the adapter."""
    from diffusers.loaders.peft import _create_lora_config  # diffusers is pinned to 0.42.x (pyproject)
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from peft.utils.other import get_pattern_key

    kwargs: dict = {"weight_name": path.name, "return_lora_metadata": True}
    if "return_alphas" in inspect.signature(pipeline_class.lora_state_dict).parameters:
        kwargs["return_alphas"] = True
    try:
        state_dict, alphas, metadata = _unpack(pipeline_class.lora_state_dict(str(path.parent), **kwargs))
    except Exception as error:  # any failure to read is the adapter's: a 400, never a broken group
        raise RequestError(
            f"loras: '{name}' is not a LoRA {pipeline_class.__name__} reads ({error})", PARAM
        ) from None
    layers: dict[str, LoraLayer] = {}
    seen = 0
    for component in components:
        prefix = f"{component}."
        part = {
            key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)
        }
        if not part:
            continue
        seen += len(part)
        text_encoder = component.startswith("text_encoder")
        if text_encoder:  # as diffusers loads a text encoder's layers
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
            part = {_text_model_key(component, key, layers_known): value for key, value in part.items()}
        elif "lora_A" not in next(iter(part)):
            part = convert_unet_state_dict_to_peft(part)
        odd = [
            key for key in part if (".lora_A." not in key and ".lora_B." not in key) or key.endswith(".bias")
        ]
        if odd:
            raise RequestError(
                f"loras: '{name}' holds {odd[0]} (DoRA, LoKr, biases and other variants are not served; plain "
                "LoRA layers are)",
                PARAM,
            )
        ranks = {  # keyed as diffusers keys them for each kind of component
            (key if text_encoder else f"^{key}"): value.shape[1]
            for key, value in part.items()
            if "lora_B" in key and value.ndim > 1
        }
        component_alphas = {
            key.removeprefix(prefix): value for key, value in (alphas or {}).items() if key.startswith(prefix)
        }
        component_metadata = (
            {key.removeprefix(prefix): value for key, value in metadata.items() if key.startswith(prefix)}
            if metadata
            else None
        )
        config = _create_lora_config(
            part, component_alphas or None, component_metadata, ranks, is_unet=not text_encoder
        )
        for key, down in part.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            up = part.get(f"{module}.lora_B.weight")
            if up is None:
                raise RequestError(f"loras: '{name}' has lora_A of {module} without its lora_B", PARAM)
            rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
            alpha = config.alpha_pattern.get(
                get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
            )
            scaling = alpha / rank**0.5 if config.use_rslora else alpha / rank
            layers[f"{component}.{module}"] = LoraLayer(down, up, scaling)
    if seen < len(state_dict):
        others = sorted({key.split(".")[0] for key in state_dict if key.split(".")[0] not in components})
        raise RequestError(
            f"loras: '{name}' adapts {', '.join(others)}; adapters apply to {', '.join(components)} only",
            PARAM,
        )
    if not layers:
        raise RequestError(f"loras: '{name}' holds no LoRA layers", PARAM)
    return LoraAdapter(name, layers)


def _text_model_key(component: str, key: str, layers_known: Collection[str]) -> str:
    """``key`` with or without CLIP's ``text_model.`` prefix, whichever names a layer the model has (older
    checkpoints nest it, recent transformers flatten the model)."""
    module = key.split(".lora_")[0]
    for candidate in (module, module.removeprefix("text_model."), f"text_model.{module}"):
        if f"{component}.{candidate}" in layers_known:
            return key.replace(module, candidate, 1)
    return key


@dataclass(frozen=True)
class _Target:
    """A layer an adapter may update, as loaded: its weight's shape, and the module while this rank keeps it
    (PipeFusion drops other stages' blocks; the reference then dies with them)."""

    shape: torch.Size
    module: weakref.ref


class LoraWeights:
    """The model's weights as the current request's adapters want them, and the adapters kept for it.

    Made before parallelism is applied (it records every Linear and Conv2d of ``components`` by name);
    :meth:`apply` then brings the weights to a request's adapters: nothing when they are the current ones,
    else the touched weights back to their exact copies and the new updates added. Adapters are read from
    ``sources`` on first use and kept on the device, the ``resident`` most recently used ones; the files'
    tensors as read stay in a host cache of ``host_bytes``."""

    def __init__(
        self,
        pipeline: nn.Module | object,
        components: Sequence[str],
        sources: Sequence[str],
        max_rank: int,
        resident: int,
        host_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.pipeline_class = type(pipeline)
        self.components = tuple(components)
        self.sources = tuple(sources)
        self.max_rank = max_rank
        self.resident = resident
        self.host_bytes = host_bytes
        self.device, self.dtype = device, dtype
        self.targets: dict[str, _Target] = {}
        for component in self.components:
            for name, module in getattr(pipeline, component).named_modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    self.targets[f"{component}.{name}"] = _Target(module.weight.shape, weakref.ref(module))
        self.originals: dict[str, torch.Tensor] = {}
        """Exact copies of the weights adapters have touched, taken before the first update."""
        self.dirty: set[str] = set()
        """The weights the applied adapters changed (the next change restores only these)."""
        self.applied: tuple[tuple[str, float], ...] | None = ()
        """The adapters (name, scale) in the weights now; None when an update failed midway (the next
        :meth:`apply` restores every touched weight first)."""
        self.on_device: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.on_host: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.counts = {"device_loads": 0, "host_loads": 0, "disk_loads": 0, "swaps": 0}
        """Adapters requests needed, by where they were found (device, host memory, disk), and swaps."""

    # ----- adapters -----------------------------------------------------------------------------------------
    def adapter(self, name: str) -> LoraAdapter:
        """Adapter ``name`` on the device, checked against the model (read from its source, or the host cache,
        on a miss). Raises :class:`RequestError`."""
        if name in self.on_device:
            self.on_device.move_to_end(name)
            self.counts["device_loads"] += 1
            return self.on_device[name]
        read = self.on_host.pop(name, None)
        if read is None:
            try:
                path = find_lora(self.sources, name)
            except LoraNameError as error:
                raise RequestError(f"loras: {error}", PARAM) from None
            read = read_lora(self.pipeline_class, path, name, self.components, self.targets)
            self.check(read)
            self.counts["disk_loads"] += 1
        else:
            self.counts["host_loads"] += 1
        self._keep_on_host(read)
        placed = LoraAdapter(
            name, {key: layer.to(self.device, self.dtype) for key, layer in read.layers.items()}
        )
        self.on_device[name] = placed
        while len(self.on_device) > self.resident:
            self.on_device.popitem(last=False)
        return placed

    def _keep_on_host(self, read: LoraAdapter) -> None:
        if read.nbytes > self.host_bytes:
            return
        self.on_host[read.name] = read
        while sum(adapter.nbytes for adapter in self.on_host.values()) > self.host_bytes:
            self.on_host.popitem(last=False)

    def check(self, adapter: LoraAdapter) -> None:
        """Refuse (RequestError) an adapter that does not fit the model: an unknown layer, shapes of another
        base model, a rank above ``max_rank``."""
        if adapter.rank > self.max_rank:
            raise RequestError(
                f"loras: '{adapter.name}' has rank {adapter.rank}, above this pool's lora_max_rank {self.max_rank}",
                PARAM,
            )
        for key, layer in adapter.layers.items():
            target = self.targets.get(key)
            if target is None:
                raise RequestError(
                    f"loras: '{adapter.name}' adapts {key}, which this model does not have", PARAM
                )
            out_features, in_features = target.shape[0], target.shape[1]
            kernel = tuple(target.shape[2:])
            if (
                layer.down.shape[1] != in_features
                or layer.up.shape[0] != out_features
                or layer.up.shape[1] != layer.rank
                or tuple(layer.down.shape[2:]) != kernel
            ):
                raise RequestError(
                    f"loras: '{adapter.name}' does not fit this model: {key} is {tuple(target.shape)}, the adapter's "
                    f"layers are {tuple(layer.up.shape)} x {tuple(layer.down.shape)} (another base model?)",
                    PARAM,
                )

    # ----- the weights ------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, choices: Sequence[LoraChoice]) -> bool:
        """Bring the weights to ``choices`` (in order: updates are added one adapter after the other, as
        diffusers fuses several). Returns whether anything changed. Every adapter is read and checked before
        a weight changes."""
        wanted = tuple((choice.name, choice.scale) for choice in choices)
        if wanted == self.applied:
            for name, _ in wanted:  # keep them the most recently used
                if name in self.on_device:
                    self.on_device.move_to_end(name)
                    self.counts["device_loads"] += 1
            return False
        adapters = [(self.adapter(name), scale) for name, scale in wanted]
        # Unknown after a failed update (None): every weight ever touched goes back.
        dirty = self.originals.keys() if self.applied is None else self.dirty
        self.applied = None
        restore = [(self.targets[key].module(), self.originals[key]) for key in dirty]
        restore = [(module.weight, original) for module, original in restore if module is not None]
        if restore:  # one batch of copies: no launch per layer
            torch._foreach_copy_([weight for weight, _ in restore], [original for _, original in restore])
        self.dirty = set()
        for adapter, scale in adapters:
            for key, layer in adapter.layers.items():
                module = self.targets[key].module()
                if module is None:  # another PipeFusion stage's block
                    continue
                if key not in self.originals:
                    self.originals[key] = module.weight.detach().clone()
                self.dirty.add(key)
                module.weight.add_(layer.delta(module.weight.shape, scale).to(module.weight.dtype))
        self.applied = wanted
        self.counts["swaps"] += 1
        return True

    @property
    def resident_bytes(self) -> int:
        """Bytes this rank holds for adapters: those on the device and the exact copies of touched weights."""
        adapters = sum(adapter.nbytes for adapter in self.on_device.values())
        return adapters + sum(original.nbytes for original in self.originals.values())

    @property
    def resident_names(self) -> list[str]:
        """The adapters on the device, least recently used first."""
        return list(self.on_device)
