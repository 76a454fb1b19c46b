"""TensorBoard weight histograms on rank 0: computed with torch at the decision, written in the background.

The ``TensorBoard`` callback (on the coordinator, without torch) decides at an epoch end that
histograms are due and names the event file; rank 0 applies that
:class:`~orchestrator.decisions.WriteHistograms` here. Only the statistics (a few numbers and
``bins`` counts per parameter) are computed while training waits; serialising and writing the file
happen in a background thread, one at a time. A failed write is logged, never raised: histograms
are diagnostics and must not stop training.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from orchestrator.decisions import WriteHistograms
from orchestrator.storage.tb_events import Histogram, file_version_event, frame, histogram_event

log = logging.getLogger(__name__)


@torch.no_grad()
def weight_histograms(model: torch.nn.Module, bins: int = 30) -> dict[str, Histogram]:
    """``{"<parameter name>/histogram": Histogram}`` of every parameter (Keras's tag names).

    Buckets are ``bins`` equal-width intervals over the finite values' [min, max]; non-finite
    values are left out; a constant parameter has one bucket. Sums are taken in float64.

    Example:
        >>> h = weight_histograms(torch.nn.Linear(2, 1), bins=4)
        >>> sorted(h), h["bias/histogram"].num
        (['bias/histogram', 'weight/histogram'], 1.0)
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an integer >= 1, got {bins!r}")
    out: dict[str, Histogram] = {}
    for name, param in model.named_parameters():
        values = param.detach().flatten().double()
        values = values[torch.isfinite(values)]
        tag = f"{name}/histogram"
        if values.numel() == 0:
            out[tag] = Histogram(0.0, 0.0, 0.0, 0.0, 0.0, (), ())
            continue
        lo, hi, total, squares = torch.stack([values.min(), values.max(), values.sum(),
                                              (values * values).sum()]).tolist()
        num = float(values.numel())
        if lo == hi:
            out[tag] = Histogram(lo, hi, num, total, squares, (hi,), (num,))
            continue
        counts = torch.histc(values, bins=bins, min=lo, max=hi).tolist()
        limits = tuple(lo + (hi - lo) * (i + 1) / bins for i in range(bins - 1)) + (hi,)
        out[tag] = Histogram(lo, hi, num, total, squares, limits, tuple(float(c) for c in counts))
    return out


class HistogramWriter:
    """Writes :class:`~orchestrator.decisions.WriteHistograms` files of one rank, one at a time.

    Args:
        storage: The run's :class:`~orchestrator.storage.fs.RunStorage`.

    Example:
        >>> writer = HistogramWriter(storage)  # doctest: +SKIP
        >>> writer.write(WriteHistograms("logs/train/events.out.tfevents.0000000004.run", step=1), model)  # doctest: +SKIP
        >>> writer.wait()  # the file is written (or its failure logged)  # doctest: +SKIP
    """

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self._thread: threading.Thread | None = None

    def write(self, decision: WriteHistograms, model: torch.nn.Module) -> None:
        """Compute the histograms now; write the file in the background (after the previous one)."""
        histograms = weight_histograms(model, decision.bins)
        wall_time = time.time()
        self.wait()
        self._thread = threading.Thread(target=self._persist, name="orchestrator-histograms", daemon=True,
                                        args=(decision.filepath, decision.step, wall_time, histograms))
        self._thread.start()

    def _persist(self, filepath: str, step: int, wall_time: float, histograms: dict[str, Histogram]) -> None:
        try:
            data = frame([file_version_event(wall_time), histogram_event(step, wall_time, histograms)])
            self.storage.write_bytes(filepath, data)
        except Exception as exc:  # noqa: BLE001 - diagnostics never stop training
            redact = getattr(self.storage, "_redact", str)
            log.warning("TensorBoard histograms of step %s not written to %s: %s", step, redact(filepath), exc)

    def in_flight(self) -> threading.Thread | None:
        """The thread writing the latest file (join it to know that file is written), or None."""
        return self._thread

    def wait(self) -> None:
        """Block until the file in flight, if any, is written (or its failure logged)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
