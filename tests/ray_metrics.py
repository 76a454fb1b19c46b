"""Ray's Prometheus export of this node, read as the tests read it: :func:`scrape`, and :class:`ExportWatch`,
which scrapes in a thread from the moment a run ends until the run's final values are there.

Ray drops a gauge series that nothing set for about two export intervals, and exports every few
seconds: a test that reads a finished run's gauges must read them within seconds of the run's end.
The series of one hand-over do not reach the export together: a counter's last increments came a few
intervals after the gauges set with them (seen once: the final wall time exported while the steps
counter still showed the first attempt's 9 steps), and a gauge after another gauge (seen once: the final
wall time exported beside a global step of 9, the first attempt's). An ``ExportWatch`` started right
after the fit keeps each series as exported once it held its final value, for a test that runs later.

Example::

    watch = ExportWatch.start(ray, "faulty")  # right after the run named "faulty" ended in this process
    seen = watch.result(timeout=180)  # {metric: {tags: value}}, as exported once its values were final
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from typing import Any

from orchestrator.control.metrics_export import METRICS, metrics_of


def scrape(ray: Any) -> dict[str, dict[str, float]]:
    """``ray_orchestrator_*`` samples of the node's Prometheus export: name -> {run tag (+ other tags): value}."""
    port = ray._private.worker.global_worker.node.metrics_export_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[str, float]] = {}
    for match in re.finditer(r"^(ray_orchestrator_\w+)\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        key = ",".join(f"{k}={labels[k]}" for k in ("run", "phase", "cause", "state", "le") if k in labels)
        out.setdefault(match.group(1), {})[key] = float(match.group(3))
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


class ExportWatch:
    """Scrapes every 2 s, for up to ``timeout`` seconds, until every series the driver set for ``run_name``
    (its counters and gauges, but the controller's state seconds, counted until the driver's very end) has
    been exported with its final value; each is kept as it was then (Ray may drop a gauge since), every
    other series as last scraped.

    Args:
        ray: The ``ray`` module of this driver.
        run_name: A run this process fitted, and has finished.
        timeout: Seconds before it stops trying (``result`` then returns what it saw last).
    """

    def __init__(self, ray: Any, run_name: str, timeout: float = 180.0) -> None:
        self.run_name = run_name
        self.final = metrics_of(run_name).snapshot()  # what this driver counted, handed to Ray at the end
        self.seen: dict[str, dict[str, float]] = {}
        self._thread = threading.Thread(target=self._watch, args=(ray, timeout), name="export-watch", daemon=True)

    @classmethod
    def start(cls, ray: Any, run_name: str, timeout: float = 180.0) -> "ExportWatch":
        watch = cls(ray, run_name, timeout)
        watch._thread.start()
        return watch

    def _watch(self, ray: Any, timeout: float) -> None:
        deadline, pending, kept = time.monotonic() + timeout, self._expected(), set()
        while pending and time.monotonic() < deadline:
            try:
                seen = scrape(ray)
            except OSError:  # the agent's HTTP server busy or starting: the next pass asks again
                time.sleep(2)
                continue
            for name, series in seen.items():
                for label, value in series.items():
                    key = (name, label)
                    if key in kept:
                        continue
                    self.seen.setdefault(name, {})[label] = value
                    if key in pending and _close(value, pending[key]):
                        del pending[key]
                        kept.add(key)
            if pending:
                time.sleep(2)

    def _expected(self) -> dict[tuple[str, str], float]:
        """(exported name, labels) -> final value, for every series this driver set for the run (but the
        controller's state seconds, which it counts until its very end)."""
        expected = {}
        for key, value in self.final.items():
            name, _, tag = key.partition(":")
            spec = METRICS.get(name)
            if spec is None or name == "orchestrator_controller_state_seconds":
                continue
            label = f"run={self.run_name}" + (f",{spec.tags[0]}={tag}" if tag else "")
            expected[(f"ray_{name}" + ("_total" if spec.kind == "counter" else ""), label)] = value
        return expected

    def result(self, timeout: float) -> dict[str, dict[str, float]]:
        """What the export held once the run's values were final (or last, if they never were)."""
        self._thread.join(timeout)
        return self.seen
