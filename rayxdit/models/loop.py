"""The standard sharded denoising loop, for every family (PipeFusion's loop is its sibling,
``models/pipefusion.py``; the engine picks one):

    full initial noise, keep this rank's token shard
    -> per step: predict the shard, exchange branches over the cfg group, scheduler step on the shard
    -> gather the shards once (the decode takes the full latents)
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from rayxdit.models.base import DiffusionAdapter
from rayxdit.models.running import RunningRequest
from rayxdit.parallel.cfg import guided_prediction
from rayxdit.parallel.sequence import gather_shards


class StandardLoop:
    """One request's sharded denoising on this rank (cfg x ring x ulysses)."""

    def __init__(self, adapter: DiffusionAdapter, req: RunningRequest, conditions: dict[int, Any]):
        self.adapter = adapter
        self.req = req
        self.conditions = conditions

    def run(self) -> torch.Tensor:
        """Denoise; the full final latents on every rank of the sp group."""
        adapter, req = self.adapter, self.req
        state = adapter.state
        sp = state.axis("sp")
        request = req.request
        branches = tuple(self.conditions)
        latents, positions = adapter.initial_latents(req)
        num_tokens = latents.shape[1]
        token_sizes = adapter.token_sizes(num_tokens, positions)
        start = sum(token_sizes[: sp.index])

        def local(full: torch.Tensor) -> torch.Tensor:  # this rank's token shard of a full [B, tokens, C]
            return full[:, start : start + token_sizes[sp.index]].contiguous()

        latents = local(latents)
        scheduler, timesteps = adapter.make_scheduler(req, num_tokens)
        image = mask = noise = None
        if req.source is not None:  # img2img: start from the image, noised to the first step run
            noise, image = latents, local(req.source.latents)
            mask = None if req.source.mask is None else local(req.source.mask)
            timesteps = adapter.strength_schedule(scheduler, timesteps, req.steps, request.strength)
            first = timesteps[:1].repeat(latents.shape[0])
            latents = adapter.first_latents(
                scheduler, image, first, noise, mask is not None, request.strength
            )
        cache = adapter.step_cache
        if cache is not None:
            cache.start(req.cache_threshold)
        show = req.progress and state.is_driver
        for step, t in enumerate(tqdm(timesteps, disable=not show, desc="denoise", unit="step")):
            req.control.check(step, len(timesteps))
            model_input = adapter.model_input(scheduler, latents, t)
            predictions = {}
            for index, branch in enumerate(branches):
                if cache is not None:
                    cache.begin(branch, first_of_step=index == 0)
                predictions[branch] = adapter.predict(model_input, t, self.conditions[branch], positions, req)
            noise_prediction = guided_prediction(
                predictions, state.axis("cfg"), adapter.uses_cfg(request), adapter.cfg_scale(request)
            )
            stepped = scheduler.step(noise_prediction, t, latents, return_dict=True)
            if step in req.preview_steps and req.preview is not None:  # a streamed request's partial image
                clean = adapter.predicted_clean(scheduler, latents, noise_prediction, stepped)
                if mask is not None:
                    clean = (1 - mask) * image + mask * clean
                req.preview(gather_shards(clean, 1, sp, token_sizes))
            latents = stepped.prev_sample
            if mask is not None:  # inpainting: what is kept is the image, noised to where the loop is
                kept = image
                if step < len(timesteps) - 1:
                    kept = adapter.noised(scheduler, image, timesteps[step + 1 : step + 2], noise)
                latents = (1 - mask) * kept + mask * latents
        return gather_shards(latents, 1, sp, token_sizes)
