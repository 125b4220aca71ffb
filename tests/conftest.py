import os

# Spawned ranks inherit this: keeps transformers' import-time notices (no torchvision) out of test logs.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Ray starts one idle worker per logical CPU for a cluster's first driver; the tests' clusters declare many
# CPUs (test_serve.py: 32) on a 2-core machine, and ~50 idle workers importing Ray cost ~90 CPU-seconds a
# suite. Every cluster the tests start (ray.init, `ray start`, `rayxdit serve`) inherits this.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

# The suite runs on two workers (pytest-xdist, one file per work unit: a module's cluster is started once).
# A worker takes the next file when it finishes one, so the longest files go first and the short ones fill
# the gaps at the end (longest-processing-time-first). Seconds per file on 2 cores, measured; an unlisted
# file counts as short.
SECONDS_PER_FILE = {
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


def pytest_collection_modifyitems(session, config, items):
    def seconds(item) -> int:
        return SECONDS_PER_FILE.get(item.nodeid.split("::")[0], 0)

    items.sort(key=seconds, reverse=True)  # stable: a file's tests keep their order
