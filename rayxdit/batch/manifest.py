"""The output directory: images plus a parquet manifest, written so that a crash loses nothing.

    OUTPUT/images/<id>.png         written to a temporary name, then renamed: present means complete
    OUTPUT/videos/<id>.mp4         (video models) likewise
    OUTPUT/manifest/part-*.parquet  one file per batch of finished rows, also renamed into place
    OUTPUT/manifest.parquet         every run ends by merging the parts: one row per input id

A rerun reads the parts, skips ids that are ``ok`` (or ``invalid``: the input cannot change), and adopts
images that were written but whose manifest part was lost with the crash, so no image is made twice.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rayxdit.batch.rows import STATUS_FAILED, STATUS_INVALID, STATUS_OK, file_stem

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("size", pa.string()),
        ("steps", pa.int64()),
        ("frames", pa.int64()),
        ("image", pa.string()),
        ("mask", pa.string()),
        ("strength", pa.float64()),
        ("control_image", pa.string()),
        ("controlnet", pa.string()),
        ("controlnet_scale", pa.float64()),
        ("ip_adapter_image", pa.string()),
        ("ip_adapter_scale", pa.float64()),
        ("scheduler", pa.string()),
        ("loras", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("seconds", pa.float64()),
        ("gpu_seconds", pa.float64()),
        ("ranks", pa.int64()),
        ("attempts", pa.int64()),
        ("recovered", pa.bool_()),
        ("run_id", pa.string()),
    ]
)
PRIORITY = {STATUS_OK: 2, STATUS_INVALID: 1, STATUS_FAILED: 0}


def output_path(output: Path, identifier: str, video: bool = False) -> Path:
    """Where a row's result goes: ``images/<id>.png``, or for a video model ``videos/<id>.mp4``."""
    if video:
        return output / "videos" / f"{file_stem(identifier)}.mp4"
    return output / "images" / f"{file_stem(identifier)}.png"


def write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    staging.write_bytes(data)
    os.replace(staging, path)


def remove_partial_files(output: Path) -> None:
    """Temporary files a killed run left behind (their final names were never written)."""
    for folder in (output / "images", output / "videos", output / "manifest", output):
        if folder.is_dir():
            for leftover in folder.glob(".*.tmp"):
                leftover.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(row: dict[str, Any], run_id: str, **fields: Any) -> dict[str, Any]:
    """A manifest row for a normalized input row."""
    base = {name: row.get(name) for name in SCHEMA.names}
    base.update(run_id=run_id, recovered=False, attempts=0)
    base.update(fields)
    return {name: base.get(name) for name in SCHEMA.names}


def write_part(output: Path, records: list[dict[str, Any]], run_id: str) -> None:
    if not records:
        return
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    folder = output / "manifest"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"part-{run_id}-{uuid.uuid4().hex[:8]}.parquet"
    staging = folder / f".{final.name}.tmp"
    pq.write_table(table, staging)
    os.replace(staging, final)


def load_records(output: Path) -> dict[str, dict[str, Any]]:
    """The best record per id over every part written so far (ok over invalid over failed, then latest)."""
    best: dict[str, dict[str, Any]] = {}
    folder = output / "manifest"
    for part in (
        sorted(folder.glob("part-*.parquet"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    ):
        for row in pq.read_table(part).to_pylist():
            current = best.get(row["id"])
            if current is None or PRIORITY[row["status"]] >= PRIORITY[current["status"]]:
                best[row["id"]] = row
    return best


def consolidate(output: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write ``manifest.parquet`` with exactly the given records (one per id)."""
    path = output / "manifest.parquet"
    staging = output / ".manifest.parquet.tmp"
    pq.write_table(pa.Table.from_pylist(list(records), schema=SCHEMA), staging)
    os.replace(staging, path)
    return path
