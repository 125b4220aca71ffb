"""Ray rank actors whose rank runs in a process forked from a per-node server that imported the model stack.

Most of a Ray rank's start is importing torch, diffusers, transformers and the model families (~6 CPU-seconds
on a laptop core, 12-25 s on the H200 host), paid again by every rank of every replica start and rebuild.
Here it is paid once per node: :class:`NodeForkServer`, one detached actor per node and code version, keeps a
**fork server** process that has imported the model stack (and on a GPU node the compiler:
:func:`~rayxdit.runtime.rank_process.preloaded_modules`); each rank actor (:class:`ForkedRank`) asks it for a child and forwards every call there, over the local executor's protocol
(:mod:`rayxdit.runtime.rank_process`). The server never touches a GPU (as the local executor's forkserver),
so the child starts as clean as a spawned process; it takes the rank actor's environment (Ray's
``CUDA_VISIBLE_DEVICES`` included) before anything reads it, and writes to the rank actor's log files.

Lifetimes, so that a rank still lives and dies as one Ray actor:

- the rank actor dies (``ray.kill``, a crash): the child's lifeline socket closes and it exits at once; the
  server, which watches the same actor, kills it too (which reaches a stopped process as well);
- the child dies: the rank actor exits at once, and Ray reports the rank dead as before (``rank_died``);
- the server process exits with its actor, or after :data:`IDLE_EXIT_S` without children, and the actor
  with it (the next rank on the node starts a new pair, paying the import once): an idle node holds no
  server, so the autoscaler can release it.

The server is keyed by the code it runs (interpreter, import path, runtime environment, the newest change
to rayxdit's files): a new version deployed onto a running cluster gets its own server, never forks of the old
code. ``fork_ranks: false`` in a pool (or a batch job's group) runs each rank in its own actor process.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import pickle
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from rayxdit.runtime.rank_process import (
    FORK_SAFE_ENV,
    Reply,
    check_fork_safe,
    preload,
    serve_rank,
)
from rayxdit.runtime.worker import CONTROL_METHODS, RankWorker

IDLE_EXIT_S = 60.0
"""A fork server with no living child exits after this long (``RAYXDIT_FORK_SERVER_IDLE_S`` sets it on a node's
environment). Its actor is a leased Ray worker, and a node with one is busy in the autoscaler's eyes: a GPU
node whose last replica left is released only once its server has gone too (with 900 s, the autoscaler's idle
timeout began a quarter of an hour late). A reshape's new replicas follow the ones they replace within
seconds and find the server; a rank on a node idle for longer pays the import again (~6-25 s)."""
IDLE_ENV = "RAYXDIT_FORK_SERVER_IDLE_S"
SERVER_START_TIMEOUT_S = 600.0
"""How long a fork server may take to import the model stack (a cold node's disk, a network file system)."""
FORK_TIMEOUT_S = 60.0
"""How long a rank waits for its node's fork server to fork it (normally well under a second) before it
takes the server for frozen (stopped, or stuck in the kernel), kills it and asks a new one (once)."""
_PID = struct.Struct("!i")
_LENGTH = struct.Struct("!I")


class RankFailed(RuntimeError):
    """A call failed in the forked rank; the message is its traceback there."""

    def __init__(self, traceback_text: str, out_of_memory: bool = False):
        super().__init__(traceback_text)
        self.out_of_memory = out_of_memory

    def __reduce__(self):  # Ray pickles it back to the driver with both fields
        return type(self), (str(self), self.out_of_memory)


# ----- the fork server (its own process: python -m rayxdit.runtime.forked SOCKET) ------------------------------
def serve_forks(path: str) -> None:
    """Import the model stack, then fork one rank per request on the UNIX socket ``path`` until stdin closes
    (the :class:`NodeForkServer` actor that started this process is gone) or :data:`IDLE_EXIT_S` pass without
    a child. Single-threaded, as a process that forks must be."""
    os.environ.update(FORK_SAFE_ENV)  # before torch is imported: see FORK_SAFE_ENV
    preload()
    # What the server imported stays in every child: out of the collector's sight, a child's collections do not
    # walk it (0.4 s each, measured, and copy-on-write faults on every page they touch).
    gc.freeze()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener.bind(path)
    listener.listen(64)
    try:
        _serve_requests(listener, float(os.environ.get(IDLE_ENV, IDLE_EXIT_S)))
    finally:  # the socket's private directory goes with the server (its actor may have been killed)
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def _serve_requests(listener: socket.socket, idle_exit_s: float) -> None:
    print("ready", flush=True)
    os.dup2(2, 1)  # nobody reads the pipe after this line: what the server prints goes to the actor's log
    children: dict[socket.socket, int] = {}  # each child's watch on its rank actor -> the child's pid
    living: set[int] = set()  # children not reaped yet: their pids cannot have gone to another process
    idle_since = time.monotonic()
    # Looks at its idle time every 5 s, or twice per idle window where that is shorter (it leaves within
    # 1.5 windows of its last child).
    every_s = min(5.0, max(0.5, idle_exit_s / 2))
    while True:
        readable, _, _ = select.select([listener, sys.stdin, *children], [], [], every_s)
        living -= _reap()
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            return  # the actor that owns this server is gone
        for watch in [ready for ready in readable if ready in children]:
            if not watch.recv(1):  # the rank actor is gone: so is its child, even a stopped one
                if children[watch] in living:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(children[watch], signal.SIGKILL)
                watch.close()
                del children[watch]
        if listener in readable:
            connection, _ = listener.accept()
            try:
                with connection:
                    watch, pid = _fork_rank(connection, listener, children)
                if watch is not None:
                    children[watch] = pid
                    living.add(pid)
            except ConnectionError as error:  # the rank actor went away mid-request: expected, one line
                print(f"fork server: a rank request ended early: {error}", flush=True)
            except Exception:  # one failed request (a fork refused) is that request's failure
                import traceback

                traceback.print_exc()
        if children:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > idle_exit_s:
            return


def _reap() -> set[int]:
    """Collect exited children; their pids (free from now on) are returned. Until then a child's pid stays
    reserved, so a SIGKILL sent to an unreaped child never hits another process."""
    reaped = set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.add(pid)


def _fork_rank(
    connection: socket.socket, listener: socket.socket, children: dict[socket.socket, int]
) -> tuple[socket.socket | None, int]:
    message, fds, _, _ = socket.recv_fds(connection, 1 << 16, 6)
    if len(fds) != 6:
        for fd in fds:
            os.close(fd)
        return None, 0
    try:
        while len(message) < _LENGTH.size or len(message) < _LENGTH.size + _LENGTH.unpack_from(message)[0]:
            part = connection.recv(1 << 16)  # a stream socket may deliver a long request in parts
            if not part:
                raise ConnectionError("the rank actor went away mid-request")
            message += part
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    message = message[_LENGTH.size :]
    stdout, stderr, calls, control, lifeline, watch = fds
    pid = os.fork()
    if pid == 0:  # the rank
        code = 1
        try:
            listener.close()
            for other in children:
                other.close()
            os.close(watch)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            for fd in (devnull, stdout, stderr):
                os.close(fd)
            _run_rank(pickle.loads(message), calls, control, lifeline)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in (stdout, stderr, calls, control, lifeline):
        os.close(fd)
    try:
        connection.sendall(_PID.pack(pid))
    except OSError:
        # The rank actor went away before it learnt its rank's pid (seen: its replica removed by a downscale
        # while the rank started). The child has nobody to serve: it goes now (unreaped, its pid is still
        # ours), and so does its watch.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.close(watch)
        raise ConnectionError(
            f"the rank actor went away before it learnt its rank's pid ({pid}, killed)"
        ) from None
    return socket.socket(fileno=watch), pid


def _run_rank(request: dict[str, Any], calls: int, control: int, lifeline: int) -> None:
    """The forked rank: the rank actor's environment, a RankWorker, calls served until the actor goes."""
    os.environ.clear()
    os.environ.update(request["env"])
    line = socket.socket(fileno=lifeline)
    threading.Thread(target=_exit_when_closed, args=(line,), daemon=True, name="lifeline").start()
    import torch

    check_fork_safe()
    torch.set_num_threads(request["threads"])
    worker = RankWorker(
        request["rank"],
        request["world_size"],
        request["device_index"],
        telemetry_pool=request["telemetry_pool"],
        publish_telemetry=False,  # the rank actor publishes (this process is not a Ray worker)
    )
    serve_rank(worker, Connection(calls), Connection(control))


def _exit_when_closed(line: socket.socket) -> None:
    """Block until the peer closes ``line`` (its process died), then end this process at once."""
    try:
        while line.recv(1):
            pass
    except OSError:
        pass
    os._exit(1)


# ----- the node's fork server, as a Ray actor ----------------------------------------------------------------
class NodeForkServer:
    """Owns one node's fork server process, started on the first request; the actor ends with it."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._env = dict(env or {})
        """The variables its ranks are given by their executor (a server per set: what is imported reads some
        at import, Hugging Face's offline switch for one, so the server imports with them)."""
        self._process: subprocess.Popen | None = None
        # In a directory only this user can enter (mkdtemp: mode 0700): whoever can connect can have code
        # run as this user, so no other local user may reach the socket.
        self._path = os.path.join(tempfile.mkdtemp(prefix="rayxdit-forks-"), "server.sock")

    def address(self) -> str:
        """The server's socket path, once it has imported the model stack."""
        if self._process is None:  # once: the actor ends with its server (see _exit_with)
            env = {
                **os.environ,
                **self._env,
                **FORK_SAFE_ENV,
                "PYTHONPATH": os.pathsep.join(path for path in sys.path if path),
            }
            self._process = subprocess.Popen(
                [sys.executable, "-m", "rayxdit.runtime.forked", self._path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                # A session of its own: when this actor exits (its server killed), Ray kills the actor's
                # process group; the ranks the server forked must not go with it (each dies with its rank
                # actor instead).
                start_new_session=True,
            )
            line = self._process.stdout.readline()
            if line.strip() != b"ready":
                code = self._process.wait(timeout=30)
                raise RuntimeError(
                    f"the fork server exited with code {code} before it was ready (see this log)"
                )
            threading.Thread(target=self._exit_with, args=(self._process,), daemon=True).start()
        return self._path

    def stop(self) -> None:
        """Kill the server (a rank found it frozen): this actor goes with it, and the next rank on the node
        starts a new pair. Ranks it forked run on."""
        if self._process is not None:
            self._process.kill()

    def _exit_with(self, process: subprocess.Popen) -> None:
        """The server gone (idle, or a crash): this actor goes too, its socket's directory with it, and the
        next rank on the node starts a new pair (a rank that asked in between retries once)."""
        process.wait()
        shutil.rmtree(os.path.dirname(self._path), ignore_errors=True)
        os._exit(0)


def code_version(env: dict[str, str] | None = None) -> str:
    """What a fork server's children run: the interpreter, the import path, this actor's runtime environment,
    the variables the ranks are given (``env``) and the newest change to rayxdit's files (a redeploy onto a
    running cluster gets a server of its own)."""
    import ray

    package = Path(__file__).resolve().parents[1]
    newest = max(path.stat().st_mtime_ns for path in package.rglob("*.py"))
    described = json.dumps(
        [
            sys.executable,
            sys.path,
            ray.get_runtime_context().runtime_env,
            sorted((env or {}).items()),
            newest,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def fork_server(env: dict[str, str] | None = None) -> tuple[str, Any]:
    """The socket of this node's fork server for this code and ``env`` (started, detached, if there is none)
    and the actor that owns it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    name = f"rayxdit-forks-{node}-{code_version(env)}"  # the whole id: fake test nodes share a long prefix
    attempts = 5  # a server that just exited leaves its actor's name behind for a moment
    for attempt in range(attempts):
        server = (
            ray.remote(NodeForkServer)
            .options(
                name=name,
                namespace="rayxdit",
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=0,
                # On this node, and outside the asking replica's placement group (Serve captures a replica's
                # children into its group; the server must outlive the replica).
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            )
            .remote(env)
        )
        try:
            return ray.get(server.address.remote(), timeout=SERVER_START_TIMEOUT_S), server
        except ray.exceptions.RayActorError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _stop_server(server: Any) -> None:
    """Kill a frozen fork server through its actor and wait until the actor is gone (its name free)."""
    import ray

    with contextlib.suppress(Exception):  # the actor exits with its server: the call may never answer
        ray.get(server.stop.remote(), timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(server.__ray_ready__.remote(), timeout=1)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            pass
        time.sleep(0.2)
    ray.kill(server, no_restart=True)


# ----- the rank actor ----------------------------------------------------------------------------------------
def send_fork_request(server: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """Send the fork server ``request`` on the connected ``server`` with the child's six descriptors ``fds``
    (its stdout, stderr, calls, control, lifeline, and the server's watch on the rank actor)."""
    payload = pickle.dumps(request)
    data = _LENGTH.pack(len(payload)) + payload
    sent = socket.send_fds(server, [data], fds)
    server.sendall(data[sent:])  # a stream socket may take a long request in parts


def _ask_for_fork(address: str, request: dict[str, Any], ends: tuple, timeout_s: float) -> bytes:
    """Send the fork server ``request`` with the child's ends of the connections; its reply (the child's
    pid). TimeoutError when the server does not answer within ``timeout_s``; another OSError when it is
    gone (e.g. killed by a rank that found it frozen)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.settimeout(timeout_s)
        server.connect(address)
        send_fork_request(server, request, [1, 2, *(end.fileno() for end in ends)])
        reply = b""
        while len(reply) < _PID.size:
            chunk = server.recv(_PID.size - len(reply))
            if not chunk:
                raise ConnectionError("the node's fork server closed the connection without forking a rank")
            reply += chunk
    return reply


class ForkedRank:
    """A rank as a Ray actor (placement, GPU, name, death as before) whose work runs in a forked child. Every
    :class:`RankWorker` method is forwarded: control methods (:data:`CONTROL_METHODS`) on a connection of their
    own, answered while a call runs."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device_index: int,
        telemetry_pool: str | None = None,
        fork_timeout_s: float = FORK_TIMEOUT_S,
        env: dict[str, str] | None = None,
    ):
        """``env``: variables the rank's process gets beyond this actor's (given here, not as the actor's
        runtime environment: an actor with one of its own needs a worker process started for it, 0.4 s on
        two laptop cores and more on a busy host, where one without takes an idle worker)."""
        self.rank = rank
        self.device_index = device_index
        self.telemetry_pool = telemetry_pool
        self.telemetry = None
        request = {
            "rank": rank,
            "world_size": world_size,
            "device_index": device_index,
            "telemetry_pool": telemetry_pool,
            "env": {**os.environ, **(env or {})},
            "threads": max(1, int(float(os.environ.get("OMP_NUM_THREADS") or 1))),
        }
        for attempt in range(2):
            calls, child_calls = socket.socketpair()
            control, child_control = socket.socketpair()
            self._lifeline, child_lifeline = socket.socketpair()
            self._watched, server_watch = socket.socketpair()
            ends = (child_calls, child_control, child_lifeline, server_watch)
            address, server = fork_server(env)
            try:
                reply = _ask_for_fork(address, request, ends, fork_timeout_s)
                break
            except OSError as error:  # TimeoutError among them
                for end in (calls, control, self._lifeline, self._watched):  # the child's: in `finally`
                    end.close()
                if isinstance(error, TimeoutError):
                    problem = f"did not fork rank {rank} within {fork_timeout_s:.0f} s"
                else:
                    problem = f"failed to fork rank {rank} ({error!r})"
                if attempt:
                    raise RuntimeError(
                        f"the node's fork server {problem}, twice (a new server too)"
                    ) from None
                print(f"the node's fork server {problem}: replacing it", file=sys.stderr)
                _stop_server(server)  # also waits until a server another rank killed is gone
            finally:
                for end in ends:
                    end.close()
        self.pid = _PID.unpack(reply)[0]
        self._calls = Connection(calls.detach())
        self._control = Connection(control.detach())
        self._locks = {"calls": threading.Lock(), "control": threading.Lock()}
        # The child gone (killed, crashed): this actor goes too, and Ray reports the rank dead.
        threading.Thread(target=_exit_when_closed, args=(self._lifeline,), daemon=True, name="child").start()

    def _forward(self, method: Any, args: tuple, kwargs: dict) -> Any:
        path = "control" if method in CONTROL_METHODS else "calls"
        connection = self._control if path == "control" else self._calls
        with self._locks[path]:
            try:
                connection.send((method, args, kwargs))
                reply: Reply = connection.recv()
            except (EOFError, OSError):
                os._exit(1)  # the child died mid-call: die with it (the lifeline thread may not have yet)
        if reply.expected is not None:
            raise reply.expected
        if reply.error is not None:
            raise RankFailed(reply.error, reply.out_of_memory)
        return reply.value

    def call(self, function: Any, args: tuple, kwargs: dict) -> Any:
        """``function(worker, *args, **kwargs)`` in the rank (``collective_rpc`` with a function)."""
        return self._forward(function, args, kwargs)

    def open_rendezvous(self, host: str | None, timeout_s: float) -> tuple[str, int]:
        import ray

        return self._forward("open_rendezvous", (host or ray.util.get_node_ip_address(), timeout_s), {})

    def init_distributed(self, host: str, port: int, timeout_s: float) -> str:
        device = self._forward("init_distributed", (host, port, timeout_s), {})
        if self.telemetry_pool is not None and device.startswith("cuda") and self.telemetry is None:
            from rayxdit.runtime.telemetry import start_gpu_telemetry

            self.telemetry = start_gpu_telemetry(self.device_index, self.telemetry_pool)
        return device

    def gpu_health(self) -> dict[str, Any]:
        """This rank's GPU and its NVML health (the telemetry runs in this actor, not in the child)."""
        from rayxdit.runtime.telemetry import gpu_health

        return gpu_health(self.telemetry, self.device_index)


def _forwarder(method: str):
    def forward(self: ForkedRank, *args: Any, **kwargs: Any) -> Any:
        return self._forward(method, args, kwargs)

    forward.__name__ = method
    forward.__doc__ = getattr(RankWorker, method).__doc__
    return forward


for _method in [name for name in vars(RankWorker) if not name.startswith("_")]:
    if callable(getattr(RankWorker, _method)) and not hasattr(ForkedRank, _method):
        setattr(ForkedRank, _method, _forwarder(_method))


if __name__ == "__main__":
    serve_forks(sys.argv[1])
