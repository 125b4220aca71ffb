"""Decisions every rank of a group must share, made at step boundaries: stop the request or go on.

A rank-local decision would desynchronize collectives (one rank leaves the loop while its peers wait in the
next all-to-all) and hang the group. So each rank looks at its own reasons to stop (a cancel flag set by its
driver, a deadline on its own clock), then the group agrees through one small all-reduce (MAX) over a CPU
group: every rank stops at the same step, and none is left inside a collective. The CPU (gloo) group keeps
the check off the GPU stream: no device synchronization per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from rayxdit.request import CANCELLED, DEADLINE, RequestStopped

_CODES = {None: 0, CANCELLED: 1, DEADLINE: 2}
_REASONS = {code: reason for reason, code in _CODES.items()}


class StepControl:
    """One request's control on one rank. ``stop_reason()`` says why this rank would stop (``None``: go on);
    ``on_step(step, steps)`` hears where the request is (progress).

    Agreement lags one check: check ``k`` starts round ``k`` of the all-reduce asynchronously and decides
    on round ``k - 1``, which every rank started one step earlier, so a check never waits for the slowest
    rank to reach the same boundary (PipeFusion's stages run up to a step apart). Every rank decides on the
    same round, hence alike; :meth:`finish` ends the last round, so no operation outlives the request.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        stop_reason: Callable[[], str | None] = lambda: None,
        on_step: Callable[[int, int], None] | None = None,
    ):
        self.group = group
        self.stop_reason = stop_reason
        self.on_step = on_step
        self._round: tuple[dist.Work, torch.Tensor] | None = None

    def _agreed(self) -> int:
        """The previous round's result (0: nobody wants to stop)."""
        if self._round is None:
            return 0
        work, flag = self._round
        self._round = None
        work.wait()
        return int(flag.item())

    def check(self, step: int, steps: int) -> None:
        """At a step boundary, on every rank alike: raise :class:`RequestStopped` if the group agreed to
        stop (a rank had a reason to at the previous boundary), else go on."""
        if self.on_step is not None:
            self.on_step(step, steps)
        local = _CODES[self.stop_reason()]
        if self.group is None:
            agreed = local
        else:
            agreed = self._agreed()
            if not agreed:
                flag = torch.tensor([local], dtype=torch.int32)
                work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
                self._round = (work, flag)
        if agreed:
            raise RequestStopped(_REASONS[agreed], step)

    def finish(self, steps: int) -> None:
        """After the loop: end the last round; stop (before decoding) if the group agreed to."""
        if self.on_step is not None:
            self.on_step(steps, steps)
        agreed = self._agreed() if self.group is not None else _CODES[self.stop_reason()]
        if agreed:
            raise RequestStopped(_REASONS[agreed], steps)


UNCONTROLLED = StepControl(None)
"""For callers that never stop a request (one-shot CLI runs, benchmarks, tests): no collective."""
