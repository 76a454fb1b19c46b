"""The rows of tests/test_ray_data.py's lazily generated datasets, made by Ray Data's own tasks and actors.

A function a dataset maps with is pickled by reference to its module, so each Ray process that runs
or plans it (the map tasks' workers, the split coordinators) imports that module: this one needs
only numpy, where the test module would import torch and the package (seconds of CPU each).
"""

from __future__ import annotations

import numpy as np

FEATURES = 4
W = np.array([[1.0, -1.0, 0.5], [-0.5, 2.0, 0.0], [0.3, 0.1, -1.0], [1.5, -0.2, 0.7]], dtype=np.float32)


def features(batch: dict, offset: int = 0) -> dict:
    """Each row's features, made on the fly from its id (column 0 of ``x`` keeps the id, for the records)."""
    ids = (batch["id"] + offset).astype(np.float32)
    x = np.stack([ids] + [np.sin(ids * 0.37 * (k + 1)) for k in range(FEATURES)], axis=1).astype(np.float32)
    return {"x": x, "y": (x[:, 1:] @ W).argmax(axis=1).astype(np.int64), "pad": np.zeros((len(ids), 1024), np.float32)}
