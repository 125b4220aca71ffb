import os

# Spawned ranks inherit this: keeps transformers' import-time notices (no torchvision) out of test logs.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Ray starts one idle worker per logical CPU for a cluster's first driver; the tests' clusters declare many
# CPUs (test_serve.py: 32) on a 2-core machine, and ~50 idle workers importing Ray cost ~90 CPU-seconds a
# suite. Every cluster the tests start (ray.init, `ray start`, `rayxdit serve`) inherits this.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

# The suite runs on two workers (pytest-xdist, ``--dist loadgroup``). Every test that starts a Ray cluster
# runs on one worker, one module after another: two clusters of many rank processes at once on 2 cores
# thrash (measured: a run that put the Serve and elastic modules side by side took three times as long).
# The other worker takes the rest (local gloo groups, pure functions), a module at a time, so a module's
# fixtures are built once. Within a worker the longest modules go first.
import pytest

RAY_CLUSTERS = "ray-clusters"
STARTS_A_RAY_CLUSTER = {
    "tests/serve/test_serve.py",
    "tests/cluster/test_elastic.py",
    "tests/batch/test_batch_job.py",
    "tests/batch/test_batch_local.py",
    "tests/benchmarks/test_bench_serve.py",
    "tests/benchmarks/test_bench_load.py",
    "tests/runtime/test_ray_executor.py",
    "tests/test_cli.py::test_serve_default_answers_curl_with_a_png",
}
SECONDS_PER_FILE = {  # on 2 cores, measured; an unlisted file counts as short
    "tests/serve/test_serve.py": 330,
    "tests/test_cli.py": 235,
    "tests/cluster/test_elastic.py": 205,
    "tests/models/test_parity.py": 170,
    "tests/batch/test_batch_job.py": 150,
    "tests/batch/test_batch_local.py": 100,
    "tests/benchmarks/test_bench_serve.py": 90,
    "tests/runtime/test_ray_executor.py": 55,
    "tests/runtime/test_compile_artifacts.py": 40,
    "tests/models/test_step_cache.py": 25,
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        path = item.nodeid.split("::")[0]
        cluster = path in STARTS_A_RAY_CLUSTER or item.nodeid.split("[")[0] in STARTS_A_RAY_CLUSTER
        item.add_marker(pytest.mark.xdist_group(RAY_CLUSTERS if cluster else path))
    items.sort(key=lambda item: SECONDS_PER_FILE.get(item.nodeid.split("::")[0], 0), reverse=True)
