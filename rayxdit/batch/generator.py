"""The Ray Data actor: owns a placement group of N GPUs and the worker group in it, generates rows."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from rayxdit.batch.manifest import SCHEMA, output_path, record, sha256_file, write_atomically
from rayxdit.batch.rows import STATUS_FAILED, STATUS_INVALID, STATUS_OK
from rayxdit.config import WorkerGroupConfig
from rayxdit.imaging import encode_video
from rayxdit.request import GenerateRequest, RequestError, engine_seconds
from rayxdit.retries import backoff_s
from rayxdit.runtime.placement import group_bundles
from rayxdit.runtime.ray_executor import RayExecutor

PLACEMENT_TIMEOUT_S = 1800
PLACEMENT_PREFIX = "rayxdit-batch-"
RETRY_BASE_S, RETRY_CAP_S = 2.0, 60.0
"""A row whose worker group failed is tried again after 1-2 s, then 2-4 s, ... (at most 60 s; retries.py)."""


class GroupGenerator:
    """One member of the Ray Data actor pool. Its worker group lives in a placement group it creates (one
    bundle per rank, STRICT_PACK), so the actor pool's size is counted in whole multi-GPU groups."""

    def __init__(
        self, group: WorkerGroupConfig, output: str, run_id: str, max_attempts: int, fps: int | None = None
    ):
        """``fps``: the model makes videos, written as MP4 at this rate."""
        self.group = group
        self.fps = fps
        self.output = Path(output)
        self.run_id = run_id
        self.max_attempts = max_attempts
        # Named after the run, so that the driver can tell the user when a group waits for resources.
        self.placement = placement_group(
            group_bundles(group),
            strategy=group.placement_strategy,
            name=f"{PLACEMENT_PREFIX}{run_id}-{uuid.uuid4().hex[:6]}",
        )
        ray.get(self.placement.ready(), timeout=PLACEMENT_TIMEOUT_S)
        self.executor = RayExecutor.for_group(group, self.placement, name=f"batch-{uuid.uuid4().hex[:6]}")
        self.executor.start()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self._generate(row) for row in batch.to_pylist()], schema=SCHEMA)

    def _generate(self, row: dict[str, Any]) -> dict[str, Any]:
        request = GenerateRequest.model_validate_json(row["request"])
        error = None
        for attempt in range(1, self.max_attempts + 1):
            begin = time.perf_counter()
            try:
                if self.executor.broken:
                    self.executor.rebuild()
                result = self.executor.generate(request)
            except RequestError as problem:  # the loaded model refuses the row itself: retrying cannot help
                return record(row, self.run_id, status=STATUS_INVALID, error=str(problem), attempts=attempt)
            except Exception as problem:  # a rank died or hung (GroupError), or a rebuild failed: retry
                error = f"{type(problem).__name__}: {str(problem).strip().splitlines()[-1] if str(problem).strip() else ''}"
                if attempt < self.max_attempts:  # spread out: a lost node fails many groups at once
                    time.sleep(backoff_s(attempt, RETRY_BASE_S, RETRY_CAP_S))
                continue
            path = output_path(self.output, row["id"], video=self.fps is not None)
            if self.fps is None:
                write_atomically(path, result.pngs[0])
            else:
                write_atomically(path, encode_video(result.pngs, "mp4", self.fps))
            return record(
                row,
                self.run_id,
                status=STATUS_OK,
                path=str(path.relative_to(self.output)),
                sha256=sha256_file(path),
                seconds=round(time.perf_counter() - begin, 4),
                gpu_seconds=round(self.group.ranks * (engine_seconds(result.timings) or 0.0), 4),
                ranks=self.group.ranks,
                attempts=attempt,
            )
        return record(row, self.run_id, status=STATUS_FAILED, error=error, attempts=self.max_attempts)

    def __del__(self):
        try:
            self.executor.shutdown()
            remove_placement_group(self.placement)
        except Exception:
            pass
