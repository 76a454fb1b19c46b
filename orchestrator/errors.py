"""Exception types raised by orchestrator."""

from __future__ import annotations


class OrchestratorError(RuntimeError):
    """Base class for errors raised by orchestrator itself."""


class WorkerError(OrchestratorError):
    """User code (model, data, loss, step, ...) raised on a worker.

    Attributes:
        rank: The rank that raised first.
        node: The node address of that rank.
        original_type: Name of the original exception type.
        remote_traceback: The traceback text as printed on the worker.
    """

    def __init__(self, rank: int, node: str, original_type: str, message: str, remote_traceback: str):
        self.rank = rank
        self.node = node
        self.original_type = original_type
        self.remote_traceback = remote_traceback
        super().__init__(
            f"rank {rank} (node {node}) raised {original_type}: {message}\n\n"
            f"Traceback on rank {rank}:\n{remote_traceback}"
        )

    def __reduce__(self):
        return (
            WorkerError,
            (self.rank, self.node, self.original_type, str(self).split("\n", 1)[0], self.remote_traceback),
        )


class WorkerLostError(OrchestratorError):
    """A worker process died (killed, out of memory, node lost) without raising."""


class CoordinatorError(OrchestratorError):
    """A callback raised on the coordinator; the original exception is chained."""
