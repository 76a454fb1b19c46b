"""Per-rank training state: RNG capture, CPU staging, and the two-phase (stage, then persist) save.

Phase 1 (:meth:`StagingArea.stage`) copies every tensor of the state into CPU buffers that are
reused between saves; it is the only part that stalls training. Phase 2 (:class:`AsyncPersister`)
serialises the staged state with ``torch.save`` and writes it through fsspec in a background
thread while training goes on. The next save waits for the previous one; ``wait()`` flushes.
Every load uses ``torch.load(..., weights_only=True)``: nothing arbitrary is unpickled.
"""

from __future__ import annotations

import io
import logging
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from orchestrator.storage.checkpoint import ChecksumWriter, FileEntry

logger = logging.getLogger(__name__)


# -- RNG -------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch and (if present) CUDA RNG states, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- staging ---------------------------------------------------------------------------------
def loaded_dtensor() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` is imported, else None: no DTensor can exist before
    it is (FSDP imports it). Importing it would slow the start of every worker that never shards (a few
    tenths of a second of CPU; benchmarks/startup.py --source measured 0.6 s less to the first step)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


class StagingArea:
    """CPU copies of a state tree, into buffers reused from one save to the next.

    Example:
        >>> area = StagingArea()
        >>> staged = area.stage({"w": torch.ones(3)})
        >>> staged["w"].tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._from_cuda = False
        self._dtensor: type | None = None
        self.staged_bytes = 0

    def stage(self, tree: Any) -> Any:
        """CPU copies of every tensor in ``tree`` (other values as they are); complete on return."""
        self.staged_bytes = 0
        self._from_cuda = False
        self._dtensor = loaded_dtensor()
        staged = self._copy(tree, "")
        if self._from_cuda:
            torch.cuda.synchronize()  # the device-to-host copies were asynchronous
        return staged

    def _copy(self, node: Any, path: str) -> Any:
        if self._dtensor is not None and isinstance(node, self._dtensor):  # still a DTensor (for DCP's planner)
            buf = self._copy(node.to_local(), path)
            return self._dtensor.from_local(buf, node.device_mesh, node.placements, run_check=False,
                                            shape=node.shape, stride=node.stride())
        if isinstance(node, torch.Tensor):
            buf = self._buffers.get(path)
            src = node.detach()
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, device="cpu",
                                  pin_memory=src.is_cuda and torch.cuda.is_available())
                self._buffers[path] = buf
            buf.copy_(src, non_blocking=src.is_cuda)
            self._from_cuda |= src.is_cuda
            self.staged_bytes += buf.numel() * buf.element_size()
            return buf
        if isinstance(node, dict):
            return {k: self._copy(v, f"{path}/{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return type(node)(self._copy(v, f"{path}/{i}") for i, v in enumerate(node))
        return node


# torch.save reads its "zip CRC-32 per record" option (a process-wide setting) once, when it opens
# its zip writer. Backups skip that CRC, since the manifest's CRC-32 over the whole file (computed in
# the same pass) already covers them; every other save keeps the setting it had. The lock is held
# from setting the option until the writer has been opened (its first write), not for the whole save.
_ZIP_CRC_LOCK = threading.Lock()


def save_to(obj: Any, out: Any, *, zip_crc: bool | None = None) -> ChecksumWriter:
    """``torch.save(obj)`` streamed into ``out``; returns the writer that holds its size and CRC-32.

    Args:
        obj: What to save (tensors, containers of them, plain Python values).
        out: A file object (anything with ``write``).
        zip_crc: Whether torch computes its per-record zip CRC-32; None keeps the process setting.
    """
    _ZIP_CRC_LOCK.acquire()
    previous = torch.serialization.get_crc32_options()
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            torch.serialization.set_crc32_options(previous)
            _ZIP_CRC_LOCK.release()

    with ChecksumWriter(out, before_first_write=release) as writer:
        try:
            torch.serialization.set_crc32_options(previous if zip_crc is None else zip_crc)
            torch.save(obj, writer)
        finally:
            release()
    return writer


def from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# -- phase 2 ---------------------------------------------------------------------------------
@dataclass
class PersistTiming:
    """The latest save: seconds from start to every file durable, and bytes written."""

    persist_s: float = 0.0
    bytes_written: int = 0


class AsyncPersister:
    """Writes staged states in a background thread, one save at a time.

    Each file is serialised straight into storage (no in-memory copy of the serialised state) while
    its size and CRC-32 are computed in the same pass.

    Args:
        write_stream: ``write_stream(path, fill)`` calls ``fill(file)`` and makes the file durable
            (:meth:`orchestrator.storage.RunStorage.write_stream`); retries are its job.
        on_done: Called from the thread with ``(folder, entries, meta)`` once every file is
            durable, or ``(folder, None, meta | {"error": ...})`` if writing failed.
    """

    def __init__(self, write_stream: Callable[[str, Callable[[Any], None]], None],
                 on_done: Callable[[str, list[FileEntry] | None, dict[str, Any]], None]) -> None:
        self._write_stream = write_stream
        self._on_done = on_done
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.timing = PersistTiming()

    def submit(self, folder: str, files: dict[str, Any], meta: dict[str, Any],
               check: Callable[[dict[str, Any]], str | None] | None = None) -> None:
        """Persist ``files`` into ``folder`` in the background; ``check(files)`` may refuse (a reason).

        A value with a ``persist_into(folder) -> list[FileEntry]`` method (a
        :class:`~orchestrator.loop.sharded_state.DcpPart`) writes itself, before the other files.
        """
        self.wait()
        self._thread = threading.Thread(target=self._persist, args=(folder, files, meta, check),
                                        name="orchestrator-persist", daemon=True)
        self._thread.start()

    def _persist(self, folder: str, files: dict[str, Any], meta: dict[str, Any],
                 check: Callable[[dict[str, Any]], str | None] | None = None) -> None:
        refusal = check(files) if check is not None else None
        if refusal is not None:  # not a failure: this state is simply never committed
            self._on_done(folder, None, dict(meta, error=refusal))
            return
        try:
            start = time.perf_counter()
            parts = [obj for obj in files.values() if hasattr(obj, "persist_into")]
            entries = [e for part in parts for e in part.persist_into(folder)]  # collective: first, on every rank
            entries += [self._write_file(f"{folder}/{name}", name, obj) for name, obj in files.items()
                        if not hasattr(obj, "persist_into")]
            self.timing = PersistTiming(time.perf_counter() - start, sum(e.size for e in entries))
            self._on_done(folder, entries, meta)
        except BaseException as exc:  # reported, never dropped: wait() raises it
            self._error = exc
            logger.error("backup %s failed: %s", folder, exc)
            try:
                self._on_done(folder, None, dict(meta, error=f"{type(exc).__name__}: {exc}"))
            except Exception:
                pass

    def _write_file(self, path: str, name: str, obj: Any) -> FileEntry:
        written: list[FileEntry] = []  # the last (successful) try's entry; a retry calls fill again

        def fill(out: Any) -> None:
            if isinstance(obj, bytes):
                with ChecksumWriter(out) as writer:
                    writer.write(obj)
            else:
                writer = save_to(obj, out, zip_crc=False)
            written.append(writer.entry(name))

        self._write_stream(path, fill)
        return written[-1]

    def wait(self) -> None:
        """Block until the pending save is durable; raise if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"a background save failed: {error}") from error
