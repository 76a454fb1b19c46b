"""A local run directory on a multi-node cluster must be visible from every node, or fit fails at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parent.parent


def _can_unshare_mounts() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs `unshare -m` and mount (root or CAP_SYS_ADMIN)")
def test_a_local_storage_path_a_worker_node_cannot_see_fails_before_training_naming_the_node(tmp_path):
    # The node that cannot see the directory runs in its own mount namespace (tmpfs over the path),
    # on a cluster of its own: this session already owns a Ray instance.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    storage = tmp_path / "store"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "entries" / "blind_node.py"), str(storage)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    error = next(line for line in proc.stdout.splitlines() if line.startswith("BLIND-ERROR: "))
    assert "OrchestratorError" in error
    assert f"storage {storage}/blind is a local path that workers on" in error
    assert "node id" in error and "cannot see" in error and "s3://" in error
    assert not (storage / "blind" / "events.jsonl").exists() or "epoch_end" not in (
        storage / "blind" / "events.jsonl").read_text()
