"""The Ray executor on a real local Ray cluster with logical GPUs: ranks in a STRICT_PACK placement group,
a gloo process group among them, parity with one process, and recovery from a dead and a hung rank."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from rayxdit.config import EngineConfig, WorkerGroupConfig
from rayxdit.engine import Engine
from rayxdit.parallel.mesh import ParallelState
from rayxdit.request import GenerateRequest, RequestError
from rayxdit.runtime.executor import GroupError
from rayxdit.runtime.placement import group_bundles
from rayxdit.runtime.ray_executor import RayExecutor
from rayxdit.runtime.ray_start import init_ray
from tests.helpers import cap_address_space

pytestmark = pytest.mark.slow

POOL = WorkerGroupConfig(
    name="test",
    model="tiny-flux",
    parallel="ulysses=2",
    request_timeout_s=300,
    collective_timeout_s=5,
    cpus_per_rank=0.5,
)
REQUEST = GenerateRequest(prompt="a green bird", height=36, width=36, steps=3, seed=1)


@pytest.fixture(scope="module")
def group():
    init_ray(num_cpus=4, num_gpus=8, include_dashboard=False, logging_level="warning")
    pg = placement_group(group_bundles(POOL), strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    group = RayExecutor.for_group(POOL, placement_group=pg, name="test")
    group.start()
    yield group
    group.shutdown()
    remove_placement_group(pg)
    ray.shutdown()


def fork_servers() -> list[str]:
    """The names of the cluster's fork-server actors."""
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("rayxdit-forks-")
    ]


def pixels(result) -> np.ndarray:
    return np.asarray(result.decode().images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    image = Engine(EngineConfig(model="tiny-flux"), ParallelState.single()).generate(REQUEST).images[0]
    return np.asarray(image, dtype=np.int16)


def test_ranks_get_their_own_logical_gpu_and_match_one_process(group, reference):
    visible = ray.get(
        [w.__ray_call__.remote(lambda self: os.environ.get("CUDA_VISIBLE_DEVICES")) for w in group.workers]
    )
    assert len(set(visible)) == 2 and all(v not in (None, "") for v in visible), visible
    assert group.devices == ["cpu", "cpu"]  # logical GPUs only: the engine falls back to gloo on CPU
    assert np.abs(pixels(group.generate(REQUEST)) - reference).max() <= 1


def test_bad_request_leaves_group_healthy(group):
    with pytest.raises(RequestError, match="multiple of 4"):
        group.generate(REQUEST.model_copy(update={"height": 37}))
    assert not group.broken


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not process_gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive after {within_s:.0f} s"
        time.sleep(0.1)


def test_a_forked_rank_lives_and_dies_with_its_actor(group, reference):
    """Each rank's work runs in a child of the node's fork server (rayxdit.runtime.forked): the rank actor's
    own process never imports torch; the actor's death ends the child, a stopped one too, and the child's
    death is the actor's (Ray reports the rank dead, the group is rebuilt as before)."""
    actor = ray.get(
        [
            w.__ray_call__.remote(lambda self: (os.getpid(), "torch" in __import__("sys").modules))
            for w in group.workers
        ]
    )
    children = group.pids()
    assert [imported for _, imported in actor] == [False, False]
    servers = [
        a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("rayxdit-forks-")
    ]
    for server in servers:  # whoever reaches a server's socket can have code run: its owner alone may
        address = ray.get(ray.get_actor(server["name"], namespace=server["namespace"]).address.remote())
        assert os.stat(os.path.dirname(address)).st_mode & 0o777 == 0o700, address
    assert servers, "no node fork server: the ranks were not forked"
    assert not {pid for pid, _ in actor} & set(children), "the ranks run in the actor processes"
    os.kill(children[1], signal.SIGSTOP)  # a stopped child cannot act on its lifeline: the server kills it
    ray.kill(group.workers[1], no_restart=True)
    wait_gone(children[1], within_s=10)
    os.kill(children[0], signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(group.workers[0].ping.remote(), timeout=30)
    group.rebuild()
    assert np.abs(pixels(group.generate(REQUEST)) - reference).max() <= 1
    assert set(group.pids()).isdisjoint(children)


def test_forked_ranks_get_their_executors_variables_without_a_runtime_environment_of_their_own(group):
    """The variables an executor forwards reach the forked rank processes (NCCL's, tokens, caches), through
    the fork server (a server per set of them: some are read at import) rather than as the rank actors'
    runtime environment, which would make Ray start a worker process for each actor."""
    env = {"RAYXDIT_PROBE_MARK": "forwarded"}
    servers_before = set(fork_servers())
    forwarded = RayExecutor(2, None, [{"num_cpus": 0}] * 2, name="env-probe", env=env)
    forwarded.start()
    try:
        seen = forwarded.collective_rpc("environment", (["RAYXDIT_PROBE_MARK"],))
        actors = ray.get(
            [
                w.__ray_call__.remote(lambda self: ray.get_runtime_context().runtime_env.get("env_vars"))
                for w in forwarded.workers
            ]
        )
    finally:
        forwarded.shutdown()
        for name in set(fork_servers()) - servers_before:  # its own server: other tests freeze the group's
            ray.kill(ray.get_actor(name, namespace="rayxdit"))
    assert seen == [env, env]
    assert actors == [None, None], "the rank actors were given a runtime environment of their own"


def test_dead_rank_breaks_group_and_rebuild_recovers(group, reference):
    generation = group.generation
    ray.kill(group.workers[1], no_restart=True)
    with pytest.raises(GroupError, match="rank"):
        group.generate(REQUEST)
    assert group.broken
    group.rebuild()
    assert group.generation == generation + 1
    assert np.abs(pixels(group.generate(REQUEST)) - reference).max() <= 1


def test_a_rank_out_of_memory_fails_its_request_as_such_at_once_and_the_rebuilt_group_serves(
    group, reference
):
    """The ranks' memory capped 300 MB above their use, then a request needing far more (8 images of 512x512
    px): the allocation fails in the ranks, the group reports ``out_of_memory`` (the serving layer answers
    507 and does not retry it on the same ranks) within seconds, not at a collective's timeout; the rebuilt
    group's processes have no cap and serve the right image."""
    generation = group.generation
    for pid in group.pids():
        cap_address_space(pid, 300 << 20)
    big = REQUEST.model_copy(update={"height": 512, "width": 512, "num_images": 8, "steps": 2})
    began = time.monotonic()
    with pytest.raises(GroupError, match="can't allocate memory") as failed:
        group.generate(big)
    assert failed.value.cause == "out_of_memory" and group.broken_cause == "out_of_memory"
    assert time.monotonic() - began < 30
    group.rebuild()
    assert group.generation == generation + 1
    assert np.abs(pixels(group.generate(REQUEST)) - reference).max() <= 1


def test_a_rank_frozen_mid_request_is_detected_within_the_collective_timeout(group, reference):
    """SIGSTOP one rank while the group is inside a request: its peer's next collective times out after
    collective_timeout_s and the call fails at once (not after request_timeout_s); a rebuild recovers."""
    long = REQUEST.model_copy(update={"height": 256, "width": 256, "steps": 30})
    pid = group.pids()[1]
    with ThreadPoolExecutor(1) as runner:
        running = runner.submit(group.generate, long)
        deadline = time.monotonic() + 60
        while (progress := group.collective_rpc("progress", ranks=[0])[0]) is None or progress["step"] < 1:
            assert time.monotonic() < deadline and not running.done(), "the request never started"
            time.sleep(0.1)
        os.kill(pid, signal.SIGSTOP)  # rank 1 stops answering: rank 0 waits in a collective
        frozen = time.monotonic()
        try:
            with pytest.raises(GroupError, match="rank"):
                running.result(timeout=POOL.request_timeout_s)
            detected = time.monotonic() - frozen
        finally:
            group.rebuild()  # kills the stopped process too
    assert detected <= POOL.collective_timeout_s + 10, f"noticed after {detected:.0f} s"
    assert np.abs(pixels(group.generate(REQUEST)) - reference).max() <= 1


def test_cancel_stops_every_rank_at_one_step_and_leaves_the_group_usable(group, reference):
    """Cancelled from another thread (as the Serve replica does when a client goes away): every rank
    raises RequestStopped at the same step, the group is not broken, and the next request is right."""
    import asyncio

    long = REQUEST.model_copy(update={"height": 256, "width": 256, "steps": 30})
    generation = group.generation

    async def cancelled_mid_request() -> None:
        task = asyncio.ensure_future(group.generate_async(long, request_id="to-cancel"))
        while (progress := (await group.collective_rpc_async("progress", ranks=[0]))[0]) is None or progress[
            "step"
        ] < 2:
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_mid_request())
    assert not group.broken and group.generation == generation
    assert group.collective_rpc("progress") == [None, None], "a rank is still busy with the cancelled request"
    outcomes = group.collective_rpc("last_request")
    assert [o["outcome"] for o in outcomes] == ["cancelled", "cancelled"], outcomes
    assert outcomes[0]["step"] == outcomes[1]["step"] < long.steps - 10, f"not stopped early: {outcomes}"
    assert np.abs(pixels(group.generate(REQUEST)) - reference).max() <= 1


def test_the_compile_artifact_store_is_one_per_cluster_and_drops_the_oldest_engine_past_its_budget(group):
    from rayxdit.runtime.compile_artifacts import ArtifactStore, artifact_store

    assert artifact_store()._actor_id == artifact_store()._actor_id  # every replica finds the same one
    store = ArtifactStore.remote(budget_bytes=10)
    ray.get(store.put.remote("engine-a", {"rank 0/2": b"aaaa", "rank 1/2": b"bb"}))
    ray.get(store.put.remote("engine-b", {"rank 0/1": b"ccc"}))
    assert ray.get(store.fingerprints.remote("engine-a")) == {"rank 0/2", "rank 1/2"}
    assert ray.get(store.get.remote("engine-a")) == {"rank 0/2": b"aaaa", "rank 1/2": b"bb"}  # now the newest
    ray.get(store.put.remote("engine-c", {"rank 0/1": b"dddd"}))  # 13 bytes: engine-b, least recent, goes
    assert ray.get(store.get.remote("engine-b")) == {}
    assert ray.get(store.get.remote("engine-a")) and ray.get(store.get.remote("engine-c"))
    ray.kill(store)


def test_the_artifact_store_outlives_the_placement_group_of_the_replica_that_started_it(group):
    """A Serve replica's children land in its placement group (the ranks must); the store must not, or
    it goes with the first replica that asked for it (seen on a GPU: every restart found an empty store)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from rayxdit.runtime.compile_artifacts import STORE_NAME, STORE_NAMESPACE, artifact_store

    with contextlib.suppress(ValueError):  # another test's: this one must be made by the replica below
        ray.kill(ray.get_actor(STORE_NAME, namespace=STORE_NAMESPACE))
    wait_until(lambda: STORE_NAME not in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)})

    @ray.remote(num_cpus=0.01)
    class Replica:
        async def publish(self) -> None:
            await artifact_store().put.remote("engine", {"rank 0/1": b"compiled"})

    pg = placement_group([{"CPU": 0.01}])
    ray.get(pg.ready(), timeout=60)
    capture = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    replica = Replica.options(scheduling_strategy=capture).remote()
    ray.get(replica.publish.remote())
    remove_placement_group(pg)  # as Serve does when the replica goes
    wait_until(lambda: gone(replica))
    assert ray.get(artifact_store().get.remote("engine")) == {"rank 0/1": b"compiled"}


def gone(actor) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=5)
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.GetTimeoutError:
        pass
    return False


def wait_until(predicate, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_frozen_fork_server_is_replaced_and_the_group_starts_anyway(group, reference):
    """The node's fork server frozen (SIGSTOP: as a process stuck in the kernel would be): a worker group
    started now waits fork_timeout_s for it, then kills it and forks its ranks from a new server; the ranks
    the old one forked run on. Without the timeout, the start would wait for ever."""
    import psutil

    sockets = [  # this cluster's servers (another test's cluster may have its own)
        ray.get(ray.get_actor(actor["name"], namespace=actor["namespace"]).address.remote())
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("rayxdit-forks-")
    ]
    # The servers, not their children (forked, the ranks share their command line).
    servers = [
        process
        for process in psutil.process_iter(["cmdline"])
        if any(path in (process.info["cmdline"] or []) for path in sockets)
        and not any(path in process.parent().cmdline() for path in sockets)
    ]
    assert servers, "the group's ranks came from a fork server"
    for server in servers:
        server.suspend()
    pg = placement_group(group_bundles(POOL), strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    frozen_out = RayExecutor.for_group(
        POOL.model_copy(update={"fork_timeout_s": 3.0}), placement_group=pg, name="frozen-server"
    )
    try:
        began = time.monotonic()
        frozen_out.start()
        assert np.abs(pixels(frozen_out.generate(REQUEST)) - reference).max() <= 1
        assert time.monotonic() - began < 240
        assert all(not server.is_running() or server.status() == psutil.STATUS_ZOMBIE for server in servers)
        assert np.abs(pixels(group.generate(REQUEST)) - reference).max() <= 1  # the old server's ranks
    finally:
        for server in servers:
            with contextlib.suppress(psutil.Error):
                server.kill()
        frozen_out.shutdown()
        remove_placement_group(pg)
