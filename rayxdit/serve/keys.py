"""The API keys a router replica accepts: the config's ``router.api_keys``, those of the environment
variable ``router.api_keys_env`` names (read at start), and those of ``router.api_keys_file`` (e.g. a
mounted Kubernetes secret), read again within ``KEYS_CHECK_S`` of a change, so that keys are added and
revoked without a restart.

Keys are held and matched by their SHA-256 only. A file that cannot be read or does not validate at a
reload leaves the keys as they were (logged): a bad edit locks nobody out. At start it fails the replica,
with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rayxdit.config import ApiKey, ConfigError, RouterConfig, keys_by_digest

logger = logging.getLogger("ray.serve")
KEYS_CHECK_S = 2.0
"""How often a request makes the replica look whether the keys file changed."""


def keys_from_environment(name: str | None) -> list[Any]:
    """The keys in environment variable ``name`` (a YAML or JSON list); ConfigError when it is not set or
    not such a list (a router that should ask for keys must not start open)."""
    if name is None:
        return []
    text = os.environ.get(name)
    if text is None:
        raise ConfigError(f"router.api_keys_env: the environment variable {name} is not set on this node")
    try:
        entries = yaml.safe_load(text) or []
    except yaml.YAMLError as error:
        raise ConfigError(f"router.api_keys_env: {name} is not YAML or JSON ({error})") from None
    if not isinstance(entries, list):
        raise ConfigError(f"router.api_keys_env: {name} must hold a list of keys, as router.api_keys")
    try:
        keys_by_digest(entries)
    except ValueError as error:
        raise ConfigError(f"router.api_keys_env: {name}: {str(error).splitlines()[0]}") from None
    return entries


class KeyRing:
    """The accepted keys by digest (see the module docstring)."""

    def __init__(self, router: RouterConfig, clock: Callable[[], float] = time.monotonic):
        self.written = list(router.api_keys) + keys_from_environment(router.api_keys_env)
        self.path = None if router.api_keys_file is None else Path(router.api_keys_file)
        self.required = bool(self.written) or self.path is not None or router.api_keys_env is not None
        """Whether requests need a key (a keys file, even an empty one, means yes)."""
        self.clock = clock
        self.keys = keys_by_digest(self.written)
        self.stamp: tuple[int, int, int] | None = None
        self.checked = -math.inf
        if self.path is not None:
            problem = self._reload()
            if problem is not None:
                raise ConfigError(f"router.api_keys_file: {problem}")

    def _reload(self) -> str | None:
        """Read the keys file again if it changed; the problem, if it could not be used."""
        self.checked = self.clock()
        try:
            status = self.path.stat()
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
            if stamp == self.stamp:
                return None
            entries = yaml.safe_load(self.path.read_text()) or []
            if not isinstance(entries, list):
                raise ValueError("expected a list of keys (strings or objects), as in router.api_keys")
            keys = keys_by_digest(self.written + entries)
        except (OSError, ValueError, yaml.YAMLError) as error:  # pydantic's errors are ValueErrors
            return f"{self.path}: {str(error).splitlines()[0]}"
        added, removed = keys.keys() - self.keys.keys(), self.keys.keys() - keys.keys()
        if self.stamp is not None:
            logger.info(
                "API keys reloaded from %s: %d added, %d removed", self.path, len(added), len(removed)
            )
        self.keys, self.stamp = keys, stamp
        return None

    def lookup(self, token: str) -> ApiKey | None:
        """The key ``token`` is, if it is one."""
        if self.path is not None and self.clock() - self.checked >= KEYS_CHECK_S:
            problem = self._reload()
            if problem is not None:
                logger.error("API keys not reloaded, the previous ones still hold: %s", problem)
        digest = hashlib.sha256(token.encode()).hexdigest()
        return next((key for known, key in self.keys.items() if secrets.compare_digest(digest, known)), None)
