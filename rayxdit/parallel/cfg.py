"""CFG parallelism: the conditional and unconditional branch of one step on different ranks.

Both ranks of a cfg group receive both predictions through one all-gather, then apply the same guidance
formula and scheduler step, so their latents stay identical without any further synchronisation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rayxdit.parallel.mesh import AxisGroup

CONDITIONAL, UNCONDITIONAL = 0, 1


def branches_for_rank(cfg: AxisGroup, use_cfg: bool) -> tuple[int, ...]:
    """Which branches (``CONDITIONAL``/``UNCONDITIONAL``) this rank computes each step."""
    if not use_cfg:
        # Without CFG a cfg=2 group has nothing to split; both ranks compute the conditional branch.
        return (CONDITIONAL,)
    if cfg.size == 1:
        return (CONDITIONAL, UNCONDITIONAL)
    return (cfg.index,)


def exchange_branches(prediction: torch.Tensor, cfg: AxisGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather this rank's branch prediction over the cfg group; returns (conditional, unconditional)."""
    parts = [torch.empty_like(prediction) for _ in range(cfg.size)]
    dist.all_gather(parts, prediction.contiguous(), group=cfg.group)
    return parts[CONDITIONAL], parts[UNCONDITIONAL]


def apply_guidance(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """True classifier-free guidance, written as diffusers' Flux pipeline writes it (same rounding)."""
    return unconditional + scale * (conditional - unconditional)


def guided_prediction(
    predictions: dict[int, torch.Tensor], cfg: AxisGroup, use_cfg: bool, scale: float
) -> torch.Tensor:
    """The noise prediction to step with: this rank's branch predictions (from :func:`branches_for_rank`)
    combined with the other cfg rank's, when CFG is on."""
    if not use_cfg:
        return predictions[CONDITIONAL]
    if cfg.size > 1:
        (mine,) = predictions.values()
        return apply_guidance(*exchange_branches(mine, cfg), scale)
    return apply_guidance(predictions[CONDITIONAL], predictions[UNCONDITIONAL], scale)
