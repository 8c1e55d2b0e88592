"""The package's layout: subpackages in the order data flows, and imports that only go one way."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pneumoscan"
#: Lower layers never import higher ones: inputs are read, the exported model runs on them,
#: learning makes (and evaluates) that model, the applications use all of it.
LAYERS = {"": 0, "inputs": 1, "running": 2, "learning": 3, "apps": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1]] if len(parts) > 2 and parts[1] in LAYERS else 0


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Every pneumoscan module a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pneumoscan"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pneumoscan"))
    return {name for name in found if name in known and name != "pneumoscan"}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py") if "migrations" not in path.parts}
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def test_every_module_lives_in_a_subpackage_of_its_layer() -> None:
    top_level = {name for name in import_graph() if name.count(".") == 1}
    assert top_level <= {"pneumoscan.config", "pneumoscan.errors", "pneumoscan.files", "pneumoscan.__main__",
                         "pneumoscan.inputs", "pneumoscan.running", "pneumoscan.learning", "pneumoscan.apps"}, top_level


def test_imports_never_go_up_a_layer() -> None:
    graph = import_graph()
    assert "pneumoscan.running.inference" in graph["pneumoscan.apps.service.app"]  # the graph sees real imports
    assert "pneumoscan.learning.training" in graph["pneumoscan.learning.evaluation"]  # lazy ones too
    upward = [(module, target) for module, targets in graph.items() for target in targets
              if module != "pneumoscan.__main__" and layer_of(target) > layer_of(module)]
    assert upward == []


def test_no_two_modules_import_each_other() -> None:
    graph = import_graph()
    pairs = {tuple(sorted((a, b))) for a, targets in graph.items() for b in targets if a in graph.get(b, set())}
    assert pairs == set()


def test_the_running_layer_needs_no_pytorch() -> None:
    """Serving runs on ONNX Runtime alone: nothing below ``learning`` may import torch."""
    for path in list((PACKAGE / "inputs").rglob("*.py")) + list((PACKAGE / "running").rglob("*.py")):
        imports = {node.names[0].name.split(".")[0] for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Import)}
        imports |= {(node.module or "").split(".")[0] for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)}
        assert not imports & {"torch", "lightning", "timm", "torchvision"}, path
