"""Keep credentials out of everything the orchestrator writes or says.

:func:`redact` removes every string value of ``storage_options`` (keys, secrets, tokens, endpoint
URLs) and the userinfo (``user:password@``) part of URLs from a text; :func:`redact_values` does it
inside a JSON-like value before it is serialised; :func:`redact_exception` gives an exception whose
message and chain carry no secret; :func:`public_config` lists option keys, never values.
"""

from __future__ import annotations

import json
import re
import traceback
from typing import Any, Mapping
from urllib.parse import quote

# The userinfo of a URL: after ``scheme://``, everything up to the LAST ``@`` before the host.
# Whitespace, quotes and angle brackets end a URL in a text. Two shapes are recognised:
# - ``user[:password]@host`` without a ``/`` before the ``@`` (``s3://alice:p@ss@bucket``: the
#   greedy match backtracks to the last ``@`` before the first ``/``);
# - ``user:password@host`` whose password holds ``/`` or ``@`` (secrets often contain ``/``:
#   ``s3://alice:hunter2/x@bucket``): a ``:`` before any ``/``, then up to the last ``@``.
# The second shape may also take a ``host:port/path@x`` for userinfo: removing too much from a
# message is the safe side.
_END = r"\s'\"<>`"
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)"
    rf"(?:[^{_END}/:@]*:[^{_END}]*|[^{_END}/]+)@"
)
_MIN_SECRET_LEN = 4  # shorter values ("s3", "v4", "aws") would shred messages, and are no secrets


def _strip_userinfo(text: str) -> str:
    return _USERINFO.sub(r"\g<scheme>", text)


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
        # The value as written, with its userinfo already stripped (an endpoint URL), JSON-escaped,
        # repr-escaped and percent-encoded (as HTTP clients put it in URLs and error messages).
        for variant in (options, _strip_userinfo(options)):
            found.update({variant, json.dumps(variant)[1:-1], repr(variant)[1:-1],
                          quote(variant, safe=""), quote(variant)})
    return {v for v in found if len(v) >= _MIN_SECRET_LEN}


def redact(text: Any, options: Mapping[str, Any] | None = None) -> str:
    """Return ``str(text)`` with every string value of ``options`` and URL userinfo replaced by ``***``.

    Args:
        text: The message, log line or JSON text to clean.
        options: The ``storage_options`` (searched recursively: keys, secrets, tokens, endpoint
            URLs, ...; also found JSON-escaped or percent-encoded). Values shorter than 4
            characters are left alone. Defaults to ``None`` (only the userinfo of URLs is removed:
            everything between ``scheme://`` and the last ``@`` before the host).

    Example:
        >>> redact("s3://me:p@ss/w@host/b key=abcd1234", {"key": "abcd1234"})
        's3://***@host/b key=***'
    """
    out = str(text)
    for value in sorted(_secret_values(options or {}), key=len, reverse=True):
        out = out.replace(value, "***")
    return _USERINFO.sub(r"\g<scheme>***@", out)


def _chain_text(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:  # noqa: BLE001 - a broken __str__: judge by what can be read
        return repr(getattr(exc, "args", ()))


def carries_secret(exc: BaseException, options: Mapping[str, Any] | None) -> bool:
    """Whether ``exc`` shows a secret: its printed form (message, chained causes and contexts) or,
    as pickling would send them, its arguments and attributes."""
    try:
        attributes = repr((exc.args, vars(exc)))
    except Exception:  # noqa: BLE001 - a broken __repr__ somewhere: do not trust it
        return True
    text = _chain_text(exc) + attributes
    return redact(text, options) != text


def rebuild_exception(exc: BaseException, message: str) -> BaseException:
    """A new exception of ``exc``'s type (else its nearest built-in base) whose message is ``message``.

    It has no traceback, cause or context; ``errno`` of an ``OSError`` is kept.

    Args:
        exc: The exception to mirror.
        message: The new message (already redacted).
    """
    for cls in type(exc).__mro__:
        if cls is BaseException or cls is object:
            break
        if cls is not type(exc) and cls.__module__ != "builtins":
            continue  # a third-party base with an unknown constructor: go on to a built-in
        try:
            new = cls(message)
            if message not in str(new):
                continue
        except Exception:  # noqa: BLE001 - a constructor that wants other arguments
            continue
        if isinstance(exc, OSError) and isinstance(new, OSError):
            new.errno = exc.errno
        return new
    return Exception(message)


def redact_exception(exc: BaseException, options: Mapping[str, Any] | None,
                     message: str | None = None) -> BaseException:
    """``exc`` itself if its printed form (chain included) holds no secret, else a clean copy.

    The copy has the same type where the type can be built from a message (else the nearest
    built-in base), the redacted message, and no chain.

    Args:
        exc: The exception.
        options: The ``storage_options`` whose values must not appear.
        message: The copy's message. Defaults to ``None``: ``str(exc)``, redacted.
    """
    if message is None and not carries_secret(exc, options):
        return exc
    return rebuild_exception(exc, redact(message if message is not None else str(exc), options))


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
