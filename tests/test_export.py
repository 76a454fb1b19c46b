"""``orchestrator export``'s reading of backups (no Ray): only a committed step whose files verify is exported."""

from __future__ import annotations

import io

import pytest
import torch

from orchestrator.loop.export import backup_model_state, export_model
from orchestrator.storage.checkpoint import SHARED_FILE, ChecksumWriter, Manifest, commit
from orchestrator.storage.fs import StorageSpec


def _backup(storage, step: int, weight: float, committed: bool = True) -> None:
    """A DDP-style step folder holding only the shared file (the model's state), committed or not."""
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.full((2,), weight)}}, buffer)
    data = buffer.getvalue()
    storage.write_bytes(f"backup/step-{step}/{SHARED_FILE}", data)
    if committed:
        with ChecksumWriter(io.BytesIO()) as checksum:
            checksum.write(data)
        commit(storage, "backup", Manifest(step=step, epoch=0, batch=step, phase="train", world_size=1,
                                           files=[checksum.entry(SHARED_FILE)]))


@pytest.fixture
def storage(tmp_path):
    storage = StorageSpec(str(tmp_path), "r").open()
    _backup(storage, 3, 3.0)
    _backup(storage, 6, 6.0)
    _backup(storage, 9, 9.0, committed=False)
    return storage


def test_export_takes_the_newest_committed_step_and_writes_a_plain_state_dict(storage, tmp_path):
    assert export_model(storage, str(tmp_path / "model.pt")) == 6
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], torch.full((2,), 6.0))
    assert backup_model_state(storage, step=3)[0] == 3


@pytest.mark.parametrize("damage,step,error,says", [
    (None, 9, FileNotFoundError, "step 9 of .* is not committed"),
    (None, 12, FileNotFoundError, "step 12 of .* is not committed"),
    ("truncate", 6, ValueError, "does not verify: .* has 10 bytes, the manifest says"),
    ("remove", 6, ValueError, "does not verify: .* is missing"),
])
def test_export_refuses_a_step_that_is_not_committed_or_does_not_verify(storage, damage, step, error, says):
    path = f"backup/step-{step}/{SHARED_FILE}"
    if damage == "truncate":
        storage.write_bytes(path, storage.read_bytes(path)[:10])
    elif damage == "remove":
        storage.rm(path)
    with pytest.raises(error, match=says):
        backup_model_state(storage, step=step)
