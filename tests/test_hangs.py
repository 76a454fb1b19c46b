"""The coordinator is watched like the ranks: a callback that blocks is a HangError naming it, the
coordinator's death a retried failure.

Fast tests drive the coordinator's actor class in-process (asyncio, no Ray) and the driver's hang
verdict on set values; two real fits prove the wiring: a blocking ``on_epoch_end`` and a
coordinator process that exits once.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import replace

import pytest

import workloads
from orchestrator import Trainer, callbacks
from orchestrator.cluster.coordinator import Coordinator, CoordinatorBusy
from orchestrator.cluster.specs import CoordinatorSpec
from orchestrator.control.failures import COORDINATOR, AttemptFailed
from orchestrator.control.states import FitOutcome
from orchestrator.control.watch import Relay, coordinator_hang
from orchestrator.decisions import Report, ReportKind
from orchestrator.errors import HangError
from orchestrator.storage.fs import StorageSpec
from orchestrator.storage.run_files import read_events


def report(kind: ReportKind, **fields) -> Report:
    return Report(kind, learning_rate=0.1, steps_per_epoch=4, **fields)


async def _blocked_epoch_end(hook_blocks: threading.Event, release: threading.Event) -> tuple[list, list]:
    coordinator = Coordinator()
    order: list[str] = []

    def on_epoch_end(epoch, logs):
        order.append("first")
        hook_blocks.set()
        release.wait(10)

    coordinator.setup(CoordinatorSpec(world_size=2, params={"epochs": 1}, callbacks=[
        callbacks.LambdaCallback(on_epoch_end=on_epoch_end),
        callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: order.append("second"))]))
    await coordinator.sync({0: report(ReportKind.TRAIN_BEGIN)})  # rank 0, for the two ranks of its group
    ranks = [asyncio.ensure_future(coordinator.sync({0: report(ReportKind.EPOCH_END, epoch=0)}))]
    polls = []
    while len(polls) < 3:
        await asyncio.sleep(0.05)
        if hook_blocks.is_set():
            polls.append(coordinator.poll())  # answers while the hook blocks the coordinator's thread
    coordinator.progress(0, 3, {"loss": 1.0})  # queued behind the hook, in order
    release.set()
    decisions = await asyncio.gather(*ranks)
    await asyncio.sleep(0.05)
    polls.append(coordinator.poll())
    return polls, [order, decisions]


def test_a_blocking_callback_leaves_the_coordinators_poll_answering_with_the_callback_hook_and_seconds():
    polls, (order, decisions) = asyncio.run(_blocked_epoch_end(threading.Event(), threading.Event()))
    busy = [p.busy for p in polls[:3]]
    assert all(b is not None and (b.callback, b.hook) == ("LambdaCallback", "on_epoch_end") for b in busy)
    assert busy[0].seconds <= busy[1].seconds <= busy[2].seconds
    assert "epoch_end sync point (epoch 0" in busy[0].task
    assert "test_hangs.py" in busy[0].where and "on_epoch_end" in busy[0].where
    assert all(p.ages == {0: 0.0, 1: 0.0} for p in polls[:3])  # every rank waits for the decisions: alive
    # callbacks still run one at a time and in order; what came meanwhile waits its turn
    assert order == ["first", "second"] and decisions == [[]]
    assert polls[-1].busy is None
    assert [e["type"] for e in polls[-1].events] == ["epoch_end", "progress"]


def relay_with(busy: CoordinatorBusy | None, unanswered_s: float = 0.0) -> Relay:
    relay = Relay(coordinator=None, driver=None, outcome=FitOutcome(), events=None, attempt=3,
                  where={"node": "10.0.0.9", "node_id": "n9", "pid": 42})
    relay.busy = busy
    if unanswered_s:
        relay._pending, relay._sent = object(), time.monotonic() - unanswered_s
    return relay


HOOK = CoordinatorBusy("the epoch_end sync point (epoch 0, step -1)", "Sleepy", "on_epoch_end", 0.0, "cb.py:3 in f")


@pytest.mark.parametrize("busy,unanswered_s,expected", [
    (None, 0.0, None),
    (replace(HOOK, seconds=9.0), 0.0, None),
    (replace(HOOK, seconds=11.0), 0.0, "callback"),
    (replace(HOOK, seconds=6.0), 5.0, "callback"),  # it still ran when no answer came
    (None, 11.0, "unanswered"),
    (CoordinatorBusy("rank 0's backup files of backup/step-9 (commit)", None, None, 11.0), 0.0, "task"),
])
def test_the_coordinator_hang_verdict_names_a_blocking_callback_unretried_and_anything_else_as_a_failure(
        busy, unanswered_s, expected):
    verdict = coordinator_hang(relay_with(busy, unanswered_s), hang_timeout_s=10)
    if expected is None:
        assert verdict is None
    elif expected == "callback":
        assert isinstance(verdict, HangError) and not isinstance(verdict, AttemptFailed)
        assert "callback Sleepy has been running on_epoch_end on the coordinator for 11s" in str(verdict)
        assert "hang_timeout_s=10" in str(verdict) and "cb.py:3 in f" in str(verdict)
        assert "Not retried" in str(verdict)
    else:
        assert isinstance(verdict, AttemptFailed) and isinstance(verdict.error, HangError)
        record = verdict.record
        assert (record.attempt, record.rank, record.node, record.role) == (3, None, "10.0.0.9", COORDINATOR)
        assert record.cause.startswith("the coordinator (node 10.0.0.9, pid 42)")
        said = "did not answer poll() for 11s" if expected == "unanswered" else "made no progress for 11s on rank 0's"
        assert said in record.cause


# -- two real fits ----------------------------------------------------------------------------------

def make(tmp_path, run_name: str, callback, **overrides) -> Trainer:
    kwargs = dict(model=workloads.tiny_model, optimizer=workloads.sgd, loss=workloads.cross_entropy,
                  data=workloads.train_only_data, batch_size=8, num_workers=2, seed=0, storage=str(tmp_path),
                  run_name=run_name, callbacks=[callbacks.BackupAndRestore(save_freq=2), callback])
    kwargs.update(overrides)
    return Trainer(**kwargs)


@pytest.mark.timeout(120)
def test_a_callback_that_blocks_in_on_epoch_end_fails_fit_with_a_hang_error_naming_it_not_retried(ray_cluster,
                                                                                                  tmp_path):
    sleepy = callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: time.sleep(600))
    start = time.monotonic()
    with pytest.raises(HangError, match=r"callback LambdaCallback has been running on_epoch_end .* for \d+s "
                                        r"\(hang_timeout_s=5\)") as info:
        make(tmp_path, "sleepy", sleepy, hang_timeout_s=5, max_failures=1, warm_standbys=False).fit(
            epochs=2, verbose=0)
    assert time.monotonic() - start < 60
    assert "test_hangs.py:" in str(info.value) and " in <lambda>" in str(info.value)  # where it blocks
    events = read_events(StorageSpec(str(tmp_path), "sleepy").open())
    assert {e["attempt"] for e in events} == {1}  # not retried, whatever max_failures allows
    assert not any(e["type"] == "worker_failed" for e in events)
    assert events[-1]["type"] == "failed" and events[-1]["error"].startswith("HangError: callback LambdaCallback")
    # ray_cluster checks that every actor and the placement group are gone


def exit_once(flag: str, backup_dir: str):
    """An ``on_epoch_end`` that ends the coordinator's process at the first epoch end after a backup
    committed (commits run on the coordinator's thread, so none can come between the check and the
    exit), writing the committed steps it saw into ``flag + ".seen"``; only while ``flag`` exists."""
    import glob
    import json

    def on_epoch_end(epoch, logs):
        steps = sorted(int(p.split("step-")[-1].split(os.sep)[0])
                       for p in glob.glob(os.path.join(backup_dir, "step-*", "manifest.json")))
        if steps and os.path.exists(flag):
            with open(flag + ".seen", "w") as f:
                json.dump(steps, f)
            os.remove(flag)
            os._exit(1)  # the coordinator's process ends, as if killed
    return on_epoch_end


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:skipping backup")  # a save in flight when the coordinator died never commits
def test_the_coordinator_dying_mid_run_is_a_failure_restarted_from_the_newest_backup(ray_cluster, tmp_path):
    flag = tmp_path / "armed"
    flag.write_text("x")
    dies = callbacks.LambdaCallback(on_epoch_end=exit_once(str(flag), str(tmp_path / "orphaned" / "backup")))
    history = make(tmp_path, "orphaned", dies, max_failures=1).fit(epochs=3, verbose=0)
    assert not flag.exists() and history.epoch == [0, 1, 2]
    events = read_events(StorageSpec(str(tmp_path), "orphaned").open())
    failed = [e for e in events if e["type"] == "worker_failed"]
    assert len(failed) == 1 and failed[0]["attempt"] == 1 and failed[0]["rank"] is None
    assert failed[0]["cause"].startswith("the coordinator (node ") and " died: " in failed[0]["cause"]
    # the newest backup committed when it died (its last events may have died with it: storage says)
    newest = max(json.loads((tmp_path / "armed.seen").read_text()))
    restored = [e for e in events if e["type"] == "restored"]
    assert [(e["attempt"], e["step"]) for e in restored] == [(2, newest)]
    assert events[-1]["type"] == "finished" and events[-1]["attempt"] == 2
