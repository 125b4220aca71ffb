"""The node's fork server (``rayxdit.runtime.forked``) as the process it is, without Ray: a rank actor that goes
away between asking for a rank and reading its pid (seen in the suite: its replica removed by a downscale while
its ranks started) costs the server one line in its log and the child it forked, never a traceback through
rayxdit's code, and the server forks the next rank."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from rayxdit.runtime import forked
from rayxdit.runtime.rank_process import FORK_SAFE_ENV


def _send_request(address: str, request: dict, ends: list[socket.socket], devnull: int) -> socket.socket:
    """What a rank actor sends (the child's output to /dev/null); the connection, its reply unread."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.connect(address)
    forked.send_fork_request(server, request, [devnull, devnull, *(end.fileno() for end in ends)])
    return server


def _start_server(**env: str) -> tuple[subprocess.Popen, str]:
    """A fork server as its actor starts one (``env`` added), and its socket's path in a directory of its own."""
    directory = tempfile.mkdtemp(prefix="rayxdit-forks-test-")  # short: a UNIX socket's path has 108 bytes
    address = os.path.join(directory, "server.sock")
    server = subprocess.Popen(
        [sys.executable, "-m", "rayxdit.runtime.forked", address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **FORK_SAFE_ENV, **env},
    )
    return server, address


def test_a_rank_actor_gone_before_its_pid_costs_one_line_and_its_child_and_the_server_forks_on():
    server, address = _start_server()
    directory = os.path.dirname(address)
    devnull = os.open(os.devnull, os.O_WRONLY)
    pairs = [socket.socketpair() for _ in range(8)]
    try:
        assert server.stdout.readline().strip() == b"ready"
        # The child's request fails at once if it ever runs (no rank in it): only the server's side matters.
        request = {"env": dict(os.environ)}
        gone = _send_request(address, request, [mine for _, mine in pairs[:4]], devnull)
        gone.close()  # the rank actor goes before it reads the pid
        asking = _send_request(address, request, [mine for _, mine in pairs[4:]], devnull)
        asking.settimeout(60)
        reply = asking.recv(forked._PID.size)
        asking.close()
        assert len(reply) == forked._PID.size and forked._PID.unpack(reply)[0] > 0  # it forks on
    finally:
        for pair in pairs:
            for end in pair:
                end.close()
        os.close(devnull)
        _, log = server.communicate(input=b"", timeout=60)  # stdin closed: the server returns
        shutil.rmtree(directory, ignore_errors=True)
    log = log.decode(errors="replace")
    assert "Traceback" not in log, log
    (line,) = [line for line in log.splitlines() if "ended early" in line]
    assert "went away before it learnt its rank's pid" in line, log
    child = int(re.search(r"\((\d+), killed\)", line).group(1))
    deadline = time.monotonic() + 10  # the server reaped it, or init did once the server was gone
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}"), f"the abandoned child {child} lives on"


def test_a_server_whose_ranks_are_gone_exits_after_its_idle_window_so_its_node_can_go():
    """A fork server's actor keeps its node busy for Ray's autoscaler: the server must leave once no rank of
    the node has lived for its idle window (here 2 s), and not while one lives."""
    server, address = _start_server(**{forked.IDLE_ENV: "2"})
    directory = os.path.dirname(address)
    devnull = os.open(os.devnull, os.O_WRONLY)
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        assert server.stdout.readline().strip() == b"ready"
        asking = _send_request(address, {"env": dict(os.environ)}, [mine for _, mine in pairs], devnull)
        asking.settimeout(60)
        assert forked._PID.unpack(asking.recv(forked._PID.size))[0] > 0
        asking.close()
        for _, mine in pairs:  # sent: the server and the child hold them now
            mine.close()
        time.sleep(4)  # past the window (the server looks every 1 s): the rank actor still holds its watch
        assert server.poll() is None, "the server left while a rank of its node lived"
        pairs[-1][0].close()  # the rank actor goes
        assert server.wait(timeout=30) == 0
        assert not os.path.exists(directory), "the server's socket directory outlived it"
    finally:
        for theirs, _ in pairs:
            theirs.close()
        os.close(devnull)
        if server.poll() is None:
            server.kill()
        _, log = server.communicate(timeout=60)
        shutil.rmtree(directory, ignore_errors=True)
    assert "Traceback" not in log.decode(errors="replace")
