"""Scenarios that run in a subprocess of their own from the start of the test session.

A scenario on a cluster of its own (several Ray nodes in a subprocess) mostly waits: for nodes to
start, for drain deadlines, for restarts. The scenarios run one after another, in the order their
tests come, from the end of collection: beside the rest of the suite instead of after it (never
two at once: several Ray clusters starting together on 2 cores made a raylet time out). Each test
then only reads what its scenario left; one whose scenario has not started yet starts it. A
scenario that is not collected (``-k``, a single file) is never started. A scenario that starts no
Ray cluster may run ``beside_chain`` instead: it starts at once, beside the chain (the inductor
build: CPU only, at the lowest priority, so that it takes what the suite leaves idle).

Example (in a test module)::

    SCENARIO = background.Scenario("drain", [sys.executable, "entries/drain_cluster.py", ...])
    # conftest starts every collected module's SCENARIO; a fixture calls SCENARIO.wait(timeout)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def clean_env() -> dict[str, str]:
    """The environment of a subprocess that starts a Ray cluster of its own (not the session's)."""
    from orchestrator.control.local_ray import ENVIRONMENT  # the background-CPU settings of fit's own Ray

    env = {**ENVIRONMENT, **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               OMP_NUM_THREADS="1")
    return env


@dataclass
class Scenario:
    """A command started once per session; ``folder`` is its own scratch directory (an argument of it).

    Args:
        name: Names the scratch folder and the log.
        argv: The command, with ``{folder}`` where the scratch folder goes.
        beside_chain: Start at the end of collection, beside the chain, not in turn (a scenario
            that starts no Ray cluster). Defaults to ``False``.
    """

    name: str
    argv: list[str]
    beside_chain: bool = False
    folder: Path | None = None
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    _log: Path | None = field(default=None, repr=False)

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self) -> None:
        with self._lock:  # the chain's thread or a test that needs it now: once
            if self.proc is not None:
                return
            self.folder = Path(tempfile.mkdtemp(prefix=f"bg-{self.name}-"))
            self._log = self.folder / "output.log"
            with self._log.open("w") as out:
                self.proc = subprocess.Popen([a.replace("{folder}", str(self.folder)) for a in self.argv],
                                             env=clean_env(), stdout=out, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout: float) -> int:
        """Its exit code, once it has ended (started now if it was not); SIGINT, then kill, past ``timeout``."""
        self.start()
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        return self.proc.returncode

    def output(self) -> str:
        return self._log.read_text()[-8000:] if self._log is not None and self._log.exists() else ""

    def remove(self) -> None:
        """Delete the scratch folder (at the end of the session)."""
        self.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def stop(self) -> None:
        """SIGINT first (the scenario shuts its cluster down on the way out), then kill."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def collected_scenarios(items) -> list[Scenario]:
    """The ``SCENARIO`` of every module that has a collected test, once each."""
    seen: dict[int, Scenario] = {}
    for item in items:
        scenario = getattr(item.module, "SCENARIO", None) if hasattr(item, "module") else None
        if isinstance(scenario, Scenario):
            seen[id(scenario)] = scenario
    return list(seen.values())


def run_in_turn(scenarios: list[Scenario], stopping: threading.Event) -> threading.Thread:
    """Start ``scenarios`` one after another (each when the one before has ended), in a daemon thread;
    those ``beside_chain`` at once."""
    for scenario in scenarios:
        if scenario.beside_chain:
            scenario.start()

    def chain() -> None:
        for scenario in (s for s in scenarios if not s.beside_chain):
            if stopping.is_set():
                return
            scenario.start()
            assert scenario.proc is not None
            while scenario.proc.poll() is None and not stopping.wait(0.5):
                pass

    thread = threading.Thread(target=chain, name="background-scenarios", daemon=True)
    thread.start()
    return thread
