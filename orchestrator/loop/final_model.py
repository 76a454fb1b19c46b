"""The run's final weights, ``<run>/model.pt``: written when training finishes, read by a later ``fit``.

A finished run is never trained again (see :meth:`orchestrator.Trainer.fit`): a second ``fit``
of the same run returns its History from ``events.jsonl`` and its model from this file.
"""

from __future__ import annotations

import io
from typing import Any

import torch

#: The final weights' file name in the run directory: a plain state dict (``torch.load(weights_only=True)``).
FINAL_MODEL = "model.pt"


def save_final_model(storage: Any, state_dict: dict[str, Any] | None) -> None:
    """Write rank 0's final weights (CPU tensors) to ``<run>/model.pt`` (atomically where the store can).

    Args:
        storage: The run's ``RunStorage``.
        state_dict: The model's state dict; nothing is written when it is None.

    Example:
        save_final_model(storage, {"weight": torch.zeros(2)})  # then torch.load(<run>/model.pt)
    """
    if state_dict is not None:
        storage.write_stream(FINAL_MODEL, lambda f: torch.save(state_dict, f))


def load_final_model(storage: Any) -> dict[str, Any] | None:
    """The weights ``save_final_model`` wrote, or None when the run has none (an older version finished it)."""
    try:
        data = storage.read_bytes(FINAL_MODEL)
    except FileNotFoundError:
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
