"""`ray job submit` for real, as a background scenario (tests only): submit, `ray job stop`, resubmit.

Usage: ``python ray_job_scenario.py FOLDER``, with ``tests/`` on PYTHONPATH (tests/background.py).
Starts a Ray head on 127.0.0.1 with its own ports and temp dir (``ray start --head --block`` in a
session of its own; started again, at most HEAD_STARTS times, if it exits while starting), waits for its
job agent, submits ``orchestrator run tests/entries/preemptible.py``
with the repository as the runtime_env working_dir, stops it with ``ray job stop`` once it has
committed a backup, copies the run folder as the stop left it, resubmits and waits for the end.
With Ray's token authentication on, `ray start` and the `ray job` client on the same machine share
the token file under ~/.ray; the client sends it with ``RAY_AUTH_MODE=token``.

It asserts nothing: it writes what it saw to ``FOLDER/outcome.json`` (statuses, exit codes, the job
logs' tails, paths; see :func:`new_outcome`) for tests/test_ray_job.py to check, and prints progress
lines. The run is stored under ``FOLDER/store/preemptible``, its copy after the stop under
``FOLDER/after_stop/preemptible``. On every way out (SIGINT and SIGTERM included) the head's process
group and every process using its temp dir are killed; the outcome records any that survived.
Exits 0 when every stage ran, 1 when one could not (``outcome["error"]`` says why), 130 on SIGINT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from s3_server import free_port
from scenario_tools import START, log

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent
RUNTIME_ENV = {"working_dir": str(ROOT), "excludes": [".venv", ".ci", ".git", "*.egg-info"],
               "env_vars": {"PYTHONPATH": "tests"}}
ENTRY = ["--", "python", "-m", "orchestrator", "run", "tests/entries/preemptible.py", "--epochs", "3"]
RUN_NAME = "preemptible"
#: Every stage but the final log fetches and the shutdown fits in this (the per-step limits are the
#: test's old ones; they add up to far more, but together they used to get the test's 420 s).
BUDGET_S = 600.0
#: The log fetches at the end (two) get this each, on top of BUDGET_S, so a timed-out run still has them.
LOGS_TIMEOUT_S = 30.0
TERMINAL = ("STOPPED", "FAILED", "SUCCEEDED")
#: Starts of the head before the scenario gives up: a head that exits while it starts (Ray's own start
#: failing on a loaded machine, e.g. a port taken between choosing it and binding it) is started again.
HEAD_STARTS = 3


class OutOfTime(Exception):
    """A stage did not end in time (its own limit or the scenario's budget)."""


def remaining() -> float:
    return START + BUDGET_S - time.monotonic()


def base_env() -> dict[str, str]:
    """The scenario's environment without the PYTHONPATH entries tests/background.py adds.

    A real cluster does not have the repository on its PYTHONPATH: the runtime_env working_dir must
    bring it (and ``PYTHONPATH=tests`` in it, relative to the working dir, the test entry's imports).
    """
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    added = {str(ROOT), str(ROOT / "tests"), ""}
    kept = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p not in added]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


class Head:
    """A ``ray start --head --block`` on 127.0.0.1 in a session of its own, its own ports and temp dir."""

    def __init__(self, folder: Path) -> None:
        self.temp = Path("/tmp") / f"ojob{os.getpid()}"  # short: Ray's socket paths have a length limit
        self.log_path = folder / "head.log"
        self.proc: subprocess.Popen | None = None
        self.address = ""
        self.client: Any = None  # Ray's job client for it (see client())

    def start(self) -> None:
        port, dashboard = free_port(), free_port()
        self.client = None  # a client of a head started before would ask its old address
        env = base_env()
        env.pop("RAY_AUTH_MODE", None)  # as `ray start` on a node: token auth since ~/.ray/auth_token exists
        env["RAY_JOB_STOP_WAIT_TIME_S"] = "90"  # the supervisor waits this long after SIGTERM
        self.address = f"http://127.0.0.1:{dashboard}"
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                 "--port", str(port), "--num-cpus", "2", "--temp-dir", str(self.temp),
                 "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(dashboard), "--disable-usage-stats",
                 # its own agent ports: the test session's Ray already holds the defaults
                 "--dashboard-agent-listen-port", str(free_port()),
                 "--dashboard-agent-grpc-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()),
                 "--metrics-export-port", str(free_port()),
                 "--ray-client-server-port", str(free_port())],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        log(f"head started (pid {self.proc.pid}, {self.address}, temp dir {self.temp})")

    def stop(self) -> list[str]:
        """SIGTERM, then SIGKILL, to the head's process group, then SIGKILL to anything left using its
        temp dir (``ray stop`` would also stop the test session's own Ray instance).

        Nothing of the head outlives the scenario, so a graceful shutdown has nothing to save: a second's
        wait (it took over five). Returns the processes still using the temp dir afterwards
        (``"pid cmdline"``; none, normally).
        """
        if self.proc is not None:
            for sig, wait in ((signal.SIGTERM, 1), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for _ in range(10):  # a dying raylet may still start a worker: sweep until none is left
            pids = processes_using(self.temp)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        left = [f"{pid} {describe(pid)}" for pid in processes_using(self.temp)]
        shutil.rmtree(self.temp, ignore_errors=True)
        log(f"head stopped; {len(left)} process(es) left using {self.temp}")
        return left


def processes_using(temp: Path) -> list[int]:
    """Processes whose command line names ``temp`` (or a path under it) or whose cwd is under it."""
    named = re.compile(re.escape(str(temp)) + r"(?![\w.-])")  # /tmp/ojob12 must not match /tmp/ojob123
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if named.search((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")):
                found.append(int(entry.name))
                continue
        except OSError:  # gone
            continue
        try:
            if named.match(os.readlink(entry / "cwd")):  # e.g. a job's driver, in its working dir copy
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            pass
    return found


def describe(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


def job(head: Head, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A ``ray job`` command against the head (``RAY_AUTH_MODE=token``: the client then sends ~/.ray/auth_token)."""
    if remaining() <= 0:
        raise OutOfTime(f"the scenario's budget of {BUDGET_S:.0f} s is spent (before `ray job {args[0]}`)")
    timeout = min(timeout, remaining())
    env = base_env()
    env["RAY_AUTH_MODE"] = "token"
    return subprocess.run([str(BIN / "ray"), "job", *args[:1], "--address", head.address, *args[1:]], env=env,
                          capture_output=True, text=True, timeout=timeout)


def client(head: Head) -> Any:
    """Ray's job client (the Python SDK the ``ray job`` commands use) for the head, in this process: the
    scenario's polls and log fetches cost no command start each (a ``ray job`` command imports Ray, about
    a second of CPU). Submissions and the stop stay commands, as a user types them."""
    if head.client is None:  # made once (it asks the head for its version); not while the head is not up
        os.environ["RAY_AUTH_MODE"] = "token"  # this process's: the client then sends ~/.ray/auth_token
        from ray.job_submission import JobSubmissionClient

        head.client = JobSubmissionClient(head.address)
    return head.client


def within(timeout: float, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or OutOfTime after ``timeout`` seconds (the client's requests have no timeout of their own:
    the call goes on in a daemon thread, which the scenario's exit ends)."""
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise OutOfTime(f"{what} took more than {timeout:.0f} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def status(head: Head, submission_id: str) -> str:
    return str(within(60, "a job status request", lambda: client(head).get_job_status(submission_id).value))


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or remaining() <= 0:
            raise OutOfTime(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def new_outcome(folder: Path, head: Head) -> dict[str, Any]:
    """What the scenario reports; a stage it did not reach leaves its fields ``None``."""
    submission = {"id": None, "submit_rc": None, "submit_output": None, "status": None, "logs_tail": None}
    return {
        "completed": False,  # every stage ran (what they saw is for the test to judge)
        "stage": "start",  # the last stage begun
        "error": None,  # the traceback of the stage that could not go on
        "leftover_processes": None,  # still using the head's temp dir after its shutdown
        "temp_dir": str(head.temp), "head_log": str(head.log_path),
        "storage": str(folder / "store"), "after_stop_storage": str(folder / "after_stop"),
        "run_name": RUN_NAME,
        "head_ready": False, "head_ready_output": None,
        "head_failed_starts": [],  # a start that exited before taking submissions: why, with its log's tail
        "first": dict(submission, backup_committed=False, stop_rc=None, stop_output=None),
        "second": dict(submission),
    }


def has_backup(events_file: Path) -> bool:
    return events_file.exists() and "backup_committed" in events_file.read_text()


def run(folder: Path, head: Head, outcome: dict[str, Any]) -> None:
    """The stages, in order; each records what it saw in ``outcome`` before the next one starts."""
    first, second = outcome["first"], outcome["second"]
    outcome["stage"] = "head"
    for attempt in range(1, HEAD_STARTS + 1):
        head.start()
        if head_ready(head, outcome):
            break
        failed = f"the head exited with {head.proc.returncode} while starting (start {attempt} of {HEAD_STARTS})"
        outcome["head_failed_starts"].append(f"{failed}; its log's tail:\n{tail(head.log_path)}")
        log(failed)
        head.stop()
    else:
        raise RuntimeError("\n\n".join(outcome["head_failed_starts"]))
    outcome["head_ready"] = True
    log("the head takes job submissions")

    storage = Path(outcome["storage"])
    storage.mkdir()
    runtime_env = json.loads(json.dumps(RUNTIME_ENV))
    runtime_env["env_vars"]["ORCHESTRATOR_TEST_STORAGE"] = str(storage)
    slow = folder / "slow"  # steps take 0.5 s until the first job is stopped: the stop lands mid-training
    slow.touch()
    runtime_env["env_vars"]["ORCHESTRATOR_TEST_SLOW_FILE"] = str(slow)

    outcome["stage"] = "first submission"
    first["id"] = f"preempt-a-{os.getpid()}"
    submitted = job(head, "submit", "--no-wait", "--submission-id", first["id"], "--runtime-env-json",
                    json.dumps(runtime_env), *ENTRY)
    first["submit_rc"], first["submit_output"] = submitted.returncode, submitted.stderr[-3000:]
    log(f"first submission: exit code {submitted.returncode}")
    if submitted.returncode != 0:
        raise RuntimeError(f"`ray job submit` exited with {submitted.returncode}")
    events_file = storage / RUN_NAME / "events.jsonl"
    wait_until(lambda: has_backup(events_file), 180, "the first job's first committed backup")
    first["backup_committed"] = True
    log("the first job committed a backup: `ray job stop`")

    outcome["stage"] = "stop"
    stopped = job(head, "stop", first["id"], timeout=150)
    first["stop_rc"], first["stop_output"] = stopped.returncode, (stopped.stdout + stopped.stderr)[-3000:]
    log(f"`ray job stop`: exit code {stopped.returncode}")

    def ended() -> bool:
        first["status"] = status(head, first["id"])
        return first["status"] in TERMINAL

    wait_until(ended, 120, "the first job to end after `ray job stop`")
    log(f"the first job ended: {first['status']}")
    shutil.copytree(storage / RUN_NAME, Path(outcome["after_stop_storage"]) / RUN_NAME)
    slow.unlink()

    outcome["stage"] = "second submission"
    second["id"] = f"preempt-b-{os.getpid()}"
    done = job(head, "submit", "--submission-id", second["id"], "--runtime-env-json", json.dumps(runtime_env),
               *ENTRY)
    second["submit_rc"], second["submit_output"] = done.returncode, done.stdout[-3000:]
    second["status"] = status(head, second["id"])
    log(f"second submission: exit code {done.returncode}, {second['status']}")
    outcome["completed"], outcome["stage"] = True, "done"


def head_ready(head: Head, outcome: dict[str, Any]) -> bool:
    """Wait until the head's job agent takes a submission (True), or the head exits (False)."""
    deadline = time.monotonic() + 120
    while True:  # the dashboard answers before the head's job agent can take submissions
        try:
            probe = within(120, "a submission", lambda: client(head).submit_job(entrypoint="true"))
            outcome["head_ready_output"] = probe
            return True
        except Exception as exc:  # noqa: BLE001 - not ready yet (recorded: the test shows it if it never is)
            outcome["head_ready_output"] = f"{type(exc).__name__}: {exc}"[-3000:]
        if head.proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise OutOfTime("the head's job agent took no submission within 120 s")
        time.sleep(1)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"({exc})"


def fetch_logs(head: Head, outcome: dict[str, Any]) -> None:
    """The tail of each submitted job's logs (for failure messages), each within LOGS_TIMEOUT_S."""
    if not outcome["head_ready"] or head.proc is None or head.proc.poll() is not None:
        return
    for key in ("first", "second"):
        if outcome[key]["id"] is not None:
            try:
                submission_id = outcome[key]["id"]
                logs = within(LOGS_TIMEOUT_S, "fetching a job's logs", lambda: client(head).get_job_logs(submission_id))
                outcome[key]["logs_tail"] = logs[-3000:]
            except Exception as exc:  # noqa: BLE001 - only for failure messages
                outcome[key]["logs_tail"] = f"(could not fetch the job's logs: {type(exc).__name__}: {exc})"


def raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(folder: Path) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a parent may have left it ignored
        signal.signal(sig, raise_interrupt)
    head = Head(folder)
    outcome = new_outcome(folder, head)
    code = 1
    try:
        run(folder, head, outcome)
        code = 0
    except BaseException as exc:  # KeyboardInterrupt included: SIGINT from the test (Scenario.stop)
        outcome["error"] = f"during stage {outcome['stage']!r}:\n{traceback.format_exc()}"
        print(outcome["error"], flush=True)
        code = 130 if not isinstance(exc, Exception) else 1
    finally:
        interrupted = code == 130
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if not interrupted:
                fetch_logs(head, outcome)
        finally:
            outcome["leftover_processes"] = head.stop()
            tmp = folder / "outcome.json.tmp"
            tmp.write_text(json.dumps(outcome, indent=1))
            tmp.replace(folder / "outcome.json")
            log(f"outcome written; exit code {code}")
    return code


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: ray_job_scenario.py FOLDER")
    sys.exit(main(Path(sys.argv[1])))
