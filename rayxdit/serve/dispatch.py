"""Running a validated request on a pool: where it goes (the application's state decides and admits it),
the call to the pool's replica with its deadline and a backstop, failover to another pool when one is
full, down or gone, and what the client is told when it fails.

The state decides with the routing policy the application's config names (``serve/policies.py``); the
dispatcher only carries the decision out, and tells the state when the request left its pool (with the
engine's time, from which the pool's service rate is learned).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from rayxdit.config import PoolConfig, TenantLimits
from rayxdit.limits import ResolvedRequest
from rayxdit.loras import adapter_set_key
from rayxdit.request import EncodedResult, GenerateRequest, RequestError, RequestStopped, engine_seconds
from rayxdit.retries import backoff_s
from rayxdit.serve import metrics
from rayxdit.serve.api import (
    ApiError,
    PoolOutOfMemoryError,
    PoolUnavailableError,
    ReplicaQuarantinedError,
    invalid,
)
from rayxdit.serve.catalog import Catalog
from rayxdit.serve.routing import pick_version, request_cost, version_draw
from rayxdit.serve.tasks import ask_state, detached, quiet
from rayxdit.serve.tenants import ANONYMOUS, has_limits

logger = logging.getLogger("ray.serve")
DEADLINE_SLACK_S = 0.25
"""How long past a request's deadline the router still waits for its pool's answer (one already on its way)
before it answers 504 itself; the pool's ranks stop at their next step boundary in the background."""
RENEW_S = 2.0
"""How often a request waiting for its pool renews its reservation in the shared state (which also says
whether the pool still has replicas)."""


GONE_RENEWALS = 2
"""A waiting request is taken back from its pool once this many renewals in a row found it without a
replica."""
RELEASE_WAIT_S = 0.5
"""How long an image waits for the state to count its request out (the release goes on detached)."""
REPLICA_LOSSES_RETRIED = 3
"""A request whose replica died is routed again with that pool still a candidate this many times."""
REPLICA_LOSS_PAUSE_S, REPLICA_LOSS_CAP_S = 2.0, 8.0
"""The pause before routing it again (``retries.backoff_s``: 1-2 s, then 2-4 s, then 4-8 s): Serve's handles
learn of a dead replica within about a second, and until they do they may pick it again; replicas dying
one after another (a node going) are not retried in lockstep by every router."""


def gone_for_good(pool: PoolConfig, seen_gone: int, warm: bool | None, began: float) -> bool:
    """Whether a request waiting for ``pool`` since ``began`` (monotonic) should be taken back, the state
    having found the pool without a replica ``seen_gone`` times in a row: a pool that had replicas when the
    request was routed (``warm``), or a cold one that started none within twice its start-up prior, after
    GONE_RENEWALS such answers (a replica silent for STALE_AFTER_S + RENEW_S: one late heartbeat of a replica
    starved of CPU while it runs this very request must not take the request back)."""
    may_be_gone = warm or time.monotonic() - began > 2 * pool.startup_s
    return bool(may_be_gone) and seen_gone >= GONE_RENEWALS


class Busy(Exception):
    """Background work (a batch's line) found no idle replica, or its tenant over a limit: try again after
    ``wait_s``."""

    def __init__(self, wait_s: float):
        super().__init__(f"no idle replica; again in {wait_s:.1f} s")
        self.wait_s = wait_s


class Preempted(Exception):
    """An online request took the replica of this background work (a batch's line): its ranks stopped at a
    step boundary; run it again later (the same seed makes the same image)."""


PREEMPT_WAIT_S = 10.0
"""How long one call waiting to hear of a preemption lasts (then another is made)."""
BUSY_WAIT_S = 0.5
"""How soon background work asks again for an idle replica."""


class TurnLost(Exception):
    """The state forgot a request waiting in a pool's line (it restarted): route it again."""


class PoolGone(Exception):
    """The pool a request waited for has no replica left; the request goes to another pool."""


class ReplicaDied(PoolGone):
    """The replica running the request died with it. The pool may have others, or a replacement starting
    (Serve starts one at once): the request is routed again with the pool still a candidate
    (:data:`REPLICA_LOSSES_RETRIED` times, :data:`REPLICA_LOSS_PAUSE_S` apart)."""


async def _awaited(response):
    return await response


PartialSink = Callable[[int, bytes], None]
"""Where a streamed request's partial images go as they come: ``(partial_image_index, png)``."""


async def _streamed(response, on_partial: PartialSink) -> EncodedResult:
    """A pool's streamed answer (``generate_stream``): its partial images to ``on_partial``, then the
    result."""
    async for item in response:
        if isinstance(item, EncodedResult):
            return item
        on_partial(item["partial_image_index"], item["png"])
    raise RuntimeError("the pool's stream ended without its result")


def deadline_error(request_id: str) -> ApiError:
    return ApiError(
        504,
        f"request {request_id} did not finish before its deadline; it was stopped (send a larger "
        "'timeout', or retry later)",
        "timeout_error",
        code="deadline_exceeded",
    )


LIMIT_MESSAGES = {
    "rate_limited": "is over its requests_per_minute",
    "concurrency_limited": "has max_concurrent requests running already",
    "quota_exceeded": "has used its gpu_seconds_per_hour",
}


def refusal(model: str, decision: dict[str, Any], request_id: str, tenant: str | None = None) -> ApiError:
    """429 before any GPU work: the tenant is over a limit, every pool is full or down, none can finish
    before the deadline, or the line is longer than the model's typical request can wait (``overloaded``,
    admission ``typical_wait``)."""
    wait = decision.get("retry_after_s")
    limited = decision.get("limited")
    if limited is not None:
        metrics.inc("rayxdit_tenant_refusals", tenant=str(tenant), code=limited)
        error = ApiError(
            429,
            f"request {request_id} refused: tenant '{tenant}' {LIMIT_MESSAGES[limited]}"
            + (f"; retry in {math.ceil(wait)} s" if wait is not None else "; retry when one finishes"),
            "rate_limit_error",
            code=limited,
        )
        error.retry_after = None if wait is None else max(1.0, math.ceil(wait))
        return error
    if wait is None:
        return ApiError(
            429,
            f"all pools serving '{model}' are full or unavailable; retry later",
            "rate_limit_error",
            code="capacity",
        )
    if decision.get("overloaded"):
        message = (
            f"'{model}' is overloaded: request {request_id} would wait {decision['waiting_s']:.0f} s for a "
            f"replica, longer than its typical request can ({decision['typical_wait_s']:.0f} s); retry in "
            f"{wait:.0f} s"
        )
        code = "overloaded"
    else:
        message = (
            f"no pool serving '{model}' can finish request {request_id} before its deadline (expected in "
            f"{decision['estimate_s']:.0f} s); retry in {wait:.0f} s, or send a larger 'timeout'"
        )
        code = "deadline_unreachable"
    error = ApiError(429, message, "rate_limit_error", code=code)
    error.retry_after = wait
    return error


def too_large_error(
    model: str, resolved: ResolvedRequest, work: float, largest: float, request_id: str
) -> ApiError:
    """400 before any GPU work: no pool of ``model`` has ranks whose memory holds the request."""
    frames = f" x {resolved.frames} frames" if resolved.frames > 1 else ""
    images = f" x {resolved.batch} images" if resolved.batch > 1 else ""
    return invalid(
        f"request {request_id} is too large for the memory of the pools serving '{model}': "
        f"{resolved.width}x{resolved.height}{frames}{images} is {work:.2f} megapixels, and the largest they "
        f"hold is {largest:.2f} (measured per rank: GET /v1/models, pools[].memory); ask for a smaller size, "
        "fewer images or frames",
        "size",
        code="request_too_large",
    )


def pool_error(error: Exception, request_id: str) -> ApiError:
    """What the client sees of a pool's failure: the request's own problem (400), a deadline (504) or a
    failed group (503) say what happened; anything else is a 500 naming the request id, details only in
    the log."""
    cause = getattr(error, "cause", None) or error
    if isinstance(cause, RequestError):
        return invalid(str(cause), cause.param)
    if isinstance(cause, RequestStopped):
        return deadline_error(request_id)
    if isinstance(cause, PoolOutOfMemoryError):
        logger.warning("request %s: %s", request_id, cause)
        return ApiError(
            507,
            f"request {request_id} needs more memory than this pool's ranks have; ask for a smaller size, "
            "fewer images or frames, or send it to a pool with more ranks",
            "insufficient_storage",
            code="out_of_memory",
        )
    if isinstance(cause, PoolUnavailableError):
        logger.warning("request %s: %s", request_id, cause)
        return ApiError(
            503,
            f"request {request_id} failed on a worker group, which is being rebuilt; retry",
            "service_unavailable",
            code="worker_group_failed",
        )
    logger.error("request %s failed: %r", request_id, error)
    return ApiError(
        500, f"internal error in request {request_id}; the server log has the details", "server_error"
    )


class Dispatcher:
    """Runs requests on the application's pools, for one router replica."""

    def __init__(
        self, catalog: Catalog, handles: dict[str, DeploymentHandle], state: DeploymentHandle, replica: str
    ):
        self.catalog = catalog
        self.handles = handles
        self.state = state
        self.replica = replica

    async def run(
        self,
        model: str,
        request: GenerateRequest,
        resolved: ResolvedRequest,
        request_id: str,
        timeout: float | None,
        labels: dict[str, str],
        report_progress: bool = False,
        tenant: str | None = None,
        limits: TenantLimits | None = None,
        arrived: float | None = None,
        on_partial: PartialSink | None = None,
        background: bool = False,
    ) -> tuple[EncodedResult, dict[str, Any]]:
        """Route a validated request and run it on a pool (another pool if the first is full or gone);
        the result and what the response tells of it. ``labels``: the request's metric labels, its pool
        filled in here; ``tenant`` and its ``limits``: whom it counts against (None: nobody); ``arrived``:
        when the router took it (seconds since the epoch; default now), from which ``timeout`` counts;
        ``on_partial``: a streamed request's partial images (a retried attempt makes them again from index
        0: the sink keeps the first of each index); ``background``: only on an idle replica, else
        :class:`Busy` (a batch's line)."""
        counted = has_limits(limits)
        card = self.catalog.cards[model]
        cost = request_cost(
            resolved, card.uses_cfg(resolved.request), card.limits.attention_cost_per_megapixel
        )
        work = resolved.work
        arrived = arrived or time.time()
        pools = self.catalog.pools_by_model[model]
        pinned = resolved.model_version
        version = pinned or pick_version(self.catalog.versions[model], version_draw(request_id))
        # The other versions' pools: never for a pinned request; for an unpinned one only when its version
        # has no pool to take it (a version's weight is a share of the requests, not a reason to refuse one).
        other_versions = [pool.name for pool in pools if pool.model_version != version]
        longest = max(pool.request_timeout_s for pool in pools)
        admission_deadline = arrived + min(timeout or longest, longest)
        tried: list[str] = []
        losses: dict[str, int] = {}  # replicas of each pool that died with this request
        routing_s = waiting_s = 0.0  # the router's part of a request's wait, summed over its attempts
        for attempt in itertools.count():
            # Each attempt holds its own reservation, by a key no client picks (request ids may be reused).
            ticket = f"{request_id}#{attempt}"
            began = time.monotonic()
            try:
                decision = await self._route(
                    model,
                    cost,
                    ticket,
                    admission_deadline,
                    [*tried, *other_versions],
                    request_id,
                    tenant,
                    limits,
                    attempt > 0,
                    background,
                    work,
                )
            except asyncio.CancelledError:
                # The client left while the state routed it: the state may have admitted it already (or
                # will: the two calls may arrive in either order; a finished ticket is never admitted).
                self._release(ticket)
                raise
            routing_s += time.monotonic() - began
            if decision.get("too_large") is not None:
                raise too_large_error(model, resolved, work, decision["too_large"], request_id)
            if decision["pool"] is None and other_versions and not pinned:
                other_versions = []  # its version cannot take it now: any version may
                continue
            if decision["pool"] is None:
                if background and (decision.get("busy") or "estimate_s" not in decision):
                    raise Busy(max(BUSY_WAIT_S, decision.get("retry_after_s") or 0.0))
                raise refusal(model, decision, request_id, tenant)
            pool = self.catalog.pools[decision["pool"]]
            labels["pool"] = pool.name
            choice = "fallback" if tried else "first"
            metrics.inc("rayxdit_routing_decisions", model=model, pool=pool.name, choice=choice)
            deadline = arrived + min(timeout or pool.request_timeout_s, pool.request_timeout_s)
            result = None
            try:
                # After its replica died the pool may be down to a replacement not yet started, whose
                # start-up the request waits out (as for a cold pool) instead of calling the pool gone.
                warm = decision.get("warm") and not losses.get(pool.name)
                if decision.get("let_in") is False:  # routing.queue_policy fair_share: wait in the line
                    began = time.monotonic()
                    try:
                        await self._wait_turn(pool, ticket, deadline, warm, request_id)
                    finally:
                        waiting_s += time.monotonic() - began
                result = await self._call_pool(
                    pool,
                    request,
                    request_id,
                    ticket,
                    deadline,
                    cost,
                    warm,
                    report_progress,
                    tenant,
                    counted,
                    on_partial,
                    background,
                )
                break
            except ReplicaDied:
                losses[pool.name] = losses.get(pool.name, 0) + 1
                if losses[pool.name] > REPLICA_LOSSES_RETRIED:
                    tried.append(pool.name)
                else:  # give the handles a moment to learn of the death (else they may pick it again)
                    await asyncio.sleep(
                        backoff_s(losses[pool.name], REPLICA_LOSS_PAUSE_S, REPLICA_LOSS_CAP_S)
                    )
            except (BackPressureError, DeploymentUnavailableError, PoolGone):
                tried.append(pool.name)  # this pool is full, down or gone: the next candidate takes it
            except TurnLost:
                pass  # the state restarted while it waited: routed again, the pool still a candidate
            except ApiError as error:
                if error.code == "out_of_memory":  # none as large goes to this pool again
                    detached(
                        lambda name=pool.name: self.state.out_of_memory.remote(name, work),
                        f"out of memory in {pool.name}",
                    )
                raise
            finally:
                # However the request ended (an answer, an error, its deadline, the client gone), it leaves
                # the pool's count now: detached, so that a cancelled request still reports it.
                # An image waits for its release (a client's next request finds this one counted out),
                # but not for long: a slow state must not hold an answer past its time. An error (a 504
                # at the deadline above all) does not wait.
                release = self._release(ticket, result, tenant, pool.name, counted)
                if result is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait({release}, timeout=RELEASE_WAIT_S)
        info = {
            "request_id": request_id,
            "router": self.replica,
            "pool": pool.name,
            "model_version": pool.model_version,
            "ranks": pool.ranks,
            "cost": round(cost, 4),
            "estimate_s": None if decision["estimate_s"] is None else round(decision["estimate_s"], 3),
            "seed": request.seed,
            "width": resolved.width,
            "height": resolved.height,
            "steps": resolved.steps,
            **({"frames": resolved.frames} if resolved.frames > 1 else {}),
            "gpu_seconds": result.timings.get("gpu_seconds"),
            "timings": {**result.timings, "route_s": round(routing_s, 4), "line_s": round(waiting_s, 4)},
        }
        return result, info

    async def _route(
        self,
        model: str,
        cost: float,
        ticket: str,
        admission_deadline: float,
        tried: list[str],
        request_id: str,
        tenant: str | None,
        limits: TenantLimits | None,
        retry: bool,
        background: bool = False,
        work: float = 0.0,
    ) -> dict[str, Any]:
        """The state's routing decision (sent again while the state replica restarts: routing recovers with
        the pools' next heartbeats; ``tasks.ask_state``)."""
        return await ask_state(
            lambda: self.state.route.remote(
                model, cost, ticket, admission_deadline, tried, tenant, limits, retry, background, work
            ),
            f"request {request_id}",
        )

    def _release(
        self,
        ticket: str,
        result: EncodedResult | None = None,
        tenant: str | None = None,
        pool: str | None = None,
        metered: bool = False,
    ) -> asyncio.Task:
        """Tell the state that the attempt ``ticket`` left ``pool`` (with its engine time and GPU-seconds
        when it ran, and whose it was: a restarted state replica did not admit it): detached, so that a
        cancelled request still reports it, and sent again while the state restarts (usage stays exact)."""
        engine_s = None if result is None else engine_seconds(result.timings)
        gpu_seconds = None if result is None else result.timings.get("gpu_seconds")
        if gpu_seconds:
            metrics.inc("rayxdit_tenant_gpu_seconds", gpu_seconds, tenant=tenant or ANONYMOUS)
        what = f"releasing {ticket}"
        return detached(
            lambda: ask_state(
                lambda: self.state.finish.remote(ticket, engine_s, gpu_seconds, pool, tenant, metered), what
            ),
            what,
        )

    async def _wait_turn(
        self, pool: PoolConfig, ticket: str, deadline: float, warm: bool | None, request_id: str
    ) -> None:
        """Wait in ``pool``'s fair line until the state lets ``ticket`` in (each wait renews its
        reservation); 504 at the deadline; :class:`PoolGone` when the pool has no replica left (as in
        ``_call_pool``), :class:`TurnLost` when the state no longer knows the ticket (it restarted)."""
        began = time.monotonic()
        seen_gone = 0
        while True:
            remaining = deadline - time.time()
            if remaining <= 0:
                raise deadline_error(request_id)
            turn = await ask_state(
                lambda remaining=remaining: self.state.wait_turn.remote(
                    ticket, pool.name, min(RENEW_S, remaining)
                ),
                f"request {request_id}",
            )
            if turn == "go":
                return
            if turn == "lost":
                raise TurnLost(pool.name)
            seen_gone = seen_gone + 1 if turn == "gone" else 0
            if gone_for_good(pool, seen_gone, warm, began):
                raise PoolGone(pool.name)

    async def _call_pool(
        self,
        pool: PoolConfig,
        request: GenerateRequest,
        request_id: str,
        ticket: str,
        deadline: float,
        cost: float,
        warm: bool | None = False,
        report_progress: bool = False,
        tenant: str | None = None,
        metered: bool = False,
        on_partial: PartialSink | None = None,
        background: bool = False,
    ) -> EncodedResult:
        """The pool's answer, or 504 at ``deadline`` (plus DEADLINE_SLACK_S): the call is then cancelled and
        the pool stops its ranks at their next step boundary, in the background, before its next request.
        ``background`` work (a batch's line) is cancelled so when an online request preempts it
        (:class:`Preempted`).

        While it waits, the request renews its reservation in the shared state. A request still waiting for
        a pool that had replicas when it was routed (``warm``) but has none now (on GONE_RENEWALS renewals
        in a row: the autoscaling policy gave its GPUs to other pools, or its replica died), or for a cold pool that started no replica within
        twice its start-up prior, is taken back and raises :class:`PoolGone`, for the caller to route it
        again."""
        handle = self.handles[pool.name]
        if request.loras:  # Serve prefers a replica that served these adapters last (they are on its GPUs)
            handle = handle.options(multiplexed_model_id=adapter_set_key(request.loras))
        if on_partial is None:
            response = handle.generate.remote(request, request_id, deadline, cost, report_progress)
            answer = asyncio.ensure_future(_awaited(response))
        else:  # a streamed request: its partial images come as the pool makes them, then its result
            response = handle.options(stream=True).generate_stream.remote(request, request_id, deadline, cost)
            answer = asyncio.ensure_future(_streamed(response, on_partial))
        answer.add_done_callback(quiet)
        began = time.monotonic()
        bound = began + max(0.0, deadline - time.time()) + DEADLINE_SLACK_S
        seen_gone = 0  # consecutive renewals that found the pool without a replica
        # The renewal runs beside the wait, never in its way: a state replica slow to answer (its CPU
        # shared with the ranks) must delay neither the answer nor the 504 at the deadline.
        renewal: asyncio.Future | None = None
        next_renewal = began + RENEW_S
        watch: asyncio.Future | None = None  # background work: hears of its preemption
        try:
            while True:
                if background and watch is None:
                    watch = asyncio.ensure_future(
                        _awaited(self.state.wait_preempted.remote(ticket, PREEMPT_WAIT_S))
                    )
                    watch.add_done_callback(quiet)
                now = time.monotonic()
                if now >= bound:
                    response.cancel()
                    raise deadline_error(request_id)
                if renewal is None and now >= next_renewal:
                    renewal = asyncio.ensure_future(
                        _awaited(self.state.renew.remote(ticket, pool.name, cost, tenant, metered))
                    )
                    renewal.add_done_callback(quiet)
                waiting = {answer} | {pending for pending in (renewal, watch) if pending is not None}
                wake = bound if renewal is not None else min(bound, next_renewal)
                done, _ = await asyncio.wait(
                    waiting, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
                )
                if answer in done:
                    return answer.result()
                if watch is not None and watch in done:
                    heard, watch = watch, None
                    if not heard.exception() and heard.result():
                        response.cancel()  # the ranks stop at their next step boundary
                        raise Preempted(request_id)
                if renewal is None or renewal not in done:
                    continue
                renewed, renewal = renewal, None
                next_renewal = max(next_renewal + RENEW_S, time.monotonic())
                try:
                    gone = renewed.result()
                except Exception as error:  # the state replica restarting: the next renewal tells
                    logger.info("request %s: reservation not renewed (%r)", request_id, error)
                    continue
                seen_gone = seen_gone + 1 if gone else 0
                if gone_for_good(pool, seen_gone, warm, began):
                    response.cancel()
                    raise PoolGone(pool.name)
        except asyncio.CancelledError:  # the client went away: the pool stops the ranks
            response.cancel()
            raise
        except (BackPressureError, DeploymentUnavailableError, PoolGone, ApiError, Preempted):
            raise
        except RayActorError as error:  # the replica died with the request: route it again
            logger.warning(
                "request %s: the %s replica died (%r); routing it again", request_id, pool.name, error
            )
            raise ReplicaDied(pool.name) from None
        except Exception as error:
            if isinstance(getattr(error, "cause", None), ReplicaQuarantinedError):  # it exits: as if it died
                logger.warning("request %s: %s; routing it again", request_id, error.cause)
                raise ReplicaDied(pool.name) from None
            raise pool_error(error, request_id) from None
        finally:
            for pending in (answer, renewal, watch):
                if pending is not None and not pending.done():
                    pending.cancel()
