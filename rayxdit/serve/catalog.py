"""What the ingress knows of the models it serves: each model's card and pools, the default model of each
kind, and the ``GET /v1/models`` listing. Plain data, built once per router replica from the application's
config and the cards the builder read (no torch, no weights)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rayxdit.config import ConfigError, PoolConfig, ServeConfig
from rayxdit.limits import ModelCard
from rayxdit.loras import list_loras
from rayxdit.serve.api import invalid


class Catalog:
    """The served models, by the name clients use."""

    def __init__(self, config: ServeConfig, cards: dict[str, ModelCard]):
        self.pools: dict[str, PoolConfig] = {pool.name: pool for pool in config.pools}
        self.pools_by_model: dict[str, list[PoolConfig]] = defaultdict(list)
        for pool in config.pools:
            self.pools_by_model[pool.served_model_name].append(pool)
        self.versions: dict[str, dict[str, float]] = defaultdict(dict)
        """Each model's versions, by their ``traffic_weight`` (the same for every pool of a version)."""
        for pool in config.pools:
            self.versions[pool.served_model_name][pool.model_version] = pool.traffic_weight
        self.cards = cards
        videos = [name for name in self.pools_by_model if cards[name].limits.makes_video]
        images = [name for name in self.pools_by_model if name not in videos]
        self.default_model = {"image": (images or videos)[0], "video": (videos or images)[0]}

    def model_named(self, requested: str | None, kind: str) -> str:
        """The served model a request names (``kind``'s default when it names none); 400 when it is not
        served here or makes the other kind of output."""
        model = requested or self.default_model[kind]
        if model not in self.pools_by_model:
            raise invalid(
                f"model '{model}' is not served here; available: {', '.join(self.pools_by_model)}",
                "model",
                "model_not_found",
            )
        makes_video = self.cards[model].limits.makes_video
        if makes_video != (kind == "video"):
            where = "POST /v1/videos" if makes_video else "POST /v1/images/generations"
            raise invalid(
                f"model '{model}' makes {'videos' if makes_video else 'images'}: use {where}",
                "model",
                "model_kind_mismatch",
            )
        return model

    def set_weights(self, weights: dict[str, dict[str, float]]) -> None:
        """New traffic weights for the versions of the models named (others keep theirs)."""
        for model, versions in weights.items():
            served = self.versions.get(model)
            if served is None or set(versions) != set(served):
                raise ConfigError(
                    f"traffic_weights: '{model}' {sorted(versions)} are not the served versions "
                    f"{sorted(served or {})}"
                )
            if any(weight < 0 for weight in versions.values()) or not any(versions.values()):
                raise ConfigError(f"traffic_weights of '{model}': none negative, and one above 0")
        for model, versions in weights.items():
            self.versions[model] = {version: float(weight) for version, weight in versions.items()}

    def version_named(self, model: str, requested: str | None) -> str | None:
        """The version a request pins (None: it pins none); 400 when ``model`` has no such version."""
        if requested is None or requested in self.versions[model]:
            return requested
        raise invalid(
            f"model '{model}' has no version '{requested}'; served: {', '.join(sorted(self.versions[model]))}",
            "model_version",
            "model_version_not_found",
        )

    def engine_of(self, model: str | None, kind: str = "image"):
        """The engine options every pool of ``model`` shares (its ControlNets and IP-Adapter); None for a
        model not served here (:meth:`model_named` answers that)."""
        pools = self.pools_by_model.get(model or self.default_model[kind])
        return pools[0].engine if pools else None

    def listing(self, memory: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """``GET /v1/models``: each model with its limits, adapters and pools (with each pool's ``memory``
        as the state measured it: :meth:`~rayxdit.serve.state.ApplicationState.memory`)."""
        memory = memory or {}
        data = []
        for name, pools in self.pools_by_model.items():
            limits = self.cards[name].limits
            video = (
                {
                    "default_frames": limits.default_frames,
                    "max_frames": limits.max_frames,
                    "frame_multiple": limits.frame_multiple,
                    "fps": limits.fps,
                }
                if limits.makes_video
                else {}
            )
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "owned_by": "rayxdit",
                    "default_size": f"{limits.default_width}x{limits.default_height}",
                    "max_side": limits.max_side,
                    "size_multiple": limits.size_multiple,
                    "default_steps": limits.default_steps,
                    "default_guidance": limits.default_guidance,
                    "schedulers": list(limits.schedulers),
                    "default_scheduler": limits.default_scheduler,
                    "kind": "video" if limits.makes_video else "image",
                    # What a request's `cost` (in its response) and the pools' `route_min_cost` count in.
                    "attention_cost_per_megapixel": limits.attention_cost_per_megapixel,
                    "controlnets": list(pools[0].engine.controlnets),
                    "ip_adapter": pools[0].engine.ip_adapter,
                    "loras": list_loras(pools[0].engine.lora_sources),
                    **video,
                    "versions": [
                        {
                            "version": version,
                            "traffic_weight": weight,
                            "traffic_share": round(weight / sum(self.versions[name].values()), 4),
                            "pools": [pool.name for pool in pools if pool.model_version == version],
                        }
                        for version, weight in sorted(self.versions[name].items())
                    ],
                    "pools": [
                        {
                            "name": pool.name,
                            "model_version": pool.model_version,
                            "ranks": pool.ranks,
                            "parallel": str(pool.engine.parallel),
                            "route_min_cost": pool.route_min_cost,
                            "min_replicas": pool.min_replicas,
                            "max_replicas": pool.max_replicas,
                            "memory": memory.get(pool.name, {"per_rank": None, "max_megapixels": None}),
                        }
                        for pool in pools
                    ],
                }
            )
        return {"object": "list", "data": data}
