import atexit
import os
import shutil
import sys
import tempfile

import pytest

# Spawned ranks inherit this: keeps transformers' import-time notices (no torchvision) out of test logs.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Ray starts one idle worker per logical CPU for a cluster's first driver; the tests' clusters declare many
# CPUs (test_serve.py: 32) on a 2-core machine, and ~50 idle workers importing Ray cost ~90 CPU-seconds a
# suite. Every cluster the tests start (ray.init, `ray start`, `rayxdit serve`) inherits this.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
# The nodes' host copies of weights (rayxdit.models.host_copy) of one test session, and only of it: every rank
# any test starts (spawned, forked, Ray actors) inherits this, and nothing lingers in /dev/shm afterwards.
_HOST_COPIES = None
if "RAYXDIT_HOST_COPY_DIR" not in os.environ:
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    _HOST_COPIES = os.environ["RAYXDIT_HOST_COPY_DIR"] = tempfile.mkdtemp(
        prefix="rayxdit-host-copies-", dir=shm
    )
    atexit.register(shutil.rmtree, _HOST_COPIES, True)


@pytest.fixture(autouse=True, scope="module")
def no_ray_left_behind():
    """After each test module, this process is out of any Ray instance, whatever the module did: a test that
    fails between its ``ray.init`` (or a benchmark's ``main``) and its shutdown would otherwise leave one,
    and every later ``ray.init`` would fail ("called ray.init twice"), one failure becoming forty."""
    yield
    if "ray" not in sys.modules:  # nothing to do, and no Ray import for modules that never used it
        return
    import ray

    if not ray.is_initialized():
        return
    if "ray.serve" in sys.modules:
        from tests.helpers import leave_ray_with_serve

        leave_ray_with_serve()
    else:
        ray.shutdown()


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Once pytest has reported, leave with its exit status without the interpreter's teardown: after a
    suite of 432 tests passed in a fresh clone (2026-12-04), the interpreter crashed with SIGSEGV while
    tearing down (native threads of the libraries the suite loaded, torch's and Ray's, outliving the
    modules they call into), which turned a green run red. Every Ray instance is shut down per module
    above, and nothing of ours runs at exit. ``RAYXDIT_TEST_TEARDOWN=1`` keeps the teardown (to look for
    the crash)."""
    if _HOST_COPIES is not None:  # os._exit below skips atexit
        shutil.rmtree(_HOST_COPIES, ignore_errors=True)
    if _EXIT_STATUS and os.environ.get("RAYXDIT_TEST_TEARDOWN") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
