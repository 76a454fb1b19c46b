"""Ray's Prometheus export of this node, read as the tests read it: :func:`scrape`, and :class:`ExportWatch`,
which scrapes in a thread from the moment a run ends until the run's final values are there.

Ray drops a gauge series that nothing set for about two export intervals, and exports every few
seconds: a test that reads a finished run's gauges must read them within seconds of the run's end.
A counter's last increments can reach the export a few intervals after the gauges set with them (seen
once: the final wall time exported while the steps counter still showed the first attempt's 9 steps).
An ``ExportWatch`` started right after the fit keeps what it saw for a test that runs later.

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
    """Scrapes every 2 s, for up to ``timeout`` seconds, until the exported wall time of ``run_name`` is
    the driver's final one (the live wall time grows until the run's end is handed over), then on until
    every counter of the run is its final total too, keeping the gauges of the first of those scrapes.

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
        deadline, tag = time.monotonic() + timeout, f"run={self.run_name}"
        wall = self.final["orchestrator_goodput_seconds:wall"]
        gauges_final = False
        while time.monotonic() < deadline:
            try:
                seen = scrape(ray)
            except OSError:  # the agent's HTTP server busy or starting: the next pass asks again
                time.sleep(2)
                continue
            if not gauges_final:
                self.seen = seen
                exported = seen.get("ray_orchestrator_goodput_seconds", {}).get(f"{tag},cause=wall")
                gauges_final = exported is not None and _close(exported, wall)
            else:  # the gauges stay as they were then (Ray may have dropped them since); counters only grow
                self.seen.update({name: series for name, series in seen.items() if name.endswith("_total")})
            if gauges_final and self._counters_final():
                return
            time.sleep(2)

    def _counters_final(self) -> bool:
        """Whether every counter this driver counted for the run is exported with its final total (but
        the controller's state seconds, which the driver counts until its very end)."""
        for key, total in self.final.items():
            name, _, tag = key.partition(":")
            spec = METRICS.get(name)
            if spec is None or spec.kind != "counter" or name == "orchestrator_controller_state_seconds":
                continue
            label = f"run={self.run_name}" + (f",{spec.tags[0]}={tag}" if tag else "")
            exported = self.seen.get(f"ray_{name}_total", {}).get(label)
            if exported is None or not _close(exported, total):
                return False
        return True

    def result(self, timeout: float) -> dict[str, dict[str, float]]:
        """What the export held once the run's values were final (or last, if they never were)."""
        self._thread.join(timeout)
        return self.seen
