"""Trains on a local multi-node Ray cluster while Ray drains the nodes its workers run on (tests only).

Usage: ``python drain_cluster.py drain|sigterm STORAGE_DIR RUN_NAME EPOCHS``, with ``tests/`` on PYTHONPATH.

``sigterm``: one worker node is a ``ray start --block`` process (as in a Kubernetes pod); once
training is under way a spare node is added and that process gets SIGTERM, as when a spot VM or a
pod is reclaimed. Ray then drains the node itself.

``drain``:

Starts a ``ray.cluster_utils.Cluster`` (a head without CPUs and three 1-CPU nodes: two for the
workers and a spare) and fits ``workloads.drainable_trainer``. A thread drains, with the
``ray drain-node`` CLI:

1. the node of rank 1 once the first attempt has committed a backup: the spare node takes over
   at once (training continues on the remaining resources);
2. the node of rank 1 again once the second attempt has committed a backup: now no spare node is
   left, so the next attempt waits for resources; the thread adds a node after a few seconds.

Writes ``<STORAGE_DIR>/<RUN_NAME>-result.pt`` (parameters, History) and ``...-cluster.json``
(which nodes were drained and added) and exits 0, or prints the error and exits 1.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import ray
import torch
from ray.cluster_utils import Cluster

import workloads

NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 2**20}


def committed_in_attempt(events_file: Path, attempt: int) -> bool:
    if not events_file.exists():
        return False
    for line in events_file.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("type") == "backup_committed" and event.get("attempt") == attempt:
            return True
    return False


def worker_nodes() -> list[str]:
    from ray._private import state

    return sorted({a["Address"]["NodeID"] for a in state.actors().values()
                   if a["ActorClassName"] == "TrainWorker" and a["State"] == "ALIVE"})


def drain(gcs_address: str, node_id: str) -> None:
    subprocess.run(["ray", "drain-node", "--address", gcs_address, "--node-id", node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaimed",
                    "--deadline-remaining-seconds", "120"], check=True, capture_output=True, timeout=120)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def disturb(cluster: Cluster, events_file: Path, record: dict) -> None:
    for attempt in (1, 2):
        wait_for(lambda: committed_in_attempt(events_file, attempt), 240, f"a backup in attempt {attempt}")
        nodes = worker_nodes()
        drain(cluster.gcs_address, nodes[-1])
        record["drained"].append(nodes[-1])
        record["workers_before"].append(nodes)
    time.sleep(4.0)  # the third attempt is now waiting for a second CPU
    record["added"].append(cluster.add_node(**NODE_ARGS).node_id)


def fit_in_thread(storage: str, run_name: str, epochs: int, outcome: dict) -> threading.Thread:
    def fit() -> None:  # in a thread: nodes can only be added from the main thread
        try:
            outcome["history"] = workloads.drainable_trainer(storage, run_name).fit(epochs=epochs, verbose=0)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    return thread


def alive_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def sigterm_spot_node(cluster: Cluster, events_file: Path, record: dict, spot: subprocess.Popen,
                      spot_id: str) -> None:
    wait_for(lambda: committed_in_attempt(events_file, 1), 240, "a backup in attempt 1")
    record["workers_before"].append(worker_nodes())
    record["added"].append(cluster.add_node(**NODE_ARGS).node_id)
    spot.send_signal(signal.SIGTERM)
    record["drained"].append(spot_id)


def main(mode: str, storage: str, run_name: str, epochs: int) -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 2**20})
    record: dict = {"drained": [], "added": [], "workers_before": []}
    spot = None
    try:
        for _ in range(3 if mode == "drain" else 1):
            cluster.add_node(**NODE_ARGS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        if mode == "sigterm":
            known = alive_nodes()
            spot = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block",
                                     f"--address={cluster.gcs_address}", "--num-cpus=1",
                                     f"--object-store-memory={NODE_ARGS['object_store_memory']}",
                                     "--disable-usage-stats"], start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for(lambda: len(alive_nodes()) == len(known) + 1, 60, "the spot node to join")
            spot_id = (alive_nodes() - known).pop()
        events_file = Path(storage) / run_name / "events.jsonl"
        outcome: dict = {}
        thread = fit_in_thread(storage, run_name, epochs, outcome)
        if mode == "sigterm":
            sigterm_spot_node(cluster, events_file, record, spot, spot_id)
        else:
            disturb(cluster, events_file, record)
        thread.join(300)
        if "error" in outcome:
            raise outcome["error"]
        history = outcome["history"]
        torch.save({"params": {k: v.detach() for k, v in history.model.state_dict().items()},
                    "history": history.history}, Path(storage) / f"{run_name}-result.pt")
        (Path(storage) / f"{run_name}-cluster.json").write_text(json.dumps(record))
        return 0
    except BaseException:
        traceback.print_exc()
        print(json.dumps(record))
        return 1
    finally:
        ray.shutdown()
        if spot is not None and spot.poll() is None:
            spot.send_signal(signal.SIGTERM)
            try:
                spot.wait(60)
            except subprocess.TimeoutExpired:
                spot.kill()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
