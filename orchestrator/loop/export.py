"""``orchestrator export``: a committed backup (sharded or not) as a plain model file.

The file is the model's full ``state_dict`` (plain tensors under the plain parameter names), loadable
with ``torch.load(path, weights_only=True)`` into the unwrapped model. A ``strategy="fsdp"`` backup's
shards are read through DCP (the run storage, any fsspec URL) and assembled in this process only:
the one place besides ModelCheckpoint's gather that holds the full model (never the optimizer).

Example:
    >>> step, state = backup_model_state(storage, step=None)  # doctest: +SKIP
    >>> torch.save(state, "model.pt")  # doctest: +SKIP
"""

from __future__ import annotations

import io
from typing import Any

import torch

from orchestrator.storage.checkpoint import NO_MANIFEST, SHARED_FILE, Manifest, checked_step, latest_valid, step_dir


def _committed(storage: Any, backup_dir: str, step: int | None) -> tuple[str, Manifest]:
    """The folder and manifest of committed step ``step`` (the newest valid one when None), verified."""
    if step is None:
        found = latest_valid(storage, backup_dir)
        if found is None:
            raise FileNotFoundError(f"no committed backup in {storage.url(backup_dir)}")
        return found.folder, found.manifest
    folder = step_dir(backup_dir, step)
    manifest, problem = checked_step(storage, folder)
    if manifest is None:
        if problem == NO_MANIFEST:
            raise FileNotFoundError(f"step {step} of {storage.url(backup_dir)} is not committed (no manifest)")
        raise ValueError(f"backup {storage.url(folder)} does not verify: {problem}")
    return folder, manifest


def backup_model_state(storage: Any, step: int | None = None, backup_dir: str = "backup") -> tuple[int, dict[str, Any]]:
    """``(step, model state_dict)`` of a committed backup of the run in ``storage``.

    Args:
        storage: The opened run storage.
        step: The backup's global step. Defaults to ``None``: the newest committed one that verifies.
        backup_dir: BackupAndRestore's folder in the run directory. Defaults to ``"backup"``.

    Raises:
        FileNotFoundError: no such committed backup.
        ValueError: the backup's files do not match its manifest.
    """
    folder, manifest = _committed(storage, backup_dir, step)
    names = {entry.name for entry in manifest.files}
    from orchestrator.loop.sharded_state import SHARDED_DIR, StorageReader

    if f"{SHARDED_DIR}/.metadata" in names:
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        state: dict[str, Any] = {}
        _load_state_dict(state, storage_reader=StorageReader(storage, folder),
                         planner=_EmptyStateDictLoadPlanner(keys=["model"]), no_dist=True)
        return manifest.step, dict(state["model"])
    shared = torch.load(io.BytesIO(storage.read_bytes(f"{folder}/{SHARED_FILE}")), map_location="cpu",
                        weights_only=True)
    return manifest.step, dict(shared["model"])


def export_model(storage: Any, output: str, step: int | None = None, backup_dir: str = "backup") -> int:
    """Write the model of a committed backup to ``output`` (a local path or an fsspec URL); return its step.

    Example:
        >>> export_model(StorageSpec("s3://bucket/runs", "digits").open(), "model.pt")  # doctest: +SKIP
        120
    """
    import fsspec

    found, state = backup_model_state(storage, step, backup_dir)
    with fsspec.open(output, "wb") as f:
        torch.save(state, f)
    return found
