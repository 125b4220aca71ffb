import os

# Spawned ranks inherit this: keeps transformers' import-time notices (no torchvision) out of test logs.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Ray starts one idle worker per logical CPU for a cluster's first driver; the tests' clusters declare many
# CPUs (test_serve.py: 32) on a 2-core machine, and ~50 idle workers importing Ray cost ~90 CPU-seconds a
# suite. Every cluster the tests start (ray.init, `ray start`, `rayxdit serve`) inherits this.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
