"""What the application's shared state keeps beyond its replica's life: a journal it writes changes to.

The state replica (``serve/state.py``) keeps everything in its memory, and every read is answered from there.
Each change to what must survive a restart (jobs and their results, ``response_format=url`` images, tenants'
usage and the windows their limits are counted over) is also written through to a :class:`Journal`, and a
replica that starts reads the journal back. Two journals:

- :class:`MemoryJournal`, the embedded default: nothing is written, so a restart of the state replica (killed,
  or its node lost) loses stored images, jobs and usage: clients get 404 for them, and a job's driver stops it.
- :class:`RedisJournal` (``state.redis_url``): one Redis key per item, with Redis' own expiry for what has a
  TTL, and a set per kind of item to read them back by. Written synchronously from the state replica's event
  loop (a local Redis answers in a fraction of a millisecond, and the replica runs one call at a time, so the
  order of writes is the order of changes). If Redis cannot be reached the state goes on serving from memory
  and says so in the log and in ``rayxdit_state_store_errors``: an outage of the store degrades durability,
  never the service.

``claim`` makes a retried report count once: a router whose call to a dying replica failed sends it again to
the next one, which may be the first to hear of it or not. What the claim counts is saved with it, in one step
(a replica killed between the two would leave a claim whose count is lost: the report sent again would find it
claimed).

Values are bytes; what they mean is the caller's (JSON for records, raw bytes for images and frames). Nothing
is unpickled: a Redis an attacker can write to must not run code here.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Sequence
from typing import Protocol

from rayxdit.serve import metrics

logger = logging.getLogger("ray.serve")
CONNECT_S = 30.0
"""How long a starting state replica waits for its Redis before it fails (with the URL's host in the error)."""
SOCKET_TIMEOUT_S = 2.0
"""A Redis call that takes longer fails (and is logged) rather than holding the state's event loop."""
LOAD_BATCH = 256

Item = tuple[str, str, bytes, float | None]
"""What :meth:`Journal.save` takes, as one tuple: ``(space, key, value, ttl_s)``."""


class Journal(Protocol):
    """Where the state writes what must outlive it. ``space``: a kind of item (``images``, ``jobs``...);
    ``key``: an item of it; ``ttl_s``: how long it is kept (None: until dropped)."""

    durable: bool

    def save(self, space: str, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    def drop(self, space: str, key: str) -> None: ...

    def load(self, space: str) -> dict[str, tuple[bytes, float]]:
        """Every item of ``space`` still kept: key -> (value, seconds it is still kept; inf: no TTL)."""
        ...

    def claim(self, space: str, key: str, ttl_s: float, saving: Sequence[Item] = ()) -> bool:
        """True the first time ``key`` is claimed within ``ttl_s``, and then ``saving`` is saved with the
        claim in one step (a writer killed midway has done both or neither); False for a repeat, nothing
        saved."""
        ...


class MemoryJournal:
    """No journal: what the state holds lives and dies with its replica."""

    durable = False

    def __init__(self) -> None:
        self._claims: dict[tuple[str, str], float] = {}

    def save(self, space: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        pass

    def drop(self, space: str, key: str) -> None:
        pass

    def load(self, space: str) -> dict[str, tuple[bytes, float]]:
        return {}

    def claim(self, space: str, key: str, ttl_s: float, saving: Sequence[Item] = ()) -> bool:
        now = time.monotonic()
        if len(self._claims) > 10_000:  # bounded: forget the expired ones
            self._claims = {k: until for k, until in self._claims.items() if until > now}
        if self._claims.get((space, key), -math.inf) > now:
            return False
        self._claims[(space, key)] = now + ttl_s
        return True


class ClusterJournal:
    """Items in Ray's GCS key-value store (namespace ``<prefix>``), which lives as long as the cluster: for
    records about the cluster itself (its quarantined nodes), which must outlive the state replica (a drained
    node moves it) but mean nothing to another cluster. Without a TTL (items stay until dropped); Ray must be
    initialized (it is in a Serve replica)."""

    durable = True

    def __init__(self, prefix: str = "rayxdit"):
        from ray.experimental import internal_kv

        self._kv = internal_kv
        self.namespace = prefix

    def _key(self, space: str, key: str = "") -> bytes:
        return f"{space}:{key}".encode()

    def save(self, space: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._kv._internal_kv_put(self._key(space, key), value, overwrite=True, namespace=self.namespace)

    def drop(self, space: str, key: str) -> None:
        self._kv._internal_kv_del(self._key(space, key), namespace=self.namespace)

    def load(self, space: str) -> dict[str, tuple[bytes, float]]:
        items = {}
        for full in self._kv._internal_kv_list(self._key(space), namespace=self.namespace):
            value = self._kv._internal_kv_get(full, namespace=self.namespace)
            if value is not None:
                items[full.decode().split(":", 1)[1]] = (value, math.inf)
        return items

    def claim(self, space: str, key: str, ttl_s: float, saving: Sequence[Item] = ()) -> bool:
        raise NotImplementedError("ClusterJournal keeps records, not claims")


def cluster_journal(prefix: str = "rayxdit") -> Journal:
    """A :class:`ClusterJournal` where Ray runs (a Serve replica), else a :class:`MemoryJournal` (the state
    built alone, in a unit test)."""
    import ray

    return ClusterJournal(prefix) if ray.is_initialized() else MemoryJournal()


CLAIM_AND_SAVE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
for item = 0, (#KEYS - 1) / 2 - 1 do
  local key, index = KEYS[2 + 2 * item], KEYS[3 + 2 * item]
  local value, ttl_ms, member = ARGV[2 + 3 * item], tonumber(ARGV[3 + 3 * item]), ARGV[4 + 3 * item]
  if ttl_ms > 0 then redis.call('SET', key, value, 'PX', ttl_ms) else redis.call('SET', key, value) end
  redis.call('SADD', index, member)
end
return 1
"""
"""RedisJournal.claim: KEYS = the claim, then each item's key and its space's index; ARGV = the claim's TTL
(ms), then each item's value, TTL (ms; 0: none) and key."""


class RedisJournal:
    """Items as Redis keys ``<prefix>:<space>:<key>`` (expiring with their TTL), listed in the set
    ``<prefix>:<space>`` (members whose key expired are pruned when it is read back)."""

    durable = True

    def __init__(self, url: str, prefix: str, connect_s: float = CONNECT_S):
        import redis  # only a state with a Redis configured needs the client

        self._errors = redis.RedisError
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=SOCKET_TIMEOUT_S
        )
        self.where = self.client.connection_pool.connection_kwargs.get("host", url.split("@")[-1])
        bound = time.monotonic() + connect_s
        while True:
            try:
                self.client.ping()
                break
            except redis.RedisError as error:
                if time.monotonic() > bound:
                    raise RuntimeError(
                        f"the state's Redis at {self.where} did not answer within {connect_s:.0f} s ({error}); "
                        "start it, fix state.redis_url, or remove it to keep the state in memory"
                    ) from None
                time.sleep(0.5)
        self._failing = False
        self._claim_and_save = self.client.register_script(CLAIM_AND_SAVE)

    def _key(self, space: str, key: str) -> str:
        return f"{self.prefix}:{space}:{key}"

    def _index(self, space: str) -> str:
        return f"{self.prefix}:{space}"

    def _failed(self, what: str, error: Exception) -> None:
        metrics.inc("rayxdit_state_store_errors", operation=what)
        if not self._failing:  # one line per outage, not one per write
            logger.warning(
                "the state's Redis at %s failed (%s: %r): serving from memory; what changes until it is back "
                "would be lost with this replica",
                self.where,
                what,
                error,
            )
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            logger.warning("the state's Redis at %s answers again", self.where)
            self._failing = False

    def save(self, space: str, key: str, value: bytes, ttl_s: float | None = None) -> None:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.set(
                    self._key(space, key), value, px=None if ttl_s is None else max(1, int(ttl_s * 1000))
                )
                pipe.sadd(self._index(space), key)
                pipe.execute()
            self._recovered()
        except self._errors as error:
            self._failed("save", error)

    def drop(self, space: str, key: str) -> None:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.delete(self._key(space, key))
                pipe.srem(self._index(space), key)
                pipe.execute()
            self._recovered()
        except self._errors as error:
            self._failed("drop", error)

    def load(self, space: str) -> dict[str, tuple[bytes, float]]:
        members = sorted(member.decode() for member in self.client.smembers(self._index(space)))
        found: dict[str, tuple[bytes, float]] = {}
        gone: list[str] = []
        for start in range(0, len(members), LOAD_BATCH):
            batch = members[start : start + LOAD_BATCH]
            with self.client.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.get(self._key(space, key))
                    pipe.pttl(self._key(space, key))
                replies = pipe.execute()
            for key, value, ttl_ms in zip(batch, replies[::2], replies[1::2], strict=True):
                if value is None:
                    gone.append(key)
                else:
                    found[key] = (value, math.inf if ttl_ms < 0 else ttl_ms / 1000)
        if gone:
            self.client.srem(self._index(space), *gone)
        return found

    def claim(self, space: str, key: str, ttl_s: float, saving: Sequence[Item] = ()) -> bool:
        # One Lua script: Redis runs it whole, whenever the client that sent it dies.
        keys = [self._key(f"claim:{space}", key)]
        args: list[bytes | str | int] = [max(1, int(ttl_s * 1000))]
        for item_space, item_key, value, item_ttl_s in saving:
            keys += [self._key(item_space, item_key), self._index(item_space)]
            args += [value, 0 if item_ttl_s is None else max(1, int(item_ttl_s * 1000)), item_key]
        try:
            claimed = self._claim_and_save(keys=keys, args=args)
            self._recovered()
            return bool(claimed)
        except self._errors as error:
            self._failed("claim", error)
            return True  # counted twice at worst, never lost


def open_journal(redis_url: str | None, prefix: str) -> Journal:
    """The journal a state with this configuration writes to."""
    return MemoryJournal() if redis_url is None else RedisJournal(redis_url, prefix)


def wall_offset(now: float) -> float:
    """What to add to a monotonic time to get the wall-clock time, ``now`` being the monotonic clock's
    reading: what the journal keeps are wall-clock times, since monotonic clocks differ between hosts."""
    return time.time() - now


def pack_parts(parts: list[bytes]) -> bytes:
    """Several byte strings as one value (a job's frames), read back by :func:`unpack_parts`."""
    header = struct.pack(f"<I{len(parts)}Q", len(parts), *(len(part) for part in parts))
    return header + b"".join(parts)


def unpack_parts(value: bytes) -> list[bytes]:
    (count,) = struct.unpack_from("<I", value)
    sizes = struct.unpack_from(f"<{count}Q", value, 4)
    offset, parts = 4 + 8 * count, []
    for size in sizes:
        parts.append(value[offset : offset + size])
        offset += size
    return parts
