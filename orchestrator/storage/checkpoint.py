"""The backup commit protocol: ``step-<N>/`` folders that count only once their manifest exists.

Writers put every file of a backup into ``<backup_dir>/step-<N>/`` and report each file's size
and CRC-32, computed while the file is written (:class:`ChecksumWriter`). When every rank's files are durable, the coordinator writes ``manifest.json`` —
last, and alone what makes the step count. Readers take the newest step whose manifest exists
*and* whose files match it; a torn or corrupt step is skipped with a warning. Nothing is ever
overwritten in place: a resumed run first removes the steps newer than the one it resumes from.
Older steps are purged only after a newer commit, and a purge logs rather than raises.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from orchestrator.errors import OrchestratorError

logger = logging.getLogger(__name__)

# The layout of one step folder: the shared training state (rank 0), each rank's own state, the
# coordinator's state (JSON, so that the coordinator and the controller never need torch), the manifest.
MANIFEST = "manifest.json"
SHARED_FILE = "train_state.pt"
COORDINATOR_FILE = "coordinator.json"


def rank_file(rank: int) -> str:
    """The file holding rank ``rank``'s own state (RNG streams, position, partial sums)."""
    return f"rank-{rank}.pt"

FORMAT_VERSION = 3  # 3: states keyed by component name, the coordinator's state in coordinator.json
_STEP_DIR = re.compile(r"^step-(\d+)$")


class Storage(Protocol):
    """The subset of :class:`orchestrator.storage.RunStorage` this module uses."""

    def write_bytes(self, rel: str, data: bytes) -> None: ...
    def read_bytes(self, rel: str) -> bytes: ...
    def exists(self, rel: str) -> bool: ...
    def listdir(self, rel: str) -> list[str]: ...
    def rm(self, rel: str, recursive: bool = False) -> None: ...
    def write_json(self, rel: str, obj: Any) -> None: ...
    def read_json(self, rel: str) -> Any: ...


@dataclass(frozen=True)
class FileEntry:
    """One file of a backup: name inside the step folder, size in bytes and its CRC-32 (hex).

    The checksum guards against torn and corrupted files (not against tampering); it is computed
    in the write path (:class:`ChecksumWriter`), so a backup is read only once.
    """

    name: str
    size: int
    digest: str

    def matches(self, data: bytes) -> bool:
        return len(data) == self.size and _crc32_hex(zlib.crc32(data)) == self.digest

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "crc32": self.digest}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> "FileEntry":
        return FileEntry(str(obj["name"]), int(obj["size"]), str(obj["crc32"]))


def _crc32_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


class ChecksumWriter:
    """A write-only file object that forwards to ``out`` and keeps the size and CRC-32 of what passed.

    Chunks of at least ``overlap_min_bytes`` are checksummed on a helper thread while ``out``
    writes them (both release the GIL), so the checksum adds little to a large write; ``write``
    returns only once both are done, so the caller may reuse its buffer.

    Args:
        out: Any object with ``write(bytes)``.
        before_first_write: Called once, just before the first byte is forwarded.
        overlap_min_bytes: Smallest chunk checksummed concurrently with its write. Defaults to 1 MiB.

    Example:
        >>> import io
        >>> with ChecksumWriter(io.BytesIO()) as w:
        ...     _ = w.write(b"abc")
        >>> w.entry("f").digest
        '352441c2'
    """

    def __init__(self, out: Any, before_first_write: Callable[[], None] | None = None,
                 overlap_min_bytes: int = 1 << 20) -> None:
        self._out = out
        self._before_first_write = before_first_write
        self._overlap_min_bytes = overlap_min_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._crc = 0
        self.size = 0

    def write(self, data: Any) -> int:
        if self._before_first_write is not None:
            hook, self._before_first_write = self._before_first_write, None
            hook()
        view = memoryview(data).cast("B")
        if view.nbytes >= self._overlap_min_bytes:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="orchestrator-crc")
            crc = self._pool.submit(zlib.crc32, view, self._crc)
            try:
                self._out.write(view)
            finally:
                self._crc = crc.result()
        else:
            self._crc = zlib.crc32(view, self._crc)
            self._out.write(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        """Stop the helper thread (``out`` stays open: it belongs to the caller)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "ChecksumWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def entry(self, name: str) -> FileEntry:
        return FileEntry(name, self.size, _crc32_hex(self._crc))


@dataclass
class Manifest:
    """What a committed step holds. Written last."""

    step: int
    epoch: int
    batch: int
    phase: str
    world_size: int
    files: list[FileEntry] = field(default_factory=list)
    created: float = 0.0
    version: int = FORMAT_VERSION
    token: int | None = None  # the run-lease token of the driver whose attempt committed it

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "step": self.step, "epoch": self.epoch, "batch": self.batch,
                "phase": self.phase, "world_size": self.world_size, "created": self.created,
                "token": self.token, "files": [f.to_json() for f in self.files]}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> "Manifest":
        return Manifest(step=int(obj["step"]), epoch=int(obj["epoch"]), batch=int(obj["batch"]),
                        phase=str(obj["phase"]), world_size=int(obj["world_size"]),
                        files=[FileEntry.from_json(f) for f in obj["files"]],
                        created=float(obj.get("created", 0.0)), version=int(obj.get("version", 1)),
                        token=obj.get("token"))


def step_dir(backup_dir: str, step: int) -> str:
    return f"{backup_dir.rstrip('/')}/step-{step}"


def list_steps(storage: Storage, backup_dir: str) -> list[int]:
    """Every ``step-<N>`` folder, committed or not, newest first."""
    steps = []
    for name in storage.listdir(backup_dir):
        m = _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1])
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps, reverse=True)


def commit(storage: Storage, backup_dir: str, manifest: Manifest) -> str:
    """Write the manifest of a step whose files are all durable; return the step folder."""
    manifest.created = manifest.created or time.time()
    folder = step_dir(backup_dir, manifest.step)
    storage.write_json(f"{folder}/{MANIFEST}", manifest.to_json())
    return folder


def verify(storage: Storage, folder: str, manifest: Manifest) -> str | None:
    """None when every file matches the manifest, else why not."""
    for entry in manifest.files:
        path = f"{folder}/{entry.name}"
        try:
            data = storage.read_bytes(path)
        except FileNotFoundError:
            return f"{entry.name} is missing"
        if len(data) != entry.size:
            return f"{entry.name} has {len(data)} bytes, the manifest says {entry.size}"
        if not entry.matches(data):
            return f"{entry.name} does not match its checksum"
    return None


class IncompatibleBackup(OrchestratorError):
    """A committed backup in a layout this version cannot load (written by another version)."""


@dataclass(frozen=True)
class Found:
    """The newest valid committed backup."""

    folder: str
    manifest: Manifest


#: Why :func:`checked_step` does not trust a step folder that has no manifest.
NO_MANIFEST = "no manifest (the save never committed)"


def checked_step(storage: Storage, folder: str) -> tuple[Manifest | None, str | None]:
    """``(manifest, None)`` when the step folder is committed and its files verify, else ``(None, why not)``.

    Raises:
        IncompatibleBackup: the step was committed in another layout version (never trusted, never
            deleted: the user decides).
    """
    try:
        manifest = Manifest.from_json(storage.read_json(f"{folder}/{MANIFEST}"))
    except FileNotFoundError:
        return None, NO_MANIFEST
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable manifest ({exc})"
    if manifest.version != FORMAT_VERSION:
        raise IncompatibleBackup(
            f"backup {folder} was committed in layout version {manifest.version}; this version of "
            f"orchestrator reads version {FORMAT_VERSION}. Resume it with the version that wrote it, "
            f"or start a new run (another run_name)")
    problem = verify(storage, folder, manifest)
    return (manifest, None) if problem is None else (None, problem)


def latest_valid(storage: Storage, backup_dir: str,
                 on_skip: Callable[[int, str], None] | None = None) -> Found | None:
    """The newest committed step whose files verify; ``on_skip(step, reason)`` for each skipped one."""
    for step in list_steps(storage, backup_dir):
        folder = step_dir(backup_dir, step)
        manifest, reason = checked_step(storage, folder)
        if manifest is not None:
            return Found(folder, manifest)
        if on_skip is not None:
            on_skip(step, str(reason))
    return None


def remove_newer(storage: Storage, backup_dir: str, step: int | None) -> list[int]:
    """Delete step folders newer than ``step`` (all when None): torn or corrupt leftovers."""
    removed = []
    for other in list_steps(storage, backup_dir):
        if step is None or other > step:
            _remove(storage, backup_dir, other)
            removed.append(other)
    return removed


def purge_older(storage: Storage, backup_dir: str, newest: int, keep: int = 1) -> list[int]:
    """After committing ``newest``, delete all but the ``keep`` newest committed steps (and torn older ones)."""
    kept = 0
    removed = []
    for step in list_steps(storage, backup_dir):
        if step > newest:
            continue
        committed = storage.exists(f"{step_dir(backup_dir, step)}/{MANIFEST}")
        if committed and kept < keep:
            kept += 1
            continue
        _remove(storage, backup_dir, step)
        removed.append(step)
    return removed


def remove_all(storage: Storage, backup_dir: str) -> list[int]:
    """Delete every ``step-<N>`` folder of ``backup_dir``, then the folder itself if nothing else is in it.

    Only what the backup protocol writes is deleted: a file or folder of another name stays.
    """
    removed = remove_newer(storage, backup_dir, None)
    try:
        if not storage.listdir(backup_dir):
            storage.rm(backup_dir, recursive=True)
    except Exception as exc:  # a clean-up never fails the run
        logger.warning("could not remove the empty backup folder %s: %s", backup_dir, exc)
    return removed


def _remove(storage: Storage, backup_dir: str, step: int) -> None:
    folder = step_dir(backup_dir, step)
    try:
        # the manifest goes first, so a half-deleted folder never looks committed
        if storage.exists(f"{folder}/{MANIFEST}"):
            storage.rm(f"{folder}/{MANIFEST}")
        storage.rm(folder, recursive=True)
    except Exception as exc:  # a purge never fails the run
        logger.warning("could not remove backup %s: %s", folder, exc)


# -- the coordinator's state: JSON with tuples, non-string keys and non-finite floats kept ----
def _tag(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_tag(v) for v in value]}
    if isinstance(value, list):
        return [_tag(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _tag(v) for k, v in value.items()}
        return {"__items__": [[_tag(k), _tag(v)] for k, v in value.items()]}
    raise TypeError(f"cannot save a {type(value).__name__} in the coordinator state ({value!r:.80}); "
                    "a callback's state_dict() must hold only None, bool, int, float, str, list, tuple and dict")


def _untag(value: Any) -> Any:
    if isinstance(value, list):
        return [_untag(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            (key, inner), = value.items()
            if key == "__float__":
                return float(inner)
            if key == "__tuple__":
                return tuple(_untag(v) for v in inner)
            if key == "__items__":
                return {_untag(k): _untag(v) for k, v in inner}
        return {k: _untag(v) for k, v in value.items()}
    return value


def encode_state(state: Any) -> bytes:
    """The coordinator's state as JSON bytes that :func:`decode_state` turns back into equal values.

    Example:
        >>> decode_state(encode_state({"best": float("inf"), "skip": [(0, 3)], "by_epoch": {1: 0.5}}))
        {'best': inf, 'skip': [(0, 3)], 'by_epoch': {1: 0.5}}
    """
    return json.dumps(_tag(state), allow_nan=False, separators=(",", ":")).encode()


def decode_state(data: bytes) -> Any:
    return _untag(json.loads(data))


def read_coordinator_state(storage: Storage, folder: str) -> dict[str, Any]:
    """The coordinator state saved in a committed step folder."""
    return decode_state(storage.read_bytes(f"{folder}/{COORDINATOR_FILE}"))
