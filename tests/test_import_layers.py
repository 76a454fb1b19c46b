"""The import layers of DESIGN.md hold: leaves -> storage/state -> callbacks -> trainer -> Ray -> controller -> cli."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "orchestrator"

LAYERS = {
    "config": 0, "errors": 0, "decisions": 0, "metrics": 0, "redaction": 0,
    "storage": 1, "storage_errors": 1, "run_files": 1, "state": 1, "checkpoint": 1,
    "callbacks": 2,
    "trainer": 3, "data": 3, "steps": 3, "loop_state": 3,
    "worker": 4, "worker_group": 4, "coordinator": 4,
    "controller": 5, "attempt": 5,
    "api": 6, "cli": 7, "__main__": 7, "__init__": 7,
}
RAY_MIN_LAYER = 4
TORCH_FREE_LAYERS = {0, 2}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        top = rel.parts[0].removesuffix(".py")
        yield path, top


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "orchestrator":
                names.update(f"orchestrator.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("path,top", list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else v.name)
def test_module_imports_only_from_its_own_or_lower_layers(path, top):
    assert top in LAYERS, f"{path}: add {top!r} to LAYERS in this test and to DESIGN's layer list"
    layer = LAYERS[top]
    for name in _imports(path):
        root = name.split(".")[0]
        if root == "orchestrator" and name != "orchestrator":
            dep = name.split(".")[1]
            assert LAYERS[dep] <= layer, f"{path.name} (layer {layer}) imports {name} (layer {LAYERS[dep]})"
        if root == "ray":
            assert layer >= RAY_MIN_LAYER, f"{path.name} imports ray below the Ray layer"
        if root == "torch":
            assert layer not in TORCH_FREE_LAYERS, f"{path.name} imports torch in a torch-free layer"


def test_importing_callbacks_loads_neither_torch_nor_ray():
    code = ("import sys, orchestrator.callbacks, orchestrator.decisions, orchestrator.metrics; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
