"""Loading a script of benchmarks/ as a module in a test (benchmarks/ is not a package the project installs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def loaded(script: str, name: str) -> Iterator[ModuleType]:
    """Yield ``benchmarks/<script>`` loaded as module ``name`` (registered in ``sys.modules`` while in use:
    dataclasses look their module up while a class is made), for a fixture to ``yield from``."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
