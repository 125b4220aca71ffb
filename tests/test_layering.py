"""Data flows one way: cli/serve/batch -> runtime (executors) -> engine -> models -> parallel. Nothing imports
upward, the engine layers never import Ray, the HTTP ingress never loads the model stack, and the layers
above the runtime reach ranks only through an executor."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

from tests.helpers import fresh_python

PACKAGE = Path(__file__).resolve().parents[1] / "rayxdit"
ABOVE_ENGINE = ("rayxdit.runtime", "rayxdit.serve", "rayxdit.batch", "rayxdit.cli")
MODEL_STACK = ("torch", "diffusers", "transformers", "rayxdit.models", "rayxdit.engine", "rayxdit.parallel")
TORCH_FREE = (
    "torch",
    "diffusers",
    "transformers",
    "PIL",
    "rayxdit.models",
    "rayxdit.engine",
    "rayxdit.parallel",
)
"""Shared modules the HTTP ingress imports: none of these at import time (a function may import what it
alone needs, e.g. PoolConfig validating with Serve's schema, EncodedResult.decode opening PNGs)."""
FORBIDDEN = {
    "parallel": ("ray", "rayxdit.models", "rayxdit.engine", *ABOVE_ENGINE),
    "models": ("ray", "rayxdit.engine", *ABOVE_ENGINE),
    "engine.py": ("ray", *ABOVE_ENGINE),
    "runtime": ("rayxdit.serve", "rayxdit.batch", "rayxdit.cli"),
    "serve": (*MODEL_STACK, "rayxdit.batch", "rayxdit.cli"),
    "batch": (*MODEL_STACK, "rayxdit.serve", "rayxdit.cli"),
    "cli.py": ("rayxdit.models", "rayxdit.engine", "rayxdit.parallel"),
}
IMPORT_TIME_RULES = {
    "config.py": TORCH_FREE,
    "request.py": TORCH_FREE,
    "limits.py": TORCH_FREE,
    "uploads.py": TORCH_FREE,
    "loras.py": TORCH_FREE,
    "retries.py": (*TORCH_FREE, "ray"),
}
"""Rules on what a module imports when it is imported (not in functions, not for type checkers)."""
ABOVE_THE_RUNTIME = ("cli.py", "serve", "batch")
OTHER_PATHS_TO_RANKS = re.compile(
    r"RankWorker|rayxdit\.runtime\.worker|rayxdit\.engine|multiprocessing|init_process_group|"
    r"ray\.remote|__ray_call__|get_actor|start_engine"
)
"""What reaching ranks without an executor would look like in cli.py, serve/ and batch/."""


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _executed_nodes(tree: ast.AST, at_import_only: bool) -> list[ast.AST]:
    """The nodes that can run: ``if TYPE_CHECKING:`` bodies never do; with ``at_import_only``, function
    bodies are left out too."""
    kept: list[ast.AST] = []
    pending = [tree]
    while pending:
        node = pending.pop()
        kept.append(node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in (
                "TYPE_CHECKING",
                "typing.TYPE_CHECKING",
            ):
                pending.extend(child.orelse)
                continue
            if at_import_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            pending.append(child)
    return kept


def imported_modules(path: Path, root: Path, at_import_only: bool = False) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against its package."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in _executed_nodes(ast.parse(path.read_text()), at_import_only):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def layer_files(root: Path, layer: str) -> list[Path]:
    path = root / layer
    if not path.exists():
        raise AssertionError(
            f"layer {layer} is missing from {root}: the layering rules name a layer that is gone"
        )
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


def violations(root: Path) -> list[str]:
    """Every broken rule in the package at ``root``."""
    found = []
    for rules, at_import_only in ((FORBIDDEN, False), (IMPORT_TIME_RULES, True)):
        for layer, banned in rules.items():
            for path in layer_files(root, layer):
                for name in imported_modules(path, root, at_import_only):
                    if any(name == ban or name.startswith(ban + ".") for ban in banned):
                        found.append(f"{path.relative_to(root.parent)} imports {name}")
    for layer in ABOVE_THE_RUNTIME:
        for path in layer_files(root, layer):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                match = OTHER_PATHS_TO_RANKS.search(line.split("#", 1)[0])
                if match:
                    found.append(
                        f"{path.relative_to(root.parent)}:{number} reaches ranks without an executor ({match[0]})"
                    )
    return found


def module_graph(root: Path) -> dict[str, set[str]]:
    """Which package modules each package module imports: every import, at import time or in a function,
    for type checkers too (an import a function makes, or one only a type checker reads, still ties the
    two modules together)."""
    files = {module_name(path, root): path for path in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                # the module itself, not a name inside it: the longest prefix that is a module here
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    imported.add(target)
        graph[name] = imported
    return graph


def import_circles(root: Path) -> list[list[str]]:
    """Every circle of imports among the package's modules (a module importing back into one that imports
    it, directly or through others), each as the modules around it."""
    graph = module_graph(root)
    circles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                circles.append([*stack[stack.index(other) :], other])
            elif other not in state:
                visit(other)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return circles


def test_no_module_imports_back_into_one_that_imports_it():
    circles = import_circles(PACKAGE)
    assert not circles, "\n".join(" -> ".join(circle) for circle in circles)


def test_a_planted_import_circle_is_caught(tmp_path):
    root = tmp_path / "rayxdit"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    # A lazy import inside a function closes the circle as surely as one at the top.
    request = root / "request.py"
    request.write_text(
        request.read_text() + "\n\ndef _planted():\n    from rayxdit.imaging import encode_png\n"
    )
    circles = [" -> ".join(circle) for circle in import_circles(root)]
    assert circles == ["rayxdit.request -> rayxdit.imaging -> rayxdit.request"], circles


def test_layers_import_nothing_above_them_and_reach_ranks_only_through_executors():
    found = violations(PACKAGE)
    assert not found, "\n".join(found)


def test_a_planted_violation_of_each_rule_is_caught(tmp_path):
    root = tmp_path / "rayxdit"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    plants = {
        "serve/router.py": "import torch\n",
        "serve/pool.py": "from ..models import registry\n",  # relative, and upward into the model stack
        "batch/generator.py": "from rayxdit.runtime.worker import RankWorker\n",
        "cli.py": "workers = ray.get_actor('rank0')\n",
        "parallel/mesh.py": "from . import attention\nimport ray\n",
        "limits.py": "from PIL import Image\n",
    }
    for name, line in plants.items():
        path = root / name
        path.write_text(path.read_text() + line)
    found = "\n".join(violations(root))
    for expected in (
        "rayxdit/serve/router.py imports torch",
        "rayxdit/serve/pool.py imports rayxdit.models",
        "rayxdit/batch/generator.py:",
        "reaches ranks without an executor (rayxdit.runtime.worker)",
        "rayxdit/cli.py:",
        "rayxdit/parallel/mesh.py imports ray",
        "rayxdit/limits.py imports PIL",
    ):
        assert expected in found, f"{expected!r} not reported:\n{found}"
    assert "mesh.py imports rayxdit.parallel.attention" not in found  # a sibling import is allowed
    shutil.rmtree(root / "batch")
    try:
        violations(root)
    except AssertionError as error:
        assert "layer batch is missing" in str(error)
    else:
        raise AssertionError("a missing layer was not reported")


def test_a_router_replica_imports_no_model_stack():
    """What a router replica process imports: the ingress module, in a fresh interpreter."""
    code = (
        "import sys, rayxdit.serve.router\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'PIL')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(('rayxdit.models', "
        "'rayxdit.engine', 'rayxdit.runtime', 'rayxdit.parallel'))))\n"
    )
    printed = fresh_python(code)
    assert printed.strip() == "[]", printed
