"""``compile=``: the model compiled with ``torch.compile``, its state kept under the plain module's keys.

The model's ``forward`` is replaced, on that instance, by ``torch.compile(model.forward)``: calling
the model (under DDP in training, as it is in validation) runs the compiled forward, but it stays the
same module object, so its ``state_dict()`` has the plain keys (never ``_orig_mod.``, which a
``torch.compile(model)`` wrapper adds). (``torch.nn.Module.compile()``, which compiles ``__call__``,
captured nothing with torch 2.13 in our tests, so it is not used.) Backups, ModelCheckpoint files, ``<run>/model.pt`` and ``History.model`` therefore
load into an uncompiled model, and a run may be resumed with ``compile`` switched on or off.

torch's default backend (inductor) builds C++ kernels on CPU and Triton kernels on GPU;
:func:`missing_for_compile` says what this machine lacks for it, so that ``Trainer(compile=True)``
refuses it on the driver (and a rank when it builds its model) with a message naming it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import torch

from orchestrator.core.config import compile_options


def missing_for_compile(options: dict[str, Any] | None, device_type: str) -> str | None:
    """What this machine lacks to compile with ``options`` on ``device_type``, or None.

    Only torch's default backend, inductor, needs a toolchain: a C++ compiler (``$CXX`` or ``g++``,
    what inductor runs) and Python's headers on CPU, Triton on CUDA.

    Example:
        >>> missing_for_compile({"backend": "eager"}, "cpu") is None
        True
    """
    if options is None or options.get("backend", "inductor") != "inductor":
        return None
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "the Python package triton, which torch.compile's inductor backend needs on GPU (pip install triton)"
        return None
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        return (f"a C++ compiler: torch.compile's inductor backend runs {cxx!r} to build CPU kernels and it is not "
                "on PATH (install one, e.g. apt-get install g++, or set CXX)")
    include = Path(sysconfig.get_path("include"))
    if not (include / "Python.h").exists():
        return (f"Python's C headers ({include}/Python.h), which torch.compile's inductor backend compiles CPU "
                "kernels against (install the python3-dev package of this Python)")
    return None


def check_compile(value: Any, device_type: str) -> None:
    """Raise ``RuntimeError`` naming what is missing when ``compile=value`` cannot run here.

    Example:
        >>> check_compile(False, "cpu")
    """
    missing = missing_for_compile(compile_options(value), device_type)
    if missing is not None:
        raise RuntimeError(f"compile={value!r} needs {missing}; or pass compile=False (or "
                           "compile={'backend': 'eager'}, which only traces)")


def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module a model factory's ``torch.compile(module)`` wraps, with its forward compiled in place.

    A factory may return ``torch.compile(net)`` (an ``OptimizedModule``), whose ``state_dict()``
    prefixes every key with ``_orig_mod.``. The loop trains ``net`` itself instead, its ``forward``
    compiled with the wrapper's own dynamo context (the same backend and options), so backups,
    ModelCheckpoint files and ``History.model`` hold the plain keys, as with ``compile=``.
    Any other module is returned as it is.

    Example:
        >>> net = plain_module(torch.compile(torch.nn.Linear(2, 1), backend="eager"))
        >>> type(net).__name__, sorted(net.state_dict())
        ('Linear', ['bias', 'weight'])
    """
    inner = getattr(model, "_orig_mod", None)
    context = getattr(model, "dynamo_ctx", None)
    if not isinstance(inner, torch.nn.Module) or context is None:
        return model
    inner.forward = context(inner.forward)  # an instance attribute: not in state_dict()
    return inner


def compile_model(model: torch.nn.Module, value: Any, device: torch.device) -> torch.nn.Module:
    """Compile ``model``'s forward in place with ``compile=value``'s options (nothing when off); return it.

    Example:
        >>> model = compile_model(torch.nn.Linear(2, 1), {"backend": "eager"}, torch.device("cpu"))
        >>> sorted(model.state_dict())
        ['bias', 'weight']
    """
    options = compile_options(value)
    if options is None:
        return model
    check_compile(value, device.type)
    model.forward = torch.compile(model.forward, **options)  # an instance attribute: not in state_dict()
    return model
