"""GPU benchmarks, the fleet simulator and their shared provenance helpers."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def source_commit() -> str | None:
    """The commit the measured code comes from, with ``-dirty`` when the package or the benchmark scripts
    differ from it (results and notebooks do not count): a result must name the code that produced it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "rayxdit", "benchmarks/*.py", "benchmarks/workloads"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not head:
        return None
    return f"{head}-dirty" if changed else head
