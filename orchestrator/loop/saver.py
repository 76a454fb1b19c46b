"""Saving and loading a rank's named components, and ModelCheckpoint's model files.

One save path and one load path, both over the component mapping
(:mod:`orchestrator.loop.rank_state`). A step folder holds:

- the shared file (rank 0): ``{name: state}`` of every shared component;
- the coordinator file (rank 0): the coordinator's and callbacks' state, JSON;
- one rank file per rank: ``{name: state}`` of that rank's own components;
- with sharded components (``strategy="fsdp"``), the ``sharded/`` folder: every rank's shards of
  them and DCP's ``.metadata`` (see :mod:`~orchestrator.loop.sharded_state`).

A backup is two-phase: :class:`~orchestrator.loop.state_io.StagingArea` copies the states to CPU
(the only stall), :class:`~orchestrator.loop.state_io.AsyncPersister` writes them in the background.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from orchestrator.decisions import Backup, SaveModel, WriteHistograms
from orchestrator.loop.elastic import merged_own
from orchestrator.loop.live import DERIVED
from orchestrator.loop.rank_state import Component, Components, Position
from orchestrator.loop.state_io import AsyncPersister, StagingArea, from_bytes, save_to
from orchestrator.loop.tb_histograms import HistogramWriter
from orchestrator.storage.checkpoint import COORDINATOR_FILE, SHARED_FILE, FileEntry, encode_state, rank_file, step_dir
from orchestrator.storage.layout import OPTION_COMPONENTS, component_mismatch

logger = logging.getLogger(__name__)

OnPersisted = Callable[[int, str, list[FileEntry] | None, dict[str, Any]], None]


def checkpoint_path(filepath: str) -> str:
    """ModelCheckpoint paths: URLs as given, relative paths under ``checkpoints/``."""
    return filepath if "://" in filepath else f"checkpoints/{filepath.lstrip('/')}"


#: The key under which :meth:`RankSaver.files` hands out the sharded components' states.
SHARDED_STATES = "<sharded>"


def _all_finite(node: Any) -> bool:
    if hasattr(node, "to_local"):  # a DTensor: this rank's shard (no collective)
        node = node.to_local()
    if isinstance(node, torch.Tensor):
        return not node.is_floating_point() or bool(torch.isfinite(node).all())
    if isinstance(node, float):
        return math.isfinite(node)
    if isinstance(node, dict):
        return all(_all_finite(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return all(_all_finite(v) for v in node)
    return True


@dataclass
class PendingRestore:
    """The loaded states of the components that restore last; :meth:`apply` restores them.

    Example:
        >>> pending = saver.load("backup/step-5")  # doctest: +SKIP
        >>> pending.apply()  # right before the next batch  # doctest: +SKIP
    """

    items: list[tuple[Component, Any]] = field(default_factory=list)

    def apply(self) -> None:
        items, self.items = self.items, []
        for component, state in items:
            component.stateful.load_state_dict(state)


class RankSaver:
    """Backups (two-phase, asynchronous) of one rank's components, and model checkpoints.

    Args:
        components: The rank's state, by name; read at every save, written at every load.
        rank: This rank.
        world_size: Number of ranks (recorded with every backup).
        storage: The opened run storage, or None (then a save or load raises).
        on_persisted: ``(rank, folder, entries, meta)`` once a backup's files on this rank are
            durable (``entries``) or failed or were refused (``None``, ``meta["error"]`` says why);
            called from the persist thread.
        group: With sharded components, the process group of their DCP saves and loads (its own,
            so that a save in the persist thread never interleaves with training's collectives).
            Defaults to ``None``.
        model: The (sharded) model: ModelCheckpoint files and sharded snapshots gather or follow it.
            Defaults to ``None``.

    Example:
        >>> saver = RankSaver({"model": Component(model, shared=True)}, rank=0, world_size=1,
        ...                   storage=storage, on_persisted=link.persisted)  # doctest: +SKIP
        >>> saver.backup(Backup(backup_dir="backup"), Position())  # doctest: +SKIP
        >>> saver.flush()  # doctest: +SKIP
        >>> saver.load("backup/step-0").apply()  # doctest: +SKIP
    """

    def __init__(self, components: Components, rank: int, world_size: int, storage: Any,
                 on_persisted: OnPersisted, group: Any = None, model: torch.nn.Module | None = None) -> None:
        self.components = components
        self.sharded = any(c.sharded for c in components.values())
        self.group, self.model = group, model
        self.rank = rank
        self.world_size = world_size
        self.storage = storage
        self.on_persisted = on_persisted
        self.area = StagingArea()
        self.persister: AsyncPersister | None = None
        self.histograms: HistogramWriter | None = None

    def _storage(self) -> Any:
        if self.storage is None:
            raise RuntimeError("a backup or checkpoint was requested but the run has no storage")
        return self.storage

    def files(self, coordinator_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """What this rank writes into a step folder: ``{file name: {component name: state}}`` (and
        the coordinator's JSON bytes on rank 0). The states are live references, not copies."""
        files: dict[str, Any] = {}
        if self.sharded:  # every rank: its shards
            files[SHARDED_STATES] = {name: c.stateful.state_dict() for name, c in self.components.items() if c.sharded}
        if self.rank == 0:
            files[SHARED_FILE] = {name: c.stateful.state_dict() for name, c in self.components.items()
                                  if c.shared and not c.sharded}
            files[COORDINATOR_FILE] = encode_state(coordinator_state or {})
        files[rank_file(self.rank)] = {name: c.stateful.state_dict() for name, c in self.components.items()
                                       if not c.shared and not c.sharded}
        return files

    def backup(self, decision: Backup, position: Position) -> None:
        """Stage every component now; write the step folder of ``position`` in the background."""
        storage = self._storage()
        if self.persister is None:
            self.persister = AsyncPersister(storage.write_stream, self._done)
        began = time.perf_counter()  # training stalls from here until the copy is staged
        self.persister.wait()  # the staging buffers are about to be reused
        meta = {"epoch": position.epoch, "batch": position.batch, "step": position.global_step,
                "phase": position.phase, "world_size": self.world_size, "backup_dir": decision.backup_dir,
                "keep": decision.keep, "rank": self.rank, "write": decision.write}
        staged = self.area.stage(self.files(decision.coordinator_state))
        if SHARDED_STATES in staged:
            from orchestrator.loop.sharded_state import DcpPart
            staged[SHARDED_STATES] = DcpPart(staged[SHARDED_STATES], storage, self.group)
        meta["stall_s"] = time.perf_counter() - began
        histograms = self.histograms.in_flight() if self.histograms is not None else None
        self.persister.submit(step_dir(decision.backup_dir, position.global_step), staged, meta,
                              check=functools.partial(self._refusal, histograms))

    def _refusal(self, histograms: threading.Thread | None, files: dict[str, Any]) -> str | None:
        """Why a staged backup must not be committed (checked in the persist thread), or None.

        First waits for the TensorBoard histogram file rank 0 was writing when the backup was staged:
        the coordinator state in the backup names it, so it is on storage before the backup can commit
        (a failure right after an epoch end would otherwise leave a committed backup naming a file
        that was never written, and the resumed run without that epoch's histograms).
        """
        if histograms is not None:
            histograms.join()
        reason = None
        for name, c in self.components.items():
            if not c.finite:
                continue
            if c.sharded:
                states = files[SHARDED_STATES].state
            else:
                states = files.get(SHARED_FILE if c.shared else rank_file(self.rank), {})
            if name in states and not _all_finite(states[name]):
                reason = f"non-finite values in {name!r}; backup refused"
                break
        if self.sharded:  # a sharded save is collective: every rank writes it, or none does
            from orchestrator.loop.sharded_state import agree_refusal
            reason = agree_refusal(reason, self.group)
        return reason

    def _done(self, folder: str, entries: list[FileEntry] | None, meta: dict[str, Any]) -> None:
        self.on_persisted(self.rank, folder, entries, meta)

    def flush(self) -> None:
        """Block until the pending backup is durable (raise if it failed) and any histogram file written."""
        if self.histograms is not None:
            self.histograms.wait()
        if self.persister is not None:
            self.persister.wait()

    def load(self, folder: str, own_rank: int | None = None, written_by: int | None = None) -> PendingRestore:
        """Restore every component from a step folder except those that restore last; return those.

        Sharded components are loaded through DCP, resharded to this world size. ``own_rank``: whose
        rank file holds this rank's own components (another rank's, after a world size change of a
        ``strategy="fsdp"`` run). ``written_by``: the number of ranks that wrote the folder, when it
        may differ from this attempt's (an elastic run); the rank's own state is then rebuilt from the
        old ranks' files (:func:`~orchestrator.loop.elastic.merged_own`: rank 0 reads them all, for the
        metric sums) and its random streams are derived from the step.

        Raises:
            ResumeMismatch: the folder holds a ``scaler`` or ``lr_scheduler`` the run has not, or the
                reverse (``precision`` or ``lr_scheduler`` was switched).
            KeyError: the folder holds no state for another of the components.
        """
        storage = self._storage()
        shared = from_bytes(storage.read_bytes(f"{folder}/{SHARED_FILE}"))
        if written_by is None or written_by == self.world_size:
            mine = from_bytes(storage.read_bytes(f"{folder}/{rank_file(self.rank if own_rank is None else own_rank)}"))
            pending = self.load_states(shared, mine, where=folder)
        else:
            old = range(written_by) if self.rank == 0 else range(1)
            owns = [from_bytes(storage.read_bytes(f"{folder}/{rank_file(r)}")) for r in old]
            pending = self.load_states(shared, merged_own(owns, self.rank), where=folder, derived=DERIVED)
        if self.sharded:
            from orchestrator.loop.sharded_state import load_sharded
            load_sharded(self.components, storage, folder, self.group, self.model)
        return pending

    def load_states(self, shared: dict[str, Any], mine: dict[str, Any], where: str,
                    derived: tuple[str, ...] = ()) -> PendingRestore:
        """:meth:`load` from states in memory (``shared``: the shared file's, ``mine``: this rank's);
        components named in ``derived`` may be missing from ``mine`` (they are not loaded)."""
        folder = where
        for name in OPTION_COMPONENTS:  # before anything is loaded
            if (name in self.components) != (name in shared):
                raise component_mismatch(name, in_backup=name in shared, where=folder)
        pending = PendingRestore()
        for name, c in self.components.items():
            if c.sharded:  # loaded by load_sharded
                continue
            source, states = (SHARED_FILE, shared) if c.shared else (rank_file(self.rank), mine)
            if name in derived and name not in states:
                continue
            if name not in states:
                raise KeyError(f"{folder}/{source} holds no state for component {name!r} "
                               f"(it holds {sorted(states)})")
            if c.restore_last:
                pending.items.append((c, states[name]))
            else:
                c.stateful.load_state_dict(states[name])
        return pending

    def save_model(self, decision: SaveModel, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   position: Position) -> None:
        """Rank 0 writes a ModelCheckpoint file (weights, or weights, optimizer and position).

        A sharded model's full state is gathered to rank 0 first (every rank takes part), one
        parameter at a time into CPU memory: the file holds plain tensors under the plain names.
        """
        if self.sharded:
            from orchestrator.loop.fsdp import full_model_state, full_optimizer_state
            weights = full_model_state(model)
            optim_state = None if decision.weights_only else full_optimizer_state(model, optimizer)
        elif self.rank == 0:
            weights, optim_state = model.state_dict(), None if decision.weights_only else optimizer.state_dict()
        if self.rank != 0:
            return  # one writer per file
        storage = self._storage()
        if decision.weights_only:
            obj: Any = weights
        else:
            obj = {"model": weights, "optimizer": optim_state, "epoch": position.epoch, "step": position.global_step}
        storage.write_stream(checkpoint_path(decision.filepath), lambda out: save_to(obj, out))
        for old in decision.delete:
            if old != decision.filepath:
                storage.rm(checkpoint_path(old))

    def write_histograms(self, decision: WriteHistograms, model: torch.nn.Module) -> None:
        """Rank 0 computes TensorBoard's weight histograms now and writes their file in the background."""
        if self.rank != 0:
            return  # one writer per file
        if self.sharded:  # rank 0 holds only its shards; gathering the full weights for histograms is not worth it
            if self.histograms is None:
                logger.warning("TensorBoard weight histograms are not written with strategy='fsdp' (sharded weights)")
                self.histograms = HistogramWriter(self._storage())
            return
        if self.histograms is None:
            self.histograms = HistogramWriter(self._storage())
        self.histograms.write(decision, model)
