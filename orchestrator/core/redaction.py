"""Keep credentials out of everything the orchestrator writes or says.

:func:`redact` removes every string value of ``storage_options`` (keys, secrets, tokens, endpoint
URLs) and the ``user:password@`` part of URLs from a text; :func:`redact_values` does it inside a
JSON-like value before it is serialised; :func:`public_config` lists option keys, never values.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s'\"]+@")
_MIN_SECRET_LEN = 4  # shorter values ("s3", "v4", "aws") would shred messages, and are no secrets


def _secret_values(options: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(options, Mapping):
        for value in options.values():
            found |= _secret_values(value)
    elif isinstance(options, (list, tuple, set, frozenset)):
        for value in options:
            found |= _secret_values(value)
    elif isinstance(options, bytes):
        found |= _secret_values(options.decode("utf-8", "replace"))
    elif isinstance(options, str) and len(options) >= _MIN_SECRET_LEN:
        found.add(options)
        # An endpoint URL may also appear with its userinfo already stripped, or JSON-escaped.
        found.add(_USERINFO.sub(r"\g<scheme>", options))
        found.add(json.dumps(options)[1:-1])
    return {v for v in found if len(v) >= _MIN_SECRET_LEN}


def redact(text: Any, options: Mapping[str, Any] | None = None) -> str:
    """Return ``str(text)`` with every string value of ``options`` and URL userinfo replaced by ``***``.

    Args:
        text: The message, log line or JSON text to clean.
        options: The ``storage_options`` (searched recursively: keys, secrets, tokens, endpoint
            URLs, ...). Values shorter than 4 characters are left alone. Defaults to ``None``
            (only ``user:password@`` parts of URLs are removed).

    Example:
        >>> redact("s3://me:pw@host/b key=abcd1234", {"key": "abcd1234"})
        's3://***@host/b key=***'
    """
    out = str(text)
    for value in sorted(_secret_values(options or {}), key=len, reverse=True):
        out = out.replace(value, "***")
    return _USERINFO.sub(r"\g<scheme>***@", out)


def redact_values(obj: Any, options: Mapping[str, Any] | None) -> Any:
    """Redact every string inside a JSON-like value (before serialising, so escaping cannot hide a secret)."""
    if isinstance(obj, str):
        return redact(obj, options)
    if isinstance(obj, Mapping):
        return {str(k): redact_values(v, options) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_values(v, options) for v in obj]
    return obj


def public_config(options: Mapping[str, Any] | None) -> list[str]:
    """The option keys (nested keys dotted, sorted) of ``storage_options``, never their values; for run.json."""
    keys: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif prefix:
            keys.append(prefix)

    walk("", options or {})
    return sorted(keys)


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)``: scalars of numpy/torch as numbers, callables by name, sets sorted."""
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return obj.item()
        except Exception:  # noqa: BLE001 - fall back to text
            pass
    if callable(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)
