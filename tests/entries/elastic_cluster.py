"""An elastic run (``num_workers=(1, 2)``) on a local multi-node Ray cluster that loses a node and gets one back (tests only).

Usage: ``python elastic_cluster.py FOLDER EPOCHS``, with ``tests/`` on PYTHONPATH. Starts a
``ray.cluster_utils.Cluster`` (a head without CPUs, then two nodes with 1 CPU and 1 ``slot`` each; a
worker needs both, so no node can host two) and fits ``workloads_elastic.trainer`` on it in a thread:

1. once the run has trained a few steps, the node of a worker that does not host the coordinator
   is removed (its raylet killed: a node crash); no node can host its replacement, so after
   ``placement_timeout_s`` the run goes on with one worker (a ``resized`` event);
2. once that attempt has ended an epoch, a new node with a ``slot`` is added: at the next epoch end
   the run stops with an emergency backup and goes on with two workers again.

Then, on the same cluster, it fits the uninterrupted two-worker run and an elastic run that loses
nothing (two epochs). Writes ``FOLDER/outcome.json`` (``{"ok": true}``, or false with the error and the
scenario's log), and on success ``FOLDER/result.pt``, ``reference.pt`` and ``whole.pt`` (each a History
and the final parameters). Every trained sample is logged under ``FOLDER/seen/`` (see
tests/workloads_elastic.py). Exits 0 on success, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from pathlib import Path

import ray

import workloads_elastic
from scenario_tools import events, log, save_result, start_cluster, wait_for

NODE_ARGS = {"num_cpus": 1, "resources": {"slot": 1}, "object_store_memory": 80 * 2**20}


def actor_nodes(name: str) -> set[str]:
    from ray._private import state

    return {a["Address"]["NodeID"] for a in state.actors().values()
            if a["ActorClassName"] == name and a["State"] == "ALIVE"}


def main(folder: Path, epochs: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "seen").mkdir(exist_ok=True)
    hold = folder / "hold"
    hold.touch()
    record: dict = {"removed": None, "added": None}
    cluster = start_cluster(health_check_period_ms=1000, health_check_failure_threshold=3)
    try:
        nodes = {cluster.add_node(**NODE_ARGS) for _ in range(2)}
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING")
        log("cluster started")
        outcome: dict = {}

        def fit() -> None:
            try:
                outcome["history"] = workloads_elastic.trainer(
                    str(folder), "elastic", folder=str(folder / "seen"), hold=str(hold),
                    resources_per_worker={"CPU": 1, "slot": 1}).fit(epochs=epochs, verbose=0)
            except BaseException as exc:  # noqa: BLE001 - reported in outcome.json
                outcome["error"] = exc

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        events_file = folder / "elastic" / "events.jsonl"
        wait_for(lambda: any(e["type"] == "backup_committed" for e in events(events_file)), 180,
                 "a committed backup in attempt 1")
        workers, coordinator = actor_nodes("TrainWorker"), actor_nodes("Coordinator")
        victim = next(n for n in nodes if n.node_id in workers - coordinator)
        log(f"removing node {victim.node_id} (workers on {sorted(workers)}, coordinator on {sorted(coordinator)})")
        record["removed"] = victim.node_id
        cluster.remove_node(victim, allow_graceful=False)
        wait_for(lambda: any(e["type"] == "resized" for e in events(events_file)), 180, "the run to shrink")
        shrunk = next(e for e in events(events_file) if e["type"] == "resized")["attempt"]
        log(f"shrunk in attempt {shrunk}")
        wait_for(lambda: any(e["type"] == "epoch_end" and e["attempt"] == shrunk for e in events(events_file)), 180,
                 "an epoch on one worker")
        record["added"] = cluster.add_node(**NODE_ARGS).node_id
        log(f"added node {record['added']}")
        wait_for(lambda: sum(e["type"] == "resized" for e in events(events_file)) >= 2, 180, "the run to grow back")
        log("grown back")
        hold.unlink()
        thread.join(300)
        if "error" in outcome:
            raise outcome["error"]
        if "history" not in outcome:
            raise TimeoutError("the fit did not end within 300 s")
        save_result(outcome["history"], folder / "result.pt", record=record)
        # on the same cluster (two nodes again), what the tests compare the elastic run with: the
        # uninterrupted two-worker run, and an elastic run that loses nothing (two epochs)
        save_result(workloads_elastic.trainer(str(folder), "reference", num_workers=2, placement_timeout_s=120).fit(
            epochs=epochs, verbose=0), folder / "reference.pt")
        save_result(workloads_elastic.trainer(str(folder), "whole", placement_timeout_s=120).fit(
            epochs=2, verbose=0), folder / "whole.pt")
        log("references trained")
        (folder / "outcome.json").write_text(json.dumps({"ok": True, "record": record}))
        log("done")
        return 0
    except BaseException:  # noqa: BLE001 - reported to the test
        error = traceback.format_exc()
        print(error, flush=True)
        (folder / "outcome.json").write_text(json.dumps({"ok": False, "error": error, "record": record}))
        return 1
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))
