"""A local run directory on a multi-node cluster must be visible from every node, or fit fails at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import background

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent


def _can_unshare_mounts() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


CAN_UNSHARE = _can_unshare_mounts()
# The node that cannot see the directory runs in its own mount namespace (tmpfs over the path), on a
# cluster of its own (this session already owns a Ray instance), started with the session.
SCENARIO = background.Scenario("blind", [sys.executable, str(ROOT / "tests" / "entries" / "blind_node.py"),
                                         "{folder}/store"]) if CAN_UNSHARE else None


@pytest.mark.skipif(not CAN_UNSHARE, reason="needs `unshare -m` and mount (root or CAP_SYS_ADMIN)")
def test_a_local_storage_path_a_worker_node_cannot_see_fails_before_training_naming_the_node():
    returncode = SCENARIO.wait(timeout=240)
    output = SCENARIO.output()
    assert returncode == 0, output
    storage = SCENARIO.folder / "store"
    error = next(line for line in output.splitlines() if line.startswith("BLIND-ERROR: "))
    assert "OrchestratorError" in error
    assert f"storage {storage}/blind is a local path that workers on" in error
    assert "node id" in error and "cannot see" in error and "s3://" in error
    assert not (storage / "blind" / "events.jsonl").exists() or "epoch_end" not in (
        storage / "blind" / "events.jsonl").read_text()
