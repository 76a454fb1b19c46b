"""Trains on a local multi-node Ray cluster while Ray drains the nodes its workers run on (tests only).

Usage: ``python drain_cluster.py SCENARIO[,SCENARIO...] STORAGE_DIR RUN_NAME EPOCHS``, with ``tests/`` on
PYTHONPATH. Starts one ``ray.cluster_utils.Cluster`` (a head without CPUs, then 1-CPU nodes) and runs
the scenarios on it one after the other, each fitting ``workloads.drainable_trainer``; before each
one, once the workers of the previous one are gone, nodes are added until the scenario has as many
usable (alive, not draining) nodes as it needs. A scenario that fails is reported and the next one
gets a fresh cluster.

``sigterm`` (one usable node to begin with): the other worker node is a ``ray start --block``
process (as in a Kubernetes pod); once training is under way a spare node is added and that process
gets SIGTERM, as when a spot VM or a pod is reclaimed. Ray then drains the node itself.

``drain`` (three usable nodes: two for the workers and a spare): a thread drains, with the
``ray drain-node`` CLI:

1. the node of rank 1 once the first attempt has committed a backup: the spare node takes over
   at once (training continues on the remaining resources);
2. the node of rank 1 again once the second attempt has committed a backup: now no spare node is
   left, so the next attempt waits for resources; once its placement group is pending, the thread
   adds a node.

``reference`` (two usable nodes, added if fewer are left): the same run, undisturbed, to compare with.

Each scenario stores its run under ``STORAGE_DIR/<SCENARIO>/`` (directly under ``STORAGE_DIR`` when
only one is given) and writes there ``<RUN_NAME>-outcome.json`` (``{"ok": true}``, or ``false`` with
the error), and on success ``<RUN_NAME>-result.pt`` (parameters, History) and
``<RUN_NAME>-cluster.json`` (which nodes were drained and added, and where the workers ran before).
Exits 0 when every scenario succeeded, 1 otherwise.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

import workloads
from scenario_tools import events, log, save_result, wait_for
from scenario_tools import start_cluster as head_only

NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 * 2**20}


def committed_in_attempt(events_file: Path, attempt: int) -> bool:
    return any(e.get("type") == "backup_committed" and e.get("attempt") == attempt for e in events(events_file))


def worker_nodes() -> list[str]:
    from ray._private import state

    return sorted({a["Address"]["NodeID"] for a in state.actors().values()
                   if a["ActorClassName"] == "TrainWorker" and a["State"] == "ALIVE"})


def drain(gcs_address: str, node_id: str) -> None:
    subprocess.run(["ray", "drain-node", "--address", gcs_address, "--node-id", node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaimed",
                    "--deadline-remaining-seconds", "120"], check=True, capture_output=True, timeout=120)


def disturb(cluster: Cluster, events_file: Path, record: dict) -> None:
    for attempt in (1, 2):
        wait_for(lambda: committed_in_attempt(events_file, attempt), 240, f"a backup in attempt {attempt}")
        nodes = worker_nodes()
        log(f"draining {nodes[-1]} (attempt {attempt})")
        drain(cluster.gcs_address, nodes[-1])
        record["drained"].append(nodes[-1])
        record["workers_before"].append(nodes)
    # the third attempt waits for a second CPU: its placement group stays pending until a node is added
    wait_for(placement_pending, 120, "the third attempt to wait for resources")
    log("the third attempt waits for resources: adding a node")
    record["added"].append(cluster.add_node(**NODE_ARGS).node_id)


def placement_pending() -> bool:
    return any(pg["state"] == "PENDING" for pg in ray.util.placement_group_table().values())


def fit_in_thread(storage: str, run_name: str, epochs: int, outcome: dict, hold: Path) -> threading.Thread:
    """Fit in a thread (nodes can only be added from the main thread); steps are slow while ``hold`` exists."""
    hold.parent.mkdir(parents=True, exist_ok=True)
    hold.touch()

    def fit() -> None:
        try:
            outcome["history"] = workloads.drainable_trainer(storage, run_name, str(hold)).fit(
                epochs=epochs, verbose=0)
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
    log(f"SIGTERM to the spot node's ray start ({spot_id})")
    spot.send_signal(signal.SIGTERM)
    record["drained"].append(spot_id)


def start_cluster() -> Cluster:
    cluster = head_only()
    ray.init(address=cluster.address, logging_level="WARNING")
    return cluster


def usable_nodes() -> list[str]:
    """Alive nodes with a CPU that take new work (not draining)."""
    from ray._private import state

    draining = set(state.state.get_draining_nodes())
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0
            and n["NodeID"] not in draining]


def prepare(cluster: Cluster, nodes: int, at_least: bool = False) -> None:
    """Wait until no worker of an earlier scenario is left (the group its fit parked for a next fit is
    released now: it would hold its workers for ``PARK_IDLE_S``), then add 1-CPU nodes up to ``nodes``
    usable ones (``at_least``: more may be left from the scenarios before)."""
    from orchestrator.cluster.parking import release_parked

    release_parked()
    wait_for(lambda: not worker_nodes(), 60, "the workers of the previous scenario to exit")
    for _ in range(nodes - len(usable_nodes())):
        cluster.add_node(**NODE_ARGS)
    # (not cluster.wait_for_nodes(): it would also wait for drained nodes, which never come back)
    wait_for(lambda: (len(usable_nodes()) >= nodes) if at_least else (len(usable_nodes()) == nodes), 60,
             f"{nodes} usable nodes")


def run_drain(cluster: Cluster, storage: str, run_name: str, epochs: int, record: dict) -> dict:
    prepare(cluster, 3)  # two for the workers and a spare
    outcome: dict = {}
    hold = Path(storage) / f"{run_name}.hold"
    thread = fit_in_thread(storage, run_name, epochs, outcome, hold)
    disturb(cluster, Path(storage) / run_name / "events.jsonl", record)
    hold.unlink()  # every disturbance is sent: the rest may run at full speed
    thread.join(300)
    return outcome


def run_sigterm(cluster: Cluster, storage: str, run_name: str, epochs: int, record: dict) -> dict:
    prepare(cluster, 1)  # the workers need the spot node too
    known = alive_nodes()
    spot = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--block",
                             f"--address={cluster.gcs_address}", "--num-cpus=1",
                             f"--object-store-memory={NODE_ARGS['object_store_memory']}",
                             "--disable-usage-stats"], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spot_id = None
    try:
        wait_for(lambda: len(alive_nodes()) == len(known) + 1, 60, "the spot node to join")
        spot_id = (alive_nodes() - known).pop()
        outcome: dict = {}
        hold = Path(storage) / f"{run_name}.hold"
        thread = fit_in_thread(storage, run_name, epochs, outcome, hold)
        events_file = Path(storage) / run_name / "events.jsonl"
        sigterm_spot_node(cluster, events_file, record, spot, spot_id)
        wait_for(lambda: '"preempted"' in events_file.read_text(), 120, "the run to stop for the drain")
        hold.unlink()
        thread.join(300)
        return outcome
    finally:
        if spot.poll() is None:
            spot.send_signal(signal.SIGTERM)
            try:
                spot.wait(60)
            except subprocess.TimeoutExpired:
                spot.kill()
        if spot_id is not None:  # gone from the cluster before the next scenario counts its nodes
            wait_for(lambda: spot_id not in alive_nodes(), 60, "the spot node to leave the cluster")


def run_reference(cluster: Cluster, storage: str, run_name: str, epochs: int, record: dict) -> dict:
    """The same run on the same cluster, which nothing disturbs (no hold file: steps are not paced)."""
    prepare(cluster, 2, at_least=True)  # the run's two workers, on nodes the scenarios before left
    return {"history": workloads.drainable_trainer(storage, run_name).fit(epochs=epochs, verbose=0)}


SCENARIOS = {"sigterm": run_sigterm, "drain": run_drain, "reference": run_reference}


def run_scenario(cluster: Cluster, mode: str, storage: str, run_name: str, epochs: int, record: dict) -> None:
    outcome = SCENARIOS[mode](cluster, storage, run_name, epochs, record)
    if "error" in outcome:
        raise outcome["error"]
    if "history" not in outcome:
        raise TimeoutError("the fit did not end within 300 s")
    save_result(outcome["history"], Path(storage) / f"{run_name}-result.pt")
    (Path(storage) / f"{run_name}-cluster.json").write_text(json.dumps(record))


def main(modes: list[str], storage: str, run_name: str, epochs: int) -> int:
    unknown = [mode for mode in modes if mode not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")
        return 2
    cluster = None
    status = 0
    try:
        for mode in modes:
            folder = Path(storage) / mode if len(modes) > 1 else Path(storage)
            folder.mkdir(parents=True, exist_ok=True)
            record: dict = {"drained": [], "added": [], "workers_before": []}
            result, interrupted = {"ok": True}, False
            try:
                if cluster is None:
                    cluster = start_cluster()
                    log("cluster started")
                log(f"scenario {mode}")
                run_scenario(cluster, mode, str(folder), run_name, epochs, record)
                log(f"scenario {mode} succeeded")
            except BaseException as exc:
                error = traceback.format_exc()
                print(f"scenario {mode} failed:\n{error}\n{json.dumps(record)}", flush=True)
                result = {"ok": False, "error": error, "record": record}
                status, interrupted = 1, not isinstance(exc, Exception)  # e.g. SIGINT from the test
                if cluster is not None:  # whatever it left behind: the next scenario gets a fresh cluster
                    shutdown(cluster)
                    cluster = None
            (folder / f"{run_name}-outcome.json").write_text(json.dumps(result))
            if interrupted:
                return 130
        return status
    finally:
        if cluster is not None:
            shutdown(cluster)


def shutdown(cluster: Cluster) -> None:
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4])))
