"""A two-node local cluster where one node cannot see the run directory (tests only).

Usage: ``python blind_node.py STORAGE_DIR``, with ``tests/`` on PYTHONPATH; needs ``unshare -m``.

The second node's raylet runs in its own mount namespace with an empty tmpfs mounted over
STORAGE_DIR: its workers see a different directory at the same path, as a worker on another
machine would. A fit with a local storage path on that cluster must fail before training with an
error that says so. Prints ``BLIND-ERROR: <message>`` and exits 0 when it does.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import ray

from orchestrator import Trainer
import workloads
from scenario_tools import start_cluster


def main(storage: str) -> int:
    Path(storage).mkdir(parents=True, exist_ok=True)
    cluster = start_cluster()
    blind = None
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        ray_bin = str(Path(sys.executable).parent / "ray")
        script = (f"mount -t tmpfs none {shlex.quote(storage)} && exec {shlex.quote(ray_bin)} start --block "
                  f"--address={cluster.gcs_address} --num-cpus=1 --object-store-memory={80 * 2**20} "
                  "--disable-usage-stats")
        blind = subprocess.Popen(["unshare", "-m", "sh", "-c", script], start_new_session=True)
        ray.init(address=cluster.address, logging_level="WARNING")
        deadline = time.monotonic() + 60
        while sum(1 for n in ray.nodes() if n["Alive"]) < 3:
            if time.monotonic() > deadline or blind.poll() is not None:
                print("the blind node never joined")
                return 1
            time.sleep(0.2)
        trainer = Trainer(model=workloads.tiny_model, optimizer=workloads.sgd, loss=workloads.cross_entropy,
                          data=workloads.odd_data, num_workers=2, placement_strategy="STRICT_SPREAD",
                          storage=storage, run_name="blind")
        try:
            trainer.fit(epochs=1, verbose=0)
        except Exception as exc:  # noqa: BLE001 - the test checks the message
            print(f"BLIND-ERROR: {type(exc).__name__}: {exc}")
            return 0
        print("fit succeeded although a worker could not see the run directory")
        return 1
    finally:
        ray.shutdown()
        if blind is not None and blind.poll() is None:
            blind.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
            try:
                blind.wait(60)
            except subprocess.TimeoutExpired:
                blind.kill()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
