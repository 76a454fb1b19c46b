"""Writes that appear whole or not at all, below :class:`~orchestrator.storage.fs.RunStorage`.

This module owns the two ways a file write never leaves a half-written file behind: locally,
:func:`_atomic_local_write` writes a temporary file beside the target, fsyncs it and renames it
over the target; on other filesystems, :func:`_abandon` gives up a partly written fsspec file
(aborting its multipart upload where the backend can, never finalising it) when the write fails.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, BinaryIO, Callable

# Logged under the storage module's name, as before these helpers had a module of their own.
log = logging.getLogger("orchestrator.storage.fs")


def _abandon(f: Any, url: str) -> None:
    """Give up a partly written fsspec file: abort its upload where possible, never finalise it.

    Args:
        f: The file returned by ``fs.open(..., "wb")``.
        url: Its URL, redacted, for the log.

    Also after a failed ``close()``: s3fs keeps the multipart upload's id until it completes, so
    ``discard()`` still aborts it. If the abort fails too (the endpoint is down), the upload stays
    in progress until the bucket's AbortIncompleteMultipartUpload lifecycle rule removes it.
    """
    try:
        f.discard()  # s3fs aborts the multipart upload; a no-op where there is nothing to abort
    except Exception:  # noqa: BLE001 - the original error matters more
        log.warning("could not abort the upload of %s; the bucket's lifecycle rule for incomplete "
                    "multipart uploads (docs/storage.md) will remove it", url)
    try:
        f.closed = True  # close() (also from __del__) would otherwise upload what was buffered
    except Exception:  # noqa: BLE001
        log.debug("could not mark a partly written file closed", exc_info=True)


def _atomic_local_write(path: str, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``data`` (or let ``data(file)`` write) into a temporary file, fsync it, rename it."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
