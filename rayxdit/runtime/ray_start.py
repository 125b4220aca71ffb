"""``ray.init`` that outlasts Ray's own start-up race on a loaded machine.

Ray starts a new local instance's processes (GCS, dashboard, autoscaler monitor, log monitor, raylet) and then
waits a fixed 30 s for the raylet to register with the GCS (``ray/_private/node.py``). On a loaded 2-core
machine a raylet once in a few hundred starts never did, and never wrote a line of its log (2026-12-06: the
tenants benchmark's ``ray.init`` in a clean-clone test run, and a multi-node cluster's node in another); the
start then fails with "The current node timed out during startup", and the processes it did start run on
until this process exits. :func:`init_ray` kills those and starts again, once.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

START_TIMED_OUT = "timed out during startup"
"""What Ray's exception says where its new node's raylet did not register in time."""
ATTEMPTS = 2

logger = logging.getLogger(__name__)


def init_ray(**options: Any) -> Any:
    """``ray.init(**options)``, tried again once where Ray gave up waiting for its new node's raylet (see the
    module's docstring), after the failed attempt's processes are killed. Any other failure is raised as is."""
    import psutil
    import ray

    me = psutil.Process()
    for attempt in range(1, ATTEMPTS + 1):
        before = {child.pid for child in me.children(recursive=True)}
        try:
            return ray.init(**options)
        except Exception as error:
            if attempt == ATTEMPTS or START_TIMED_OUT not in str(error):
                raise
            started = [child for child in me.children(recursive=True) if child.pid not in before]
            for child in started:
                with contextlib.suppress(psutil.Error):
                    child.kill()
            psutil.wait_procs(started, timeout=10)
            ray.shutdown()
            logger.warning(
                "Ray's start timed out waiting for its raylet (%s); %d of its processes killed, starting it again",
                error,
                len(started),
            )
    raise AssertionError("unreachable")
