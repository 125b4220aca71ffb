"""GPU benchmarks, the fleet simulator and their shared provenance helpers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def source_commit() -> str | None:
    """The commit the measured code comes from, with ``-dirty`` when the package or the benchmark scripts
    differ from it (results and notebooks do not count): a result must name the code that produced it.
    ``RAYXDIT_SOURCE_COMMIT`` names it where the tree is a copy without its own history (the GPU machines
    receive the working tree, not the repository's current .git)."""
    if os.environ.get("RAYXDIT_SOURCE_COMMIT"):
        return os.environ["RAYXDIT_SOURCE_COMMIT"]
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


def command_line() -> str:
    """How this run was started, as a result records it: the interpreter's name and the arguments."""
    import sys

    return " ".join([Path(sys.executable).name, *sys.argv])


def write_result(path: Path, document: object) -> None:
    """Write a result's JSON (its directory made if missing)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
