"""Sharded components (``strategy="fsdp"``) and their backups through torch.distributed.checkpoint (DCP).

A component marked ``sharded`` (:class:`~orchestrator.loop.rank_state.Component`) holds DTensors:
every rank saves only its own shards. Its state goes into the step folder's ``sharded/`` folder,
written by DCP through :class:`StorageFileSystem` (the run's :class:`~orchestrator.storage.fs.RunStorage`,
any fsspec URL), which computes each file's size and CRC-32 while it is written: these
:class:`~orchestrator.storage.checkpoint.FileEntry` values go to the coordinator with the rank's other
files, so the manifest (written last) lists every shard file and a torn one is never trusted.

Two phases, as for every backup: the loop's thread copies this rank's shards to CPU
(:class:`~orchestrator.loop.state_io.StagingArea` keeps DTensors as DTensors over CPU buffers), the
persist thread runs ``dcp.save`` (:class:`DcpPart`) on a process group of its own (gloo), so its
collectives (planning, the ``.metadata`` written by rank 0) never interleave with training's.

Loading (:func:`load_sharded`) reshards: DCP reads, for each rank's current shards, the pieces of the
saved shards that overlap them, whatever the world size that wrote them.

Example:
    >>> components = sharded_components(model, optimizer, snapshots)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import posixpath
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from orchestrator.loop.fsdp import local
from orchestrator.loop.rank_state import Component, Snapshots
from orchestrator.storage.checkpoint import ChecksumWriter, FileEntry

#: The folder of a step folder that holds DCP's files (``__<rank>_<n>.distcp`` and ``.metadata``).
SHARDED_DIR = "sharded"


class _TellingWriter(ChecksumWriter):
    """A :class:`ChecksumWriter` that also answers ``tell()`` (DCP records each item's offset)."""

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class StorageFileSystem(FileSystemBase):
    """DCP's file system interface over the run storage, recording each written file's entry.

    Paths are relative to the run directory; entries are named relative to ``folder`` (the step folder).

    Args:
        storage: The opened run storage.
        folder: The step folder the entries' names are relative to.
    """

    def __init__(self, storage: Any, folder: str) -> None:
        self.storage = storage
        self.folder = folder.rstrip("/")
        self._lock = threading.Lock()
        self._entries: dict[str, FileEntry] = {}

    def entries(self) -> list[FileEntry]:
        """The files written so far (a renamed file under its new name)."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def _name(self, path: str) -> str:
        return posixpath.relpath(str(path), self.folder)

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        path = str(path)
        fs_path = self.storage.path(path)
        if "r" in mode:
            with self.storage.fs.open(fs_path, "rb") as stream:
                yield stream
            return
        self.storage.makedirs(posixpath.dirname(path))
        with self.storage.fs.open(fs_path, "wb") as raw:
            writer = _TellingWriter(raw)
            try:
                yield writer
            finally:
                writer.close()
            raw.flush()
            fileno = getattr(raw, "fileno", None)
            if self.storage.is_local and fileno is not None:
                os.fsync(fileno())
        with self._lock:
            name = self._name(path)
            self._entries[name] = writer.entry(name)

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return posixpath.join(str(path), suffix)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        self.storage.fs.mv(self.storage.path(str(path)), self.storage.path(str(new_path)))
        with self._lock:
            entry = self._entries.pop(self._name(str(path)), None)
            if entry is not None:
                name = self._name(str(new_path))
                self._entries[name] = FileEntry(name, entry.size, entry.digest)

    def init_path(self, path: str | os.PathLike, **kwargs: Any) -> str:
        return str(path)

    def mkdir(self, path: str | os.PathLike) -> None:
        self.storage.makedirs(str(path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False  # never chosen by DCP on its own: always passed as the storage writer/reader

    def exists(self, path: str | os.PathLike) -> bool:
        return self.storage.exists(str(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.storage.rm(str(path))


class StorageWriter(FileSystemWriter):
    """DCP's file writer into ``<folder>/sharded/`` of the run storage (see :class:`StorageFileSystem`).

    Args:
        storage: The opened run storage.
        folder: The step folder.

    Example:
        >>> writer = StorageWriter(storage, "backup/step-6")  # doctest: +SKIP
        >>> dcp.save(state, storage_writer=writer); writer.fs.entries()  # doctest: +SKIP
    """

    def __init__(self, storage: Any, folder: str) -> None:
        super().__init__(f"{folder}/{SHARDED_DIR}", sync_files=False, overwrite=False)
        self.fs = StorageFileSystem(storage, folder)
        self.path = f"{folder.rstrip('/')}/{SHARDED_DIR}"


class StorageReader(FileSystemReader):
    """DCP's file reader of ``<folder>/sharded/`` of the run storage.

    Args:
        storage: The opened run storage.
        folder: The step folder.
    """

    def __init__(self, storage: Any, folder: str) -> None:
        super().__init__(f"{folder}/{SHARDED_DIR}")
        self.fs = StorageFileSystem(storage, folder)
        self.path = f"{folder.rstrip('/')}/{SHARDED_DIR}"


class DcpPart:
    """This rank's staged sharded states, written by ``dcp.save`` in the persist thread.

    Args:
        state: ``{component name: staged state}`` (DTensors over CPU buffers).
        storage: The opened run storage.
        group: The process group DCP's collectives use (one of the backups' own).

    Example:
        >>> part = DcpPart({"model": staged}, storage, group)  # doctest: +SKIP
        >>> entries = part.persist_into("backup/step-6")  # every rank, in its persist thread  # doctest: +SKIP
    """

    def __init__(self, state: dict[str, Any], storage: Any, group: Any) -> None:
        self.state, self.storage, self.group = state, storage, group

    def persist_into(self, folder: str) -> list[FileEntry]:
        """Write this rank's shards (rank 0 also DCP's ``.metadata``); return the files written."""
        writer = StorageWriter(self.storage, folder)
        dcp.save(self.state, storage_writer=writer, process_group=self.group)
        return writer.fs.entries()


def agree_refusal(reason: str | None, group: Any) -> str | None:
    """Every rank's verdict on a backup, the same on all: a rank that refuses its state makes every
    rank refuse (a sharded save is collective: all write it or none does)."""
    flag = torch.tensor([0.0 if reason is None else 1.0])
    dist.all_reduce(flag, group=group)
    if reason is not None:
        return reason
    return None if flag.item() == 0 else "another rank refused its part of this backup"


# -- the sharded components ----------------------------------------------------------------------
class ShardedModel:
    """The sharded model as a Stateful component (DCP's ``get_model_state_dict``: DTensor shards)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        set_model_state_dict(self.model, state)


class ShardedOptimizer:
    """The optimizer of a sharded model as a Stateful component: its state keyed by parameter name
    (not by position), DTensor shards, so that it reshards on load."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any], /) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


def _cpu_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of this rank's part (a DTensor stays a DTensor, over a CPU copy of its shard)."""
    if isinstance(tensor, DTensor):
        return DTensor.from_local(tensor.to_local().detach().to("cpu", copy=True), tensor.device_mesh,
                                  tensor.placements, run_check=False, shape=tensor.shape, stride=tensor.stride())
    return tensor.detach().to("cpu", copy=True)


class ShardedSnapshots(Snapshots):
    """:class:`~orchestrator.loop.rank_state.Snapshots` of a sharded model: each rank keeps (and a
    backup saves) only its shards of the kept weights.

    Example:
        >>> snapshots = ShardedSnapshots()
        >>> snapshots.keep("best", torch.nn.Linear(2, 1))
        >>> sorted(snapshots.kept["best"])
        ['bias', 'weight']
    """

    def keep(self, key: str, model: torch.nn.Module) -> None:
        self.kept[key] = {k: _cpu_shard(v) for k, v in model.state_dict().items()}

    def restore(self, key: str, model: torch.nn.Module) -> None:
        if key not in self.kept:
            raise RuntimeError(f"no weights were kept under {key!r} to restore")
        kept = self.kept[key]
        with torch.no_grad():
            for name, value in model.state_dict().items():
                local(value).copy_(local(kept[name]))

    def template(self, model: torch.nn.Module, saved: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """Where DCP loads the snapshots of a backup whose keys (flattened, ``snapshots.<key>.<param>``) are ``saved``."""
        names = list(model.state_dict())
        keys: set[str] = set()
        for fqn in saved:
            for name in names:
                if fqn.startswith("snapshots.") and fqn.endswith(f".{name}"):
                    keys.add(fqn[len("snapshots."):-len(name) - 1])
        return {key: {k: _cpu_shard(v) for k, v in model.state_dict().items()} for key in sorted(keys)}


def sharded_components(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       snapshots: ShardedSnapshots) -> dict[str, Component]:
    """The components of a sharded model that replace ``rank_components``' ``model``, ``optimizer``
    and ``snapshots``: saved and loaded through DCP, shards only."""
    return {"model": Component(ShardedModel(model), sharded=True, finite=True),
            "optimizer": Component(ShardedOptimizer(model, optimizer), sharded=True),
            "snapshots": Component(snapshots, sharded=True)}


def load_sharded(components: Mapping[str, Component], storage: Any, folder: str, group: Any,
                 model: torch.nn.Module) -> None:
    """Load every sharded component from ``folder``'s DCP files (resharding to this world size).

    Raises:
        FileNotFoundError: the folder holds no sharded state (a backup of ``strategy="ddp"``).
    """
    sharded = {name: c for name, c in components.items() if c.sharded}
    if not sharded:
        return
    reader = StorageReader(storage, folder)
    if not storage.exists(f"{folder}/{SHARDED_DIR}/.metadata"):
        raise FileNotFoundError(f"{storage.url(folder)} holds no sharded state ({SHARDED_DIR}/.metadata): it was not "
                                "written with strategy='fsdp'")
    saved = list(reader.read_metadata().state_dict_metadata)
    state: dict[str, Any] = {}
    for name, c in sharded.items():
        template = getattr(c.stateful, "template", None)
        state[name] = template(model, saved) if template is not None else c.stateful.state_dict()
    dcp.load(state, storage_reader=StorageReader(storage, folder), process_group=group)
    for name, c in sharded.items():
        c.stateful.load_state_dict(state[name])
