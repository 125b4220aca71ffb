"""How long to wait before retrying: exponential backoff with jitter, bounded.

Every retry a client of rayxdit can see (a batch row whose worker group failed, a request routed again
after its replica died) waits ``backoff_s``: the wait doubles with each attempt up to a cap, and half of it
is random, so that many clients failing at once (a node lost under a full queue) come back spread out
instead of together, yet each waits at least half the nominal time (enough for what failed to be noticed:
Serve's handles learn of a dead replica within about a second, a rebuilt group needs its ranks back).
Torch- and Ray-free: the router, the batch job and the tests import it alike.
"""

from __future__ import annotations

import random


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry): ``d / 2`` plus a uniform
    draw from ``[0, d / 2]``, where ``d = min(cap_s, base_s * 2 ** (attempt - 1))`` ("equal jitter")."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, not {attempt}")
    nominal = min(cap_s, base_s * 2.0 ** min(attempt - 1, 62))
    return nominal / 2 + (rng or random).uniform(0.0, nominal / 2)
