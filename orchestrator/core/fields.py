"""The checks of single ``Trainer`` and ``fit`` arguments: each raises ValueError naming the argument
and saying what to change, and returns the value normalised (:mod:`orchestrator.core.config` builds
the validated dataclasses from them and re-exports them).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

VERBOSE = ("auto", 0, 1, 2)
#: The ``torch.compile`` keyword arguments ``compile={...}`` may pass.
COMPILE_OPTIONS = ("backend", "mode", "fullgraph", "dynamic", "options")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_int(name: str, value: Any, minimum: int, unit: str = "") -> int:
    """``value`` if it is an integer >= ``minimum`` (``unit`` explains it in the message).

    Example:
        >>> validate_int("max_failures", 3, 0)
        3
    """
    _require(_is_int(value) and value >= minimum,
             f"{name} must be an integer >= {minimum}{f' ({unit})' if unit else ''}, got {value!r}")
    return value


def validate_seconds(name: str, value: Any) -> float:
    """``value`` as a float if it is a positive number of seconds.

    Example:
        >>> validate_seconds("hang_timeout_s", 60)
        60.0
    """
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
             f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def validate_flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``.

    Example:
        >>> validate_flag("warm_standbys", False)
        False
    """
    _require(isinstance(value, bool), f"{name} must be True or False, got {value!r}")
    return value



def compile_options(value: Any) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments of ``compile=`` (``{}`` for ``True``), or None when off.

    Example:
        >>> compile_options(True), compile_options(False), compile_options({"backend": "eager"})
        ({}, None, {'backend': 'eager'})
    """
    if isinstance(value, bool):
        return {} if value else None
    _require(isinstance(value, Mapping) and all(isinstance(k, str) for k in value),
             f"compile must be True, False or a dict of torch.compile keyword arguments, got {value!r}")
    unknown = sorted(set(value) - set(COMPILE_OPTIONS))
    _require(not unknown, f"compile: unknown torch.compile argument(s) {unknown}; use {list(COMPILE_OPTIONS)}")
    backend = value.get("backend", "inductor")
    _require(isinstance(backend, str) or callable(backend),
             f"compile: backend must be a backend name or a callable, got {backend!r}")
    _require(value.get("mode") is None or isinstance(value.get("mode"), str),
             f"compile: mode must be a string or None, got {value.get('mode')!r}")
    return dict(value)


def validate_ray_data_columns(value: Any) -> tuple[str, str] | None:
    """``value`` as a ``(features, label)`` pair of distinct column names, or None.

    Example:
        >>> validate_ray_data_columns(["image", "label"])
        ('image', 'label')
    """
    if value is None:
        return None
    _require(isinstance(value, (tuple, list)) and len(value) == 2
             and all(isinstance(v, str) and v for v in value) and value[0] != value[1],
             "ray_data_columns must be None or (features, label): two different column names of the Ray "
             f"Dataset, e.g. ('x', 'y'), got {value!r}; merge several feature columns into one with map_batches, "
             "or pass None and a train_step that reads the dict of columns")
    return (value[0], value[1])


def validate_validation_freq(value: Any) -> int | list[int]:
    """``value`` if it is an integer >= 1 (every n epochs) or a non-empty list of 1-based epochs (as Keras).

    Example:
        >>> validate_validation_freq((1, 5))
        [1, 5]
    """
    if _is_int(value):
        return validate_int("validation_freq", value, 1, "validate every n epochs")
    _require(isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) and v >= 1 for v in value),
             f"validation_freq must be an integer >= 1 or a non-empty list of 1-based epochs, got {value!r}")
    return sorted(set(value))


def validation_due(epoch: int, freq: int | list[int]) -> bool:
    """Whether 0-based ``epoch`` validates (Keras's ``_should_eval``: ``freq`` counts 1-based epochs).

    Example:
        >>> [validation_due(e, 2) for e in range(4)], [validation_due(e, [1, 3]) for e in range(4)]
        ([False, True, False, True], [True, False, True, False])
    """
    return (epoch + 1) % freq == 0 if isinstance(freq, int) else epoch + 1 in freq


def validate_run_name(run_name: Any) -> str:
    """``run_name`` if it can name a run directory on every filesystem and object store.

    Example:
        >>> validate_run_name("digits-v2")
        'digits-v2'
    """
    _require(isinstance(run_name, str) and _RUN_NAME.fullmatch(run_name) is not None,
             f"run_name must be 1-128 characters of letters, digits, '.', '_' or '-' and start with "
             f"a letter or digit, got {run_name!r}")
    return run_name


def validate_epochs(epochs: Any) -> int:
    """``epochs`` if it is an integer >= 1."""
    return validate_int("epochs", epochs, 1)


def validate_verbose(verbose: Any) -> str | int:
    """``verbose`` if it is one of :data:`VERBOSE`."""
    _require(verbose in VERBOSE,
             f"verbose must be one of {VERBOSE}, got {verbose!r}")
    return verbose
