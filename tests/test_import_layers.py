"""The import layers of DESIGN.md hold, by subpackage:

core (and the public decisions/errors) -> storage -> callbacks -> loop -> cluster -> control -> api -> cli.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "orchestrator"

# A module's layer is that of its subpackage (or, at the top, of the module itself).
LAYERS = {
    "core": 0, "decisions": 0, "errors": 0,
    "storage": 1,
    "callbacks": 2,
    "loop": 3,
    "cluster": 4,
    "control": 5,
    "api": 6,
    "cli": 7, "__main__": 7, "__init__": 7, "plot": 7,
}
RAY_MIN_LAYER = LAYERS["cluster"]
TORCH_FREE_LAYERS = {LAYERS["core"], LAYERS["storage"], LAYERS["callbacks"], LAYERS["control"]}
# Modules of torch-allowing layers that must stay torch-free all the same (checked by importing them).
TORCH_FREE_MODULES = ("orchestrator.cluster.coordinator", "orchestrator.cluster.coordinator_core",
                      "orchestrator.control.controller", "orchestrator.control.attempt",
                      "orchestrator.control.metrics_export", "orchestrator.plot",
                      "orchestrator.storage.checkpoint", "orchestrator.core.events")


def _layer_of(dotted: str) -> str:
    """``orchestrator.loop.train_loop`` -> ``loop``; ``orchestrator.api`` -> ``api``."""
    return dotted.split(".")[1]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        yield path, rel.parts[0].removesuffix(".py")


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
            dep = _layer_of(name)
            assert LAYERS[dep] <= layer, f"{path.name} (layer {layer}) imports {name} (layer {LAYERS[dep]})"
        if root == "ray":
            assert layer >= RAY_MIN_LAYER, f"{path.name} imports ray below the Ray layer"
        if root == "torch":
            assert layer not in TORCH_FREE_LAYERS, f"{path.name} imports torch in a torch-free layer"


def test_every_subpackage_init_says_what_it_owns():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(PACKAGE)} needs a docstring saying what the subpackage owns"


def test_importing_callbacks_loads_neither_torch_nor_ray():
    code = ("import sys, orchestrator.callbacks, orchestrator.decisions, orchestrator.core.metrics; "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_command_lines_help_and_status_load_neither_torch_nor_ray(tmp_path):
    code = ("import contextlib, io, sys\n"
            "from orchestrator.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            f"    code = main(['status', {str(tmp_path / 'no-such-run')!r}])\n"
            "print(code, sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2 []"  # no run there (exit 2), and nothing of torch or ray loaded


@pytest.mark.parametrize("module", TORCH_FREE_MODULES)
def test_coordinator_controller_and_commit_protocol_load_no_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"importing {module} loads torch"
