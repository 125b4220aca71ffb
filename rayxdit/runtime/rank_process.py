"""A rank in a process of its own, answering calls that arrive over a connection (a pipe or a socket): the
protocol the local executor's spawned ranks and the Ray executor's forked ranks share. Torch-free, so the
side that sends the calls need not import the model stack to read the replies."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from rayxdit.request import RequestError, RequestStopped

if TYPE_CHECKING:
    from rayxdit.runtime.executor import Method
    from rayxdit.runtime.worker import RankWorker

PRELOADED = ("torch", "diffusers", "transformers", "rayxdit.engine", "rayxdit.runtime.worker")
"""What a rank needs and takes seconds to import: imported once by a server process that ranks are forked
from (the local executor's forkserver, a node's :mod:`fork server <rayxdit.runtime.forked>`), not by each
rank."""
COMPILER_MODULES = (
    "torch._functorch.aot_autograd",
    "torch._inductor.compile_fx",
    "torch._inductor.codecache",
    "torch._inductor.async_compile",
    "triton",
    "triton.compiler.compiler",
    "torch._inductor.runtime.triton_heuristics",
    "torch._inductor.codegen.triton",
)
"""torch.compile's modules, imported at a compiled model's first call: ~1.5 CPU-seconds of every rank's warm-up
(even when every graph is found compiled in the cache), paid once by a GPU node's fork server instead (see
:func:`preloaded_modules`). None of them initializes CUDA."""


def compiler_wanted() -> bool:
    """Whether a fork server preloads :data:`COMPILER_MODULES`: on a node with a GPU (asked through NVML:
    :data:`FORK_SAFE_ENV`), whose ranks' warm-ups import them otherwise; not on a CPU node (its ranks rarely
    compile; they would slow every server's start). ``RAYXDIT_PRELOAD_COMPILER=1``/``0`` in the server's
    environment overrides that."""
    import torch

    setting = os.environ.get("RAYXDIT_PRELOAD_COMPILER", "auto")
    return torch.cuda.is_available() if setting == "auto" else setting == "1"


def preloaded_modules() -> tuple[str, ...]:
    """What a fork server imports before its first fork: :data:`PRELOADED`, and :data:`COMPILER_MODULES` where
    :func:`compiler_wanted`. A module this installation lacks (Triton on a CPU build) is skipped where it is
    imported."""
    return PRELOADED + (COMPILER_MODULES if compiler_wanted() else ())


def preload(compiler: bool | None = None) -> None:
    """Run by a fork server before its first fork: import :data:`PRELOADED` and, with the compiler (None: where
    :func:`compiler_wanted`), import :data:`COMPILER_MODULES` and compute inductor's key of the torch
    installation (a hash of its source files, ~0.2-0.4 s, asked by every compile's cache lookup and kept for
    the process: its forks inherit it)."""
    compiler = compiler_wanted() if compiler is None else compiler
    for module in PRELOADED + (COMPILER_MODULES if compiler else ()):
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    if compiler:
        from torch._inductor.codecache import torch_key

        torch_key()


FORK_SAFE_ENV = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
"""The environment a fork server imports :data:`PRELOADED` in. diffusers asks ``torch.accelerator.is_available()``
at import (``diffusers.utils.torch_utils``); torch answers through the CUDA runtime, which forbids CUDA in
every process forked after it ("Cannot re-initialize CUDA in forked subprocess", seen on the H200). Asked
through NVML instead, the server stays fork-safe and each rank initializes CUDA itself."""


def check_fork_safe() -> None:
    """In a forked rank: fail with the reason when the server it was forked from initialized CUDA."""
    import torch

    if torch.cuda._is_in_bad_fork():
        raise RuntimeError(
            "this rank was forked from a process that had initialized CUDA: its server must import the model "
            f"stack with {FORK_SAFE_ENV} set (rayxdit.runtime.rank_process.FORK_SAFE_ENV)"
        )


OUT_OF_MEMORY = "out_of_memory"
"""A group's failure cause when a rank could not allocate memory (GPU or host)."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: ``torch.OutOfMemoryError`` on a GPU, the CPU allocator's
    RuntimeError on a host (told apart by name and message: this module imports no torch)."""
    return type(error).__name__ == "OutOfMemoryError" or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


@dataclass
class Reply:
    """A rank's answer to one call."""

    value: Any = None
    error: str | None = None
    """A fault: the rank's traceback."""
    expected: Exception | None = None
    """Not a fault: the model refused the request (RequestError) or the group stopped it (RequestStopped)."""
    out_of_memory: bool = False
    """The fault was an allocation failure: the request needs more memory than the rank has."""


def run_call(worker: RankWorker, method: Method, args: tuple, kwargs: dict) -> Reply:
    """Run one call on ``worker``; every outcome becomes a :class:`Reply`."""
    try:
        function = getattr(worker, method) if isinstance(method, str) else functools.partial(method, worker)
        return Reply(value=function(*args, **kwargs))
    except RequestError as error:
        return Reply(expected=RequestError(str(error), error.param))
    except RequestStopped as error:
        return Reply(expected=RequestStopped(error.reason, error.step))
    except BaseException as error:
        return Reply(error=traceback.format_exc(), out_of_memory=is_out_of_memory(error))


def serve_calls(worker: RankWorker, connection: Connection) -> None:
    """Answer calls from ``connection`` until it closes or sends None."""
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        reply = run_call(worker, *message)
        try:
            connection.send(reply)
        except Exception:  # the value does not pickle: say so instead of leaving the caller waiting
            connection.send(Reply(error=traceback.format_exc()))


def serve_rank(worker: RankWorker, calls: Connection, control: Connection) -> None:
    """Serve a rank's calls in order from ``calls`` and its control calls from ``control`` on a thread of
    their own (answered while a call runs), until ``calls`` closes; then the worker leaves its group."""
    threading.Thread(target=serve_calls, args=(worker, control), daemon=True, name="control").start()
    try:
        serve_calls(worker, calls)
    finally:
        worker.close()
