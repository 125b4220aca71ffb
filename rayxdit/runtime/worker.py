"""One rank of a worker group: joins the group's process group, owns the engine, answers the executor.

Every per-rank operation is a method of :class:`RankWorker`, declared once here. Executors host one worker
per rank (a spawned process or a Ray actor) and reach it only through ``collective_rpc(method, args)``; a
new operation (warm-up, cancel, metrics, profile) is one method here and works under both executors.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from rayxdit.config import EngineConfig
from rayxdit.request import CANCELLED, DEADLINE, EncodedResult, GenerateRequest, RequestStopped

if TYPE_CHECKING:
    from torch.distributed import TCPStore

    from rayxdit.engine import Engine

CONTROL_METHODS = frozenset({"ping", "cancel", "progress", "last_request"})
"""Methods a rank answers while another call runs (a health check, a cancel or a progress poll must not
wait for the request); every executor gives them a path of their own."""
REMEMBERED_CANCELS = 256
"""Cancelled request ids kept per rank: a cancel may arrive before its request does."""


class RankWorker:
    """One rank. Created by an executor inside the process or actor that owns the rank's device; by then Ray
    has set ``CUDA_VISIBLE_DEVICES`` (``device_index`` 0) or the local executor picks GPU ``rank``."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device_index: int,
        env: dict[str, str] | None = None,
        telemetry_pool: str | None = None,
        publish_telemetry: bool = True,
    ):
        """``telemetry_pool``: a serving or batch rank of this pool; under Ray it publishes its GPU as NVML
        gauges labelled with the pool, unless ``publish_telemetry`` is False (a forked rank: the Ray actor
        beside it publishes them)."""
        # Forwarded by the executor (HF_TOKEN, HF_HOME, proxies, NCCL settings) before anything reads them.
        os.environ.update(env or {})
        # transformers' import-time notices (e.g. no torchvision) are not for users, whoever started us.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        if telemetry_pool is not None:  # a serving or batch rank: its output is a log, not a terminal
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        self.rank = rank
        self.world_size = world_size
        self.device_index = device_index
        self.device: str | None = None
        self.collective_timeout_s: float | None = None
        self.engine: Engine | None = None
        self._store: TCPStore | None = None
        self._lock = threading.Lock()  # cancel() and progress() run on another thread than generate()
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._progress: dict[str, Any] | None = None
        self._previews: list[Any] = []  # the running request's partial images (PIL), encoded when asked for
        self._fetched = 0  # of those, how many a progress poll handed out
        self._last: dict[str, Any] | None = None
        self.telemetry_pool = telemetry_pool
        self.publish_telemetry = publish_telemetry
        self.telemetry = None

    def import_engine(self) -> None:
        """Import the model stack (torch, diffusers, the model families): seconds of a rank's start that
        belong to its process, not to the rendezvous that follows (a rank forked from a server that did it
        already finds it done)."""
        import rayxdit.engine  # noqa: F401

    def open_rendezvous(self, host: str | None, timeout_s: float) -> tuple[str, int]:
        """Rank 0: the group's rendezvous store on a port the OS picks and this process holds from then on
        (nothing can take it between choosing and binding). ``host`` None: this node's Ray address."""
        from rayxdit.parallel.mesh import open_store

        if host is None:
            import ray

            host = ray.util.get_node_ip_address()
        self._store = open_store(host, self.world_size, timeout_s)
        return host, self._store.port

    def init_distributed(self, host: str, port: int, timeout_s: float) -> str:
        """Collective: join the default process group at rank 0's store. Returns the device used."""
        from rayxdit.engine import pick_device
        from rayxdit.parallel.mesh import init_distributed

        device = pick_device(self.device_index)
        init_distributed(self.rank, self.world_size, device, host, port, timeout_s, store=self._store)
        self.device = str(device)
        self.collective_timeout_s = timeout_s
        publish = self.publish_telemetry and self.telemetry_pool is not None
        if publish and device.type == "cuda" and self.telemetry is None:
            from rayxdit.runtime.telemetry import start_gpu_telemetry

            self.telemetry = start_gpu_telemetry(self.device_index, self.telemetry_pool)
        return self.device

    def load(self, config: EngineConfig) -> dict[str, float]:
        """Collective: build the mesh and load the model with its parallelism applied. Returns the seconds
        of its parts (:attr:`Engine.load_seconds`)."""
        import torch

        from rayxdit.engine import Engine
        from rayxdit.parallel.mesh import build_parallel_state

        device = torch.device(self.device or "cpu")
        if self.telemetry_pool is not None:  # no loading bars in a serving or batch log
            import diffusers.utils.logging
            import transformers.utils.logging

            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
        self.engine = Engine(config, build_parallel_state(config.parallel, device, self.collective_timeout_s))
        return self.engine.load_seconds

    def weights_ready(self) -> float | None:
        """Collective: wait until this rank's weights are all in place (:meth:`Engine.weights_ready`); the
        seconds of their read from the node's host copy, or None when they did not come from one."""
        assert self.engine is not None, "load() first"
        return self.engine.weights_ready()

    def gpu_health(self) -> dict[str, Any]:
        """This rank's GPU and what NVML says of its health (:func:`rayxdit.runtime.telemetry.gpu_health`)."""
        from rayxdit.runtime.telemetry import gpu_health

        return gpu_health(self.telemetry, self.device_index)

    def memory(self) -> dict[str, float] | None:
        """This rank's memory in GiB (:meth:`Engine.memory_report`; None on a CPU)."""
        return self.engine.memory_report() if self.engine is not None else None

    def generate(
        self,
        request: GenerateRequest,
        output: str = "pil",
        progress: bool = False,
        request_id: str | None = None,
        deadline: float | None = None,
        warm_up: bool = False,
    ) -> EncodedResult | None:
        """Collective: every rank gets the same request; rank 0 returns the PNG-encoded result (or, with
        ``output="latent"``, the final latents), the others None.

        The request can be cancelled by its ``request_id`` (:meth:`cancel`) and stops past ``deadline``
        (seconds since the epoch): every rank raises :class:`~rayxdit.request.RequestStopped` at the same
        step boundary, leaving the group clean. :meth:`progress` tells its step meanwhile. ``warm_up``: its
        output is thrown away, so it may run on weights still arriving (:meth:`Engine.generate`)."""
        from rayxdit.imaging import encode_png, encode_result
        from rayxdit.parallel.control import StepControl

        assert self.engine is not None, "load() first"
        request_id = request_id or uuid.uuid4().hex  # every rank gets the same arguments, hence the same id
        control = StepControl(
            self.engine.state.control,
            stop_reason=lambda: self._stop_reason(request_id, deadline),
            on_step=lambda step, steps: self._record_progress(request_id, step, steps),
        )
        self._record_progress(request_id, 0, request.steps or 0)
        try:
            result = self.engine.generate(
                request,
                output=output,
                progress=progress,
                control=control,
                on_preview=self._keep_preview,
                warm_up=warm_up,
            )
        except RequestStopped as stop:
            self._finished(request_id, stop.reason, stop.step)
            raise
        except BaseException:
            self._finished(request_id, "failed", None)
            raise
        self._finished(request_id, "done", request.steps)
        if result is None:
            return None
        encoded = encode_result(result)
        with self._lock:  # previews made after the last poll (the last one is a few steps from the end)
            unfetched = dict(enumerate(self._previews))
            fetched, self._previews = self._fetched, []
        encoded.partials = {i: encode_png(image) for i, image in unfetched.items() if i >= fetched}
        return encoded

    def cancel(self, request_id: str) -> None:
        """Control: stop ``request_id`` at the next step boundary the group agrees on (also when it has not
        started yet)."""
        with self._lock:
            self._cancelled[request_id] = None
            while len(self._cancelled) > REMEMBERED_CANCELS:
                self._cancelled.popitem(last=False)

    def progress(self, previews_of: str | None = None, previews_from: int = 0) -> dict[str, Any] | None:
        """Control: the running request's id, step, step count and how many ``previews`` it made (None when
        idle); when it is ``previews_of``, also ``partials``: its partial images from ``previews_from`` on,
        as PNG bytes (encoded here, on the control thread, not in the denoising loop's way)."""
        from rayxdit.imaging import encode_png

        with self._lock:
            if self._progress is None:
                return None
            answer = {**self._progress, "previews": len(self._previews)}
            mine = previews_of is not None and previews_of == self._progress["request_id"]
            wanted = self._previews[previews_from:] if mine else []
            if mine:
                self._fetched = max(self._fetched, len(self._previews))
        if mine:
            answer["partials"] = [encode_png(image) for image in wanted]
        return answer

    def _keep_preview(self, index: int, images: list) -> None:
        with self._lock:
            if index == len(self._previews):  # the first image of the request's batch stands for it
                self._previews.append(images[0])

    def last_request(self) -> dict[str, Any] | None:
        """Control: how the last request ended: its id, ``outcome`` (done, cancelled, deadline, failed) and
        the step it stopped at."""
        with self._lock:
            return dict(self._last) if self._last is not None else None

    def _finished(self, request_id: str, outcome: str, step: int | None) -> None:
        with self._lock:
            self._progress = None
            self._last = {"request_id": request_id, "outcome": outcome, "step": step}

    def _stop_reason(self, request_id: str, deadline: float | None) -> str | None:
        with self._lock:
            if request_id in self._cancelled:
                return CANCELLED
        if deadline is not None and time.time() > deadline:
            return DEADLINE
        return None

    def _record_progress(self, request_id: str, step: int, steps: int) -> None:
        with self._lock:
            if self._progress is None or self._progress["request_id"] != request_id:
                self._previews, self._fetched = [], 0
            self._progress = {"request_id": request_id, "step": step, "steps": steps}

    def compile_artifacts(self) -> tuple[str, bytes] | None:
        """This rank's fingerprint and torch.compile's artifacts made or loaded in this process (the
        "mega-cache" blob), or None when it compiled nothing."""
        import torch

        saved = torch.compiler.save_cache_artifacts()
        return (self._artifact_fingerprint(), saved[0]) if saved is not None and saved[0] else None

    def load_compile_artifacts(self, blobs: dict[str, bytes]) -> bool:
        """Unpack the blob made for this rank's fingerprint into the node's compile caches (the compile that
        follows finds its graphs and kernels there). False when ``blobs`` holds none for it."""
        import torch

        blob = blobs.get(self._artifact_fingerprint())
        if blob is None:
            return False
        torch.compiler.load_cache_artifacts(blob)
        return True

    def compile_cache(self) -> dict[str, Any]:
        """torch.compile's cache counters in this process (``fxgraph_cache_hit``/``_miss``, ...: whether its
        graphs were compiled or found compiled) and where this node keeps the caches (inductor's, Triton's)."""
        from torch._dynamo.utils import counters
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        triton = os.environ.get("TRITON_CACHE_DIR") or os.path.join(cache_dir(), "triton")
        return {
            "counters": {name: count for name, count in counters["inductor"].items() if "cache" in name},
            "dirs": [cache_dir(), triton],
        }

    def _artifact_fingerprint(self) -> str:
        """What compiled artifacts depend on beyond the engine's configuration: this rank's place in the
        group (its shards' shapes), torch's version and the device."""
        import torch

        device = torch.device(self.device or "cpu")
        kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return f"rank {self.rank}/{self.world_size}|torch {torch.__version__}|{kind}"

    def ping(self) -> int:
        """Liveness: the rank's process id."""
        return os.getpid()

    def environment(self, names: list[str]) -> dict[str, str | None]:
        """What this rank's process sees of the variables ``names`` (what its executor forwarded)."""
        return {name: os.environ.get(name) for name in names}

    def close(self) -> None:
        """Leave the process group (the process or actor ends right after)."""
        from rayxdit.parallel.mesh import destroy_distributed

        if self.telemetry is not None:
            self.telemetry.stop()
        destroy_distributed()
