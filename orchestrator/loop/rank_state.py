"""What a rank saves and restores: its position, partial epoch sums, RNG, and (rank 0) the model.

Used by :class:`orchestrator.loop.train_loop.TrainLoop` when it applies a ``Backup`` or ``SaveModel``
decision, and when it resumes from a committed backup.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from orchestrator.storage.checkpoint import COORDINATOR_FILE, SHARED_FILE, FileEntry, encode_state, rank_file, step_dir
from orchestrator.decisions import Backup, SaveModel
from orchestrator.core.metrics import PhaseSums
from orchestrator.loop.state_io import AsyncPersister, StagingArea, capture_rng, from_bytes, save_to

@dataclass(frozen=True)
class Position:
    """Where a rank is: the last completed batch of ``epoch`` (phase ``"batch"``), the end of
    ``epoch`` (``"epoch_end"``), or nothing done yet (``"start"``)."""

    epoch: int = 0
    batch: int = -1
    global_step: int = 0
    phase: str = "start"

    def next_batch(self, steps_per_epoch: int) -> tuple[int, int]:
        """(epoch, batch) to run next."""
        if self.phase == "start":
            return 0, 0
        if self.phase == "epoch_end":
            return self.epoch + 1, 0
        return self.epoch, self.batch + 1


class Accumulator:
    """Sums of ``value * n`` for the loss and every metric, kept on the device in float64."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.totals: torch.Tensor | None = None
        self.count = 0

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """Add one batch; return the batch's ``loss * n`` (float64, on the device)."""
        weighted = torch.stack([loss, *(v.detach().to(loss.device) for v in metrics.values())]).double() * n
        if self.totals is None:
            self.names, self.totals = ["loss", *metrics], weighted.clone()
        else:
            self.totals.add_(weighted)
        self.count += n
        return weighted[0]

    def phase_sums(self) -> PhaseSums:
        """The sums as Python floats (one device sync)."""
        values = self.totals.tolist() if self.totals is not None else []
        return PhaseSums(totals=dict(zip(self.names, values)), count=self.count)

    def state(self) -> dict[str, Any]:
        return {"names": list(self.names), "totals": self.totals, "count": self.count}

    @staticmethod
    def from_state(state: dict[str, Any], device: torch.device) -> "Accumulator":
        acc = Accumulator()
        acc.names, acc.count = list(state["names"]), int(state["count"])
        acc.totals = state["totals"].to(device) if state["totals"] is not None else None
        return acc


def checkpoint_path(filepath: str) -> str:
    """ModelCheckpoint paths: URLs as given, relative paths under ``checkpoints/``."""
    return filepath if "://" in filepath else f"checkpoints/{filepath.lstrip('/')}"


def _refuse_non_finite(files: dict[str, Any]) -> str | None:
    """Why a staged backup must not be committed (checked off the training thread), or None."""
    shared = files.get(SHARED_FILE)
    if shared is not None and not all(bool(torch.isfinite(t).all()) for t in shared["model"].values()
                                      if t.is_floating_point()):
        return "non-finite weights; backup refused"
    return None


class RankSaver:
    """Backups (two-phase, asynchronous) and model checkpoints for one rank of a TrainLoop."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        self.area = StagingArea()
        self.persister: AsyncPersister | None = None
        self.last_stall_s = 0.0

    def _storage(self) -> Any:
        if self.loop.storage is None:
            raise RuntimeError("a backup or checkpoint was requested but the run has no storage")
        return self.loop.storage

    def backup(self, decision: Backup) -> None:
        loop, storage = self.loop, self._storage()
        if self.persister is None:
            self.persister = AsyncPersister(storage.write_stream, self._on_persisted)
        self.persister.wait()  # the staging buffers are about to be reused
        folder = step_dir(decision.backup_dir, loop.pos.global_step)
        meta = {"epoch": loop.pos.epoch, "batch": loop.pos.batch, "step": loop.pos.global_step,
                "phase": loop.pos.phase, "world_size": loop.world_size, "backup_dir": decision.backup_dir,
                "keep": decision.keep, "rank": loop.rank}
        start = time.perf_counter()
        state: dict[str, Any] = {}
        if loop.rank == 0:
            state[SHARED_FILE] = {"model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
                                  "snapshots": loop.snapshots}
            state[COORDINATOR_FILE] = encode_state(decision.coordinator_state or {})
        state[rank_file(loop.rank)] = {
            "rng": capture_rng(), "pos": asdict(loop.pos), "sums": loop.sums.state(), "seen": list(loop.seen),
            "result": {"learning_rates": list(loop.result.learning_rates), "epochs_run": loop.result.epochs_run,
                       "steps_run": loop.result.steps_run, "stopped_at": loop.result.stopped_at},
        }
        staged = self.area.stage(state)
        if loop.device.type == "cuda":
            torch.cuda.synchronize(loop.device)
        self.last_stall_s = time.perf_counter() - start
        self.persister.submit(folder, staged, meta, check=_refuse_non_finite)

    def _on_persisted(self, folder: str, entries: list[FileEntry] | None, meta: dict[str, Any]) -> None:
        self.loop.link.persisted(self.loop.rank, folder, entries, meta)

    def flush(self) -> None:
        if self.persister is not None:
            self.persister.wait()

    def save_model(self, decision: SaveModel) -> None:
        loop = self.loop
        if loop.rank != 0:
            return  # one writer per file
        storage = self._storage()
        if decision.weights_only:
            obj: Any = loop.model.state_dict()
        else:
            obj = {"model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
                   "epoch": loop.pos.epoch, "step": loop.pos.global_step}
        storage.write_stream(checkpoint_path(decision.filepath), lambda out: save_to(obj, out))
        for old in decision.delete:
            if old != decision.filepath:
                storage.rm(checkpoint_path(old))

    def load(self, folder: str) -> dict[str, Any]:
        """Restore everything but the RNG from a committed backup; return the RNG state to set last."""
        loop, storage = self.loop, self._storage()
        shared = from_bytes(storage.read_bytes(f"{folder}/{SHARED_FILE}"))
        loop.model.load_state_dict(shared["model"])
        loop.optimizer.load_state_dict(shared["optimizer"])
        loop.snapshots = shared["snapshots"]
        mine = from_bytes(storage.read_bytes(f"{folder}/{rank_file(loop.rank)}"))
        loop.pos = Position(**mine["pos"])
        loop.sums = Accumulator.from_state(mine["sums"], loop.device)
        loop.seen = list(mine["seen"])
        result = mine["result"]
        loop.result.learning_rates = list(result["learning_rates"])
        loop.result.epochs_run = int(result["epochs_run"])
        loop.result.steps_run = int(result["steps_run"])
        loop.result.stopped_at = tuple(result["stopped_at"]) if result["stopped_at"] else None
        return mine["rng"]
