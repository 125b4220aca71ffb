"""The samplers a request may choose (``scheduler``), as plain data: no torch, no diffusers.

Each entry names a diffusers scheduler class and the options that make it fit a family's prediction:
flow-matching families (Flux, SD3, Wan) predict a velocity, SDXL predicts noise. A request that names no
scheduler runs the checkpoint's own (its ``scheduler/scheduler_config.json``, class and options as saved).
The HTTP ingress, the CLI and the batch driver validate the name with a model's
:class:`~rayxdit.limits.ModelLimits` (``schedulers``); the ranks build the scheduler from the same entry
(``rayxdit.models.base``), so both sides offer the same list.

Every sampler here is deterministic: each rank steps its own shard of the latents, element-wise, and gets
the single rank's numbers. Ancestral and SDE samplers are left out on purpose: they draw fresh noise in
every step, and a shard drawing its own noise would not be the single-GPU image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FLOW, NOISE = "flow", "noise"
"""What a family's denoiser predicts: a flow-matching velocity, or the noise (epsilon)."""


@dataclass(frozen=True)
class Sampler:
    """One offered sampler: a diffusers scheduler class with the options the family's prediction needs."""

    name: str
    scheduler_class: str
    """The diffusers class, built with ``from_config(checkpoint's scheduler config, **options)``."""
    prediction: str
    options: dict[str, Any] = field(default_factory=dict)
    single_step: bool = False
    """One model call per step and no history of earlier steps: PipeFusion, which steps each patch of the
    image on its own, can run it."""
    takes_shift: bool = True
    """Whether its ``set_timesteps`` takes Flux's resolution-dependent shift (``mu``); a checkpoint with
    dynamic shifting is offered only samplers that do."""
    shift_key: str | None = None
    """Flow samplers: the option holding the timestep shift (``shift`` for the flow-matching schedulers,
    ``flow_shift`` for the multistep solvers), carried over from a checkpoint of another class."""
    description: str = ""


_FLOW_SOLVER = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
_MATCHING, _SOLVER = "shift", "flow_shift"
SAMPLERS: tuple[Sampler, ...] = (
    Sampler(
        "euler",
        "FlowMatchEulerDiscreteScheduler",
        FLOW,
        single_step=True,
        shift_key=_MATCHING,
        description="flow-matching Euler (Flux's, SD3's)",
    ),
    Sampler(
        "heun",
        "FlowMatchHeunDiscreteScheduler",
        FLOW,
        takes_shift=False,
        shift_key=_MATCHING,
        description="flow-matching Heun: second order, two model calls per step",
    ),
    Sampler(
        "dpm++2m",
        "DPMSolverMultistepScheduler",
        FLOW,
        {**_FLOW_SOLVER, "algorithm_type": "dpmsolver++", "solver_order": 2},
        shift_key=_SOLVER,
        description="DPM-Solver++ 2M in its flow variant",
    ),
    Sampler(
        "unipc",
        "UniPCMultistepScheduler",
        FLOW,
        _FLOW_SOLVER,
        shift_key=_SOLVER,
        description="UniPC in its flow variant",
    ),
    Sampler("euler", "EulerDiscreteScheduler", NOISE, single_step=True, description="Euler (SDXL's)"),
    Sampler(
        "dpm++2m",
        "DPMSolverMultistepScheduler",
        NOISE,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        description="DPM++ 2M",
    ),
    Sampler(
        "dpm++2m-karras",
        "DPMSolverMultistepScheduler",
        NOISE,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        description="DPM++ 2M with Karras sigmas",
    ),
    Sampler("unipc", "UniPCMultistepScheduler", NOISE, description="UniPC"),
    Sampler(
        "ddim",
        "DDIMScheduler",
        NOISE,
        # Latents are not images: DDIM's default clipping of its x0 estimate to [-1, 1] would ruin them
        # (SD and SDXL checkpoints' own DDIM configs turn it off too).
        {"clip_sample": False},
        single_step=True,
        description="DDIM (eta 0)",
    ),
)
"""Every offered sampler; a name means one sampler per prediction kind."""


def sampler(name: str, prediction: str) -> Sampler:
    """The sampler ``name`` for a family of this prediction; KeyError when there is none."""
    for entry in SAMPLERS:
        if entry.name == name and entry.prediction == prediction:
            return entry
    raise KeyError(name)


def offered(prediction: str, checkpoint_config: dict[str, Any]) -> tuple[str, ...]:
    """The sampler names a checkpoint of this prediction kind can run, from its scheduler config."""
    shifting = bool(checkpoint_config.get("use_dynamic_shifting"))
    return tuple(
        entry.name
        for entry in SAMPLERS
        if entry.prediction == prediction and (entry.takes_shift or not shifting)
    )


def own_sampler(prediction: str, checkpoint_config: dict[str, Any]) -> str | None:
    """The name of the checkpoint's own scheduler when it is one of ours with our options (Wan's UniPC,
    Flux's Euler), else None: the checkpoint's scheduler is still what a request without a name runs."""
    class_name = checkpoint_config.get("_class_name")
    for entry in SAMPLERS:
        fits = all(checkpoint_config.get(key) == value for key, value in entry.options.items())
        if entry.prediction == prediction and entry.scheduler_class == class_name and fits:
            return entry.name
    return None


def options_from(checkpoint_config: dict[str, Any], entry: Sampler) -> dict[str, Any]:
    """``from_config`` overrides that carry the checkpoint's shift into a sampler of another class: the
    flow-matching schedulers call it ``shift``, the multistep solvers ``flow_shift``."""
    options = dict(entry.options)
    shift = checkpoint_config.get(_MATCHING, checkpoint_config.get(_SOLVER))
    if entry.shift_key is not None and shift is not None:
        options[entry.shift_key] = shift
    return options
