"""The PipeFusion denoising loop, for any family that implements the stage hooks of
:class:`~rayxdit.models.base.DiffusionAdapter` (``pipefusion_attentions``, ``text_tokens``, ``stage_width``,
``stage_forward``); the primitives (stage split, patch plan, buffered attention, stage links) are in
:mod:`rayxdit.parallel.pipefusion`.

Each step's units of work flow through the stages: during the first ``warmup_steps`` one unit, the whole
sequence (exact); afterwards one unit per patch, attending to fresh keys/values of the patches already done
this step and one-step-old ones for the rest. The last stage applies the scheduler to each finished unit
and sends its rows back to the first stage, which folds them into its latents before the unit that needs
them. Every rank of a stage group ends holding its own tokens' final rows; they are gathered at the end.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from rayxdit.models.base import DiffusionAdapter, steps_alone
from rayxdit.models.running import RunningRequest
from rayxdit.parallel.cfg import guided_prediction
from rayxdit.parallel.pipefusion import WARMUP, PatchPlan, StageLink, allocate_kv_buffers, release_kv_buffers
from rayxdit.parallel.sequence import gather_shards
from rayxdit.request import RequestError, RequestStopped


class PipeFusionLoop:
    """One request's PipeFusion denoising on this rank (one stage of one pipeline)."""

    def __init__(self, adapter: DiffusionAdapter, req: RunningRequest, conditions: dict[int, Any]):
        if req.request.image is not None:
            raise RequestError("image: input images are not implemented for PipeFusion", "image")
        self.adapter = adapter
        self.req = req
        self.conditions = conditions
        self.branches = tuple(conditions)
        state = adapter.state
        self.sp = state.axis("sp")
        self.cfg = state.axis("cfg")
        self.link = StageLink(state.axis("pipefusion"))
        self.latents, self.positions = adapter.initial_latents(req)
        text_len = adapter.text_tokens(next(iter(conditions.values())))
        patches = adapter.pipefusion_patches or state.axis("pipefusion").size
        self.plan = PatchPlan(text_len, self.latents.shape[1], patches, self.sp.size)
        self.warmup = max(1, adapter.warmup_steps)
        self.attentions = adapter.pipefusion_attentions()
        allocate_kv_buffers(
            self.attentions,
            len(self.branches),
            self.latents.shape[0],
            adapter.num_heads // state.axis("ulysses").size,
            text_len + self.latents.shape[1],
            adapter.transformer.config.attention_head_dim,
            self.latents,
        )

    def units(self, step: int) -> list[int]:
        """The units of work of ``step``: the whole sequence while warming up, then one per patch."""
        return [WARMUP] if step < self.warmup else list(range(self.plan.patches))

    def index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.adapter.device)

    def receive_rows(self, rows_of: list[int]) -> None:
        """First stage: the last stage's scheduler update of these units' rows."""
        for done in rows_of:
            rows = self.index(self.plan.image(done, self.sp.index))
            shape = (self.latents.shape[0], len(rows), self.latents.shape[2])
            self.latents[:, rows] = self.link.recv_prev(shape, self.latents)

    def run_unit(self, step: int, timestep: torch.Tensor, unit: int, scheduler: Any) -> None:
        """One unit of work through this stage, for every branch; the last stage steps its rows."""
        plan, link, sp = self.plan, self.link, self.sp
        text_index = self.index(plan.text(unit, sp.index))
        image_index = self.index(plan.image(unit, sp.index))
        if link.is_first and step > 0:
            # After warm-up all of the previous step's rows arrive before the first patch.
            previous = self.units(step - 1)
            self.receive_rows([unit] if previous == self.units(step) else previous if unit == 0 else [])
        unit_info = {
            "positions": self.index(plan.group_canonical(unit, range(sp.size))),
            "sizes": tuple(plan.sizes(unit)),
        }
        predictions = {}
        for branch in self.branches:
            if link.is_first:
                x = self.latents.index_select(1, image_index)
            else:
                width = self.adapter.stage_width
                x = link.recv_prev(
                    (self.latents.shape[0], len(text_index) + len(image_index), width), self.latents
                )
            out = self.adapter.stage_forward(
                x,
                timestep,
                self.conditions[branch],
                self.positions,
                self.req,
                text_index,
                image_index,
                {**unit_info, "branch": self.branches.index(branch)},
                link,
            )
            if link.is_last:
                predictions[branch] = out
            else:
                link.send_next(out)
        if link.is_last:
            self.step_rows(step, timestep, image_index, predictions, scheduler)

    def step_rows(
        self,
        step: int,
        timestep: torch.Tensor,
        image_index: torch.Tensor,
        predictions: dict[int, torch.Tensor],
        scheduler: Any,
    ) -> None:
        """Last stage: guidance and the scheduler step on one unit's rows, sent back to the first stage."""
        request = self.req.request
        noise = guided_prediction(
            predictions, self.cfg, self.adapter.uses_cfg(request), self.adapter.cfg_scale(request)
        )
        # A first-order scheduler updates element-wise: step each unit's rows with this step's sigmas.
        scheduler._step_index = step
        rows = scheduler.step(noise, timestep, self.latents.index_select(1, image_index), return_dict=False)[
            0
        ]
        self.latents[:, image_index] = rows
        self.link.send_next(rows)

    def settle(self, step: int) -> None:
        """Before leaving the loop at ``step`` (its end, or a stop): the first stage takes the rows of the
        previous step still in flight from the last stage, and every stage's sends complete, so nothing of
        this request is left in a link for the next one to receive."""
        if self.link.is_first and step > 0:
            self.receive_rows(self.units(step - 1))
        self.link.drain()

    def gathered(self) -> torch.Tensor:
        """Every rank of a stage group holds its own tokens' final rows: gather them in token order."""
        plan, sp = self.plan, self.sp
        mine = self.index(plan.image(WARMUP, sp.index))
        sizes = [len(plan.image(WARMUP, rank)) for rank in range(sp.size)]
        gathered = gather_shards(self.latents.index_select(1, mine), 1, sp, sizes)
        order = torch.cat([self.index(plan.image(WARMUP, rank)) for rank in range(sp.size)])
        final = torch.empty_like(self.latents)
        final[:, order] = gathered
        return final

    def run(self) -> torch.Tensor:
        """Denoise; the full final latents on every rank."""
        adapter = self.adapter
        scheduler, timesteps = adapter.make_scheduler(self.req, self.latents.shape[1])
        if not steps_alone(scheduler):
            raise RequestError(
                f"scheduler: PipeFusion steps each patch of the image apart; {type(scheduler).__name__} "
                "keeps a history of steps (or calls the model twice a step): use 'euler'",
                "scheduler",
            )
        show = self.req.progress and adapter.state.is_driver
        try:
            for step, timestep in enumerate(tqdm(timesteps, disable=not show, desc="denoise", unit="step")):
                try:
                    self.req.control.check(step, len(timesteps))
                except RequestStopped:
                    self.settle(step)
                    raise
                for unit in self.units(step):
                    self.run_unit(step, timestep, unit, scheduler)
            self.settle(len(timesteps))
        finally:
            release_kv_buffers(self.attentions)
        return self.gathered()
