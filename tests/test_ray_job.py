"""`ray job submit` for real: a head node on 127.0.0.1, the CLI as the entrypoint, stop and resubmit.

The head runs in its own temp dir with its own ports; it is stopped in teardown. With Ray's token
authentication on, `ray start` and the `ray job` client on the same machine share the token file
under ~/.ray, so no extra setup is needed here (see docs/deployment.md for remote clients).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.storage.run_files import read_events
from orchestrator.storage.fs import StorageSpec
from s3_server import free_port

pytestmark = pytest.mark.timeout(420)
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUNTIME_ENV = json.dumps({"working_dir": str(ROOT), "excludes": [".venv", ".ci", ".git", "*.egg-info"],
                          "env_vars": {"PYTHONPATH": "tests"}})


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on 127.0.0.1: (dashboard address, env for the `ray job` client).

    It runs with ``--block`` in its own session, so teardown stops exactly its processes (``ray stop``
    would also stop the test session's own Ray instance).
    """
    temp = Path("/tmp") / f"ojob{os.getpid()}"  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    env = _env(RAY_JOB_STOP_WAIT_TIME_S="90")  # the supervisor waits this long after SIGTERM
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "2", "--temp-dir", str(temp),
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dashboard), "--disable-usage-stats",
                             # its own agent ports: the test session's Ray already holds the defaults
                             "--dashboard-agent-listen-port", str(free_port()),
                             "--dashboard-agent-grpc-port", str(free_port()),
                             "--runtime-env-agent-port", str(free_port()),
                             "--metrics-export-port", str(free_port()),
                             "--ray-client-server-port", str(free_port())],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    client = (address, _env(RAY_AUTH_MODE="token"))  # the client then sends ~/.ray/auth_token
    try:
        deadline = time.monotonic() + 120
        while True:  # the dashboard answers before the head's job agent can take submissions
            ready = _job(client, "submit", "--", "true", timeout=120)
            if ready.returncode == 0:
                break
            assert proc.poll() is None and time.monotonic() < deadline, ready.stdout + ready.stderr
            time.sleep(1)
        yield client
    finally:
        _stop_session(proc, temp)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop_session(proc: subprocess.Popen, temp: Path) -> None:
    """SIGTERM, then SIGKILL, to the head's process group and to anything left using its temp dir.

    Nothing of the head outlives the test, so a graceful shutdown has nothing to save: a short wait.
    """
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    subprocess.run(["pkill", "-9", "-f", str(temp)], capture_output=True)


def _job(head, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    address, env = head
    return subprocess.run([str(BIN / "ray"), "job", *args[:1], "--address", address, *args[1:]], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _status(head, submission_id: str) -> str:
    out = _job(head, "status", submission_id).stdout.lower()
    for state in ("succeeded", "failed", "stopped", "running", "pending"):
        if state in out:
            return state.upper()
    return out


def test_a_submitted_cli_run_is_preempted_by_ray_job_stop_and_a_new_submission_resumes_and_finishes(head, tmp_path):
    entry = ["--", "python", "-m", "orchestrator", "run", "tests/entries/preemptible.py", "--epochs", "3"]
    runtime_env = json.loads(RUNTIME_ENV)
    runtime_env["env_vars"]["ORCHESTRATOR_TEST_STORAGE"] = str(tmp_path)
    slow = tmp_path / "slow"  # steps take 0.5 s until the first job is stopped: the stop lands mid-training
    slow.touch()
    runtime_env["env_vars"]["ORCHESTRATOR_TEST_SLOW_FILE"] = str(slow)
    first = f"preempt-a-{os.getpid()}"
    submitted = _job(head, "submit", "--no-wait", "--submission-id", first, "--runtime-env-json",
                     json.dumps(runtime_env), *entry)
    assert submitted.returncode == 0, submitted.stderr
    events_file = tmp_path / "preemptible" / "events.jsonl"
    deadline = time.monotonic() + 180
    while not (events_file.exists() and "backup_committed" in events_file.read_text()):
        assert time.monotonic() < deadline, _job(head, "logs", first).stdout[-3000:]
        time.sleep(0.5)
    assert _job(head, "stop", first, timeout=150).returncode == 0
    deadline = time.monotonic() + 120
    while _status(head, first) not in ("STOPPED", "FAILED", "SUCCEEDED"):
        assert time.monotonic() < deadline
        time.sleep(1)
    events = read_events(StorageSpec(str(tmp_path), "preemptible").open())
    assert any(e["type"] == "preempted" for e in events), [e["type"] for e in events]
    stopped_at = max(e["step"] for e in events if e["type"] == "backup_committed")
    slow.unlink()

    second = f"preempt-b-{os.getpid()}"
    done = _job(head, "submit", "--submission-id", second, "--runtime-env-json", json.dumps(runtime_env), *entry)
    assert done.returncode == 0, done.stdout[-3000:]
    assert _status(head, second) == "SUCCEEDED"
    run = json.loads((tmp_path / "preemptible" / "run.json").read_text())
    assert run["status"] == "finished" and run["world_size"] == 2
    events = read_events(StorageSpec(str(tmp_path), "preemptible").open())
    assert [e for e in events if e["type"] == "restored"][-1]["step"] == stopped_at
    assert sorted(e["epoch"] for e in events if e["type"] == "epoch_end") == [0, 1, 2]  # each epoch once
    assert events[-1]["type"] == "finished"
