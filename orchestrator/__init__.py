"""orchestrator: fault-tolerant data-parallel PyTorch training on Ray with Keras-style callbacks.

``Trainer`` is imported lazily, so ``import orchestrator.callbacks`` loads neither torch nor ray.
"""

from typing import Any

from orchestrator import callbacks
from orchestrator.callbacks import History

__all__ = ["Trainer", "History", "callbacks"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from orchestrator.api import Trainer

        return Trainer
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
