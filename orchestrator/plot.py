"""``orchestrator plot``: a run's curves and what happened to it, drawn from its events into a PNG.

One panel per metric (``loss``, ``accuracy``, ...) with its train and validation curves by epoch
(the newest record of each epoch, as ``orchestrator status`` lists them), the learning rate on a
panel of its own, and vertical markers in every panel for restarts, restores, rollbacks,
preemptions, learning-rate changes and the early stop. The title gives the run's goodput
(:mod:`orchestrator.core.goodput`). Drawn with matplotlib's Agg canvas (no display needed);
matplotlib is the optional extra ``orchestrator[plot]``.

Example:

```python
from orchestrator.plot import plot_events
plot_events(read_events(storage), "run.png", title="digits")   # -> (1200, 860): the PNG's size in pixels
```
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from orchestrator.core.events import EventType, event_type
from orchestrator.core.goodput import goodput

__all__ = ["MARKERS", "MissingExtra", "PlotData", "default_size", "plot_data", "plot_events", "render_png"]

INSTALL_HINT = 'pip install "orchestrator[plot]"'
_DPI = 100
_WIDTH = 1200
_PANEL_HEIGHT = 260
_TITLE_HEIGHT = 80


class MissingExtra(ImportError):
    """matplotlib is not installed (the ``orchestrator[plot]`` extra)."""


@dataclass(frozen=True)
class _Marker:
    label: str
    color: str
    style: str
    width: float = 1.2


#: Marker kinds: what is marked, by the type of the events that mark it.
MARKERS: dict[str, _Marker] = {
    EventType.WORKER_FAILED.value: _Marker("restart (failure)", "tab:red", "-", 3.0),  # under a restore's line
    EventType.RESTORED.value: _Marker("restore", "tab:green", "--"),
    EventType.ROLLED_BACK.value: _Marker("rollback", "tab:orange", "-."),
    EventType.PREEMPTED.value: _Marker("preemption", "tab:purple", "-"),
    EventType.NODE_DRAINING.value: _Marker("preemption", "tab:purple", "-"),
    EventType.LR_CHANGED.value: _Marker("LR change", "tab:gray", ":"),
    EventType.EARLY_STOPPING.value: _Marker("early stop", "black", "--"),
}


@dataclass(frozen=True)
class PlotData:
    """What is drawn: per-epoch logs (1-based epoch -> logs), markers and the rates set.

    Args:
        epochs: The newest logs of each epoch, by 1-based epoch (``learning_rate``: the rate the
            epoch trained with).
        markers: Marker kind (a key of :data:`MARKERS`) -> positions on the epoch axis (an event at
            an epoch's end sits on that epoch's point, one inside an epoch half-way into it).
        rates: ``(position, new rate)`` of each ``lr_changed`` event, in order.
    """

    epochs: dict[int, dict[str, float]]
    markers: dict[str, list[float]]
    rates: list[tuple[float, float]] = field(default_factory=list)

    def panels(self) -> list[str]:
        """The metrics with a panel each (``loss`` first), ``learning_rate`` last when logged."""
        names: list[str] = []
        for logs in self.epochs.values():
            for key in logs:
                base = key[4:] if key.startswith("val_") else key
                if base != "learning_rate" and base not in names:
                    names.append(base)
        names.sort(key=lambda n: n != "loss")
        if any("learning_rate" in logs for logs in self.epochs.values()):
            names.append("learning_rate")
        return names


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def plot_data(events: Iterable[Mapping[str, Any]]) -> PlotData:
    """The curves and markers of a run's events (oldest first); events it cannot place are skipped."""
    epochs: dict[int, dict[str, float]] = {}
    markers: dict[str, list[float]] = {}
    rates: list[tuple[float, float]] = []
    at = 0.0  # where the newest event with an epoch sits: events without one are marked there
    for event in events:
        kind = event_type(event["type"]) if isinstance(event.get("type"), str) else None
        if kind is None:
            continue
        epoch, step = event.get("epoch"), event.get("step")
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0:
            if kind is EventType.RESTORED:
                inside = event.get("phase") == "batch"
            elif kind in (EventType.BACKUP_COMMITTED, EventType.PREEMPTED):
                inside = True  # their step is a global step: within the epoch, or at its end
            else:
                inside = isinstance(step, int) and step >= 0
            at = epoch + (0.5 if inside else 1.0)
        if kind is EventType.EPOCH_END and isinstance(epoch, int) and isinstance(event.get("logs"), Mapping):
            values = {k: v for k, v in ((k, _number(v)) for k, v in event["logs"].items()) if v is not None}
            epochs[epoch + 1] = values  # a restarted attempt trains an epoch again: the newest record wins
        elif kind.value in MARKERS:
            markers.setdefault(kind.value, []).append(at)
        if kind is EventType.LR_CHANGED and _number(event.get("value")) is not None:
            rates.append((at, float(event["value"])))
    return PlotData(epochs=dict(sorted(epochs.items())), markers=markers, rates=rates)


def default_size(data: PlotData) -> tuple[int, int]:
    """Width and height in pixels: 1200 wide, 260 a panel plus 80 for the title."""
    return _WIDTH, _PANEL_HEIGHT * max(1, len(data.panels())) + _TITLE_HEIGHT


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingExtra(f"matplotlib is not installed; {INSTALL_HINT}") from exc
    return Figure, FigureCanvasAgg


def render_png(data: PlotData, *, title: str, size: tuple[int, int] | None = None) -> bytes:
    """The PNG (``size`` pixels, defaults to :func:`default_size`) of ``data``.

    Raises:
        MissingExtra: matplotlib is not installed.
        ValueError: No epoch has ended yet, or ``size`` is below 200x150 pixels.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    if not data.epochs:
        raise ValueError("no epoch of this run has ended yet (no epoch_end event): nothing to plot")
    width, height = size or default_size(data)
    if width < 200 or height < 150:
        raise ValueError(f"size must be at least 200x150 pixels, got {width}x{height}")
    panels = data.panels()
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    xs = list(data.epochs)
    for ax, name in zip(axes, panels):
        keys = [name] if name == "learning_rate" else [name, f"val_{name}"]
        for key, style, colour in zip(keys, ("-o", "--s"), ("tab:blue", "tab:orange")):
            points = [(x, data.epochs[x][key]) for x in xs if key in data.epochs[x]]
            if points:
                px, py = zip(*points)
                if name == "learning_rate":  # each epoch's rate held over the epoch, up to its point
                    ax.step(px, py, "-o", where="pre", color="tab:green", label=key)
                else:
                    ax.plot(px, py, style, color=colour, label=key, markersize=4)
        if name == "learning_rate":
            if data.rates:
                rx, ry = zip(*data.rates)
                ax.plot(rx, ry, "x", color="black", markersize=8, label="rate set (lr_changed)")
            rates = [data.epochs[x][name] for x in xs if name in data.epochs[x]] + [r for _, r in data.rates]
            if rates and min(rates) > 0 and max(rates) / min(rates) > 20:
                ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        seen: set[str] = set()
        for kind, positions in data.markers.items():
            marker = MARKERS[kind]
            for x in positions:  # the markers' legend in the first panel only
                label = marker.label if marker.label not in seen and ax is axes[0] else None
                seen.add(marker.label)
                ax.axvline(x, color=marker.color, linestyle=marker.style, linewidth=marker.width, alpha=0.8,
                           label=label)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def plot_events(events: list[Mapping[str, Any]], output: str, *, title: str,
                size: tuple[int, int] | None = None) -> tuple[int, int]:
    """Draw a run's events into the PNG file ``output``; returns its size in pixels.

    Args:
        events: The run's events, oldest first (``read_event_log(storage).events``).
        output: Path of the PNG to write.
        title: The figure's title; the run's goodput is added to it.
        size: Width and height in pixels. Defaults to :func:`default_size`.

    Raises:
        MissingExtra: matplotlib is not installed.
        ValueError: No epoch has ended yet, or ``size`` is too small.
    """
    data = plot_data(events)
    breakdown = goodput(events)
    if breakdown.goodput is not None and not math.isnan(breakdown.goodput):
        title = (f"{title}: goodput {100 * breakdown.goodput:.1f}% ({breakdown.attempts} attempt"
                 f"{'s' if breakdown.attempts != 1 else ''}, {breakdown.restarts} restart"
                 f"{'s' if breakdown.restarts != 1 else ''}, {breakdown.rollbacks} rollback"
                 f"{'s' if breakdown.rollbacks != 1 else ''})")
    png = render_png(data, title=title, size=size)
    with open(output, "wb") as f:
        f.write(png)
    return size or default_size(data)
