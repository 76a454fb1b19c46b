"""Classify storage exceptions: transient (retry), missing credentials, unreachable endpoint, bad
configuration; and rebuild them redacted, with the URL, for the user.

Exception classes of the cloud SDKs are matched by name, so this module imports none of them.
"""

from __future__ import annotations

import errno
from typing import Any, Mapping

from orchestrator.core.redaction import carries_secret, redact, redact_exception

# Exceptions that never get better by retrying.
_PERMANENT_TYPES = (
    FileNotFoundError, PermissionError, ValueError, TypeError, KeyError, NotImplementedError,
    IsADirectoryError, NotADirectoryError, FileExistsError,
)
_PERMANENT_ERRNOS = frozenset(
    {errno.EINVAL, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
     errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EDQUOT, errno.EMSGSIZE}
)
# Exception classes (by name: this layer does not import botocore/google/azure) that mean
# "missing or rejected credentials".
_CREDENTIAL_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
     "UnauthorizedSSOTokenError", "TokenRetrievalError", "NoAuthTokenError", "InvalidConfigError",
     "ProfileNotFound", "DefaultCredentialsError", "RefreshError", "ClientAuthenticationError",
     "CredentialUnavailableError"}
)
# Exception classes (by name) that mean "could not reach the endpoint".
_CONNECTION_ERRORS = frozenset(
    {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError",
     "ProxyConnectionError", "HTTPClientError", "ClientConnectorError", "ClientConnectionError",
     "ServerDisconnectedError", "ServerTimeoutError", "ClientOSError", "FSTimeoutError",
     "ConnectionError", "ConnectTimeout", "ReadTimeout", "NewConnectionError", "MaxRetryError",
     "TransportError", "ServiceRequestError"}
)
# Exception classes (by name) that mean "the storage_options / endpoint are wrong": retrying won't help.
_CONFIG_ERRORS = frozenset(
    {"EndpointResolutionError", "InvalidEndpointConfigurationError", "ParamValidationError",
     "NoRegionError", "InvalidRegionError", "InvalidS3AddressingStyleError",
     "UnknownSignatureVersionError", "UnknownServiceError", "InvalidURL"}
)
# Third-party packages whose exceptions are I/O problems worth retrying (unless permanent above).
_IO_MODULES = frozenset(
    {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "http", "google", "azure",
     "fsspec", "s3fs", "gcsfs", "adlfs", "huggingface_hub"}
)



def _type_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def is_credentials_error(exc: BaseException) -> bool:
    return bool(_type_names(exc) & _CREDENTIAL_ERRORS)


def is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return bool(_type_names(exc) & _CONNECTION_ERRORS) and not is_credentials_error(exc)


def is_config_error(exc: BaseException) -> bool:
    """The client could not even be set up or called as configured (bad endpoint URL, region, parameter)."""
    return bool(_type_names(exc) & _CONFIG_ERRORS) and not is_credentials_error(exc)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network and server-side trouble, not missing files, permissions or bad arguments."""
    if isinstance(exc, _PERMANENT_TYPES) or is_credentials_error(exc) or is_config_error(exc):
        return False
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    modules = {cls.__module__.split(".")[0] for cls in type(exc).__mro__}
    return bool(modules & _IO_MODULES)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def storage_error(exc: BaseException, what: str, url: str, options: Mapping[str, Any] | None) -> BaseException:
    """The error to raise for a failed, not retried storage operation: redacted, naming the URL.

    The same type as ``exc`` where it can be built from a message (``FileNotFoundError``,
    ``PermissionError``, ...); else ``exc`` itself, or its nearest built-in base if ``exc`` shows a
    secret. A configuration error of the cloud SDK (bad endpoint URL, region, parameter) becomes a
    ``ValueError`` pointing at ``storage_options``. ``errno`` is kept. The original is kept as ``__cause__`` only when its printed chain holds no
    secret (see :func:`chain_cause`).

    Args:
        exc: What the filesystem raised.
        what: The operation (``read``, ``list``, ``exists``, ...).
        url: The path's URL (redacted here again).
        options: The ``storage_options`` whose values must not appear.
    """
    detail = str(exc) or type(exc).__name__
    if is_config_error(exc):
        new: BaseException = ValueError(redact(
            f"{what} {url}: the storage client rejected its configuration ({describe(exc)}); check "
            "storage_options (client_kwargs.endpoint_url, region_name, ...)", options))
    else:
        new = redact_exception(exc, options, message=f"{what} {url}: {detail}")
        if type(new) is not type(exc) and not carries_secret(exc, options):
            return exc  # a type that cannot be rebuilt from a message: keep it for the callers' except clauses
    new.__cause__ = chain_cause(exc, options)
    return new


def chain_cause(exc: BaseException, options: Mapping[str, Any] | None) -> BaseException | None:
    """``exc`` to chain as ``__cause__`` of a clean error, or ``None`` if its printed chain holds a secret.

    Use as ``err.__cause__ = chain_cause(exc, options)`` (``None`` also hides the context), so that
    a printed traceback never shows a secret carried by the original error.
    """
    return None if carries_secret(exc, options) else exc


def credentials_hint(proto: str) -> str:
    """How to pass credentials for a protocol, for error messages."""
    if proto in ("s3", "s3a"):
        return ("pass storage_options={'key': ..., 'secret': ...} (or 'profile': ...) or set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment")
    if proto in ("gs", "gcs"):
        return "pass storage_options={'token': ...} or set GOOGLE_APPLICATION_CREDENTIALS"
    if proto in ("abfs", "abfss", "az", "adl"):
        return ("pass storage_options={'account_name': ..., 'account_key': ...} or set "
                "AZURE_STORAGE_CONNECTION_STRING")
    return "pass the credentials in storage_options=..."


def access_error(storage: Any, exc: BaseException) -> Exception:
    """The clear built-in error for a failed access check of ``storage`` (a RunStorage)."""
    url = storage.url()
    detail = storage._redact(describe(exc))
    if storage.is_local and isinstance(exc, PermissionError):
        return PermissionError(storage._redact(
            f"no write permission for the run directory {url} ({detail}); choose a writable "
            "directory with storage=... or fix the directory's permissions"))
    if isinstance(exc, PermissionError) or is_credentials_error(exc):
        return PermissionError(storage._redact(
            f"no credentials / access denied for {url}: {credentials_hint(storage.spec.protocol)} ({detail})"))
    if isinstance(exc, FileNotFoundError) and storage.is_object_store:
        bucket = storage.root.lstrip("/").split("/", 1)[0]
        return FileNotFoundError(storage._redact(
            f"bucket {bucket!r} for {url} does not exist; create it or change storage ({detail})"))
    if is_config_error(exc):
        return ValueError(storage._redact(
            f"storage {url}: the storage client rejected its configuration ({detail}); check "
            "storage_options (client_kwargs.endpoint_url, region_name, ...)"))
    if is_connection_error(exc):
        where = ("the endpoint in storage_options['client_kwargs']['endpoint_url']"
                 if isinstance(storage.spec.options.get("client_kwargs"), Mapping)
                 and "endpoint_url" in storage.spec.options["client_kwargs"] else "the storage endpoint")
        return ConnectionError(storage._redact(
            f"cannot reach {where} for {url} ({detail}); check that it is up and reachable from "
            "this machine, or change storage / storage_options"))
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, FileExistsError)):
        return type(exc)(storage._redact(f"cannot create the run directory {url} ({detail}); change storage"))
    return OSError(storage._redact(f"storage check failed for {url} ({detail})"))
