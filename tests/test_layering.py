"""Data flows one way: cli/serve/batch -> runtime -> engine -> models -> parallel. Nothing imports upward,
the engine layers never import Ray, and serving never touches process groups."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rayxdit"
ABOVE_ENGINE = ("rayxdit.runtime", "rayxdit.serve", "rayxdit.batch", "rayxdit.cli")
FORBIDDEN = {
    "parallel": ("ray", "rayxdit.models", "rayxdit.engine", *ABOVE_ENGINE),
    "models": ("ray", "rayxdit.engine", *ABOVE_ENGINE),
    "engine.py": ("ray", *ABOVE_ENGINE),
    "runtime": ("rayxdit.serve", "rayxdit.batch", "rayxdit.cli"),
    "serve": ("torch.distributed", "rayxdit.parallel", "rayxdit.batch", "rayxdit.cli"),
    "batch": ("torch.distributed", "rayxdit.parallel", "rayxdit.serve", "rayxdit.cli"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer):
    root = PACKAGE / layer
    files = [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))
    if not files or not files[0].exists():
        pytest.skip(f"{layer} does not exist yet")
    violations = []
    for path in files:
        for name in imported_modules(path):
            for banned in FORBIDDEN[layer]:
                if name == banned or name.startswith(banned + "."):
                    violations.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not violations, "\n".join(violations)
