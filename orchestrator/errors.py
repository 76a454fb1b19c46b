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


class CoordinatorLostError(OrchestratorError):
    """The coordinator's process died (killed, out of memory, node lost): retried like a lost worker."""


class HangError(OrchestratorError):
    """A rank, or the coordinator (a callback that blocks), made no progress for ``hang_timeout_s``."""


class ActorTimeoutError(OrchestratorError):
    """An actor did not answer one of the driver's calls within that call's timeout."""


class Preempted(OrchestratorError):
    """Training stopped at a preemption notice after committing an emergency backup.

    The command-line entry point exits with :data:`PREEMPTED_EXIT_CODE` so that Kubernetes or a
    RayJob retry runs it again; the next run resumes with no lost steps.
    """

    exit_code = 75  # EX_TEMPFAIL: try again


PREEMPTED_EXIT_CODE = Preempted.exit_code


class TrainingFailedError(OrchestratorError):
    """More failures than ``max_failures``; lists every failure (attempt, rank, node, cause)."""

    def __init__(self, failures: list) -> None:
        self.failures = list(failures)
        lines = [f"  attempt {f.attempt}: {getattr(f, 'who', f'rank {f.rank}')} on {f.node}: {f.cause}"
                 for f in self.failures]
        super().__init__(f"training failed {len(self.failures)} times (more than max_failures allows):\n"
                         + "\n".join(lines))

    def __reduce__(self):
        return (TrainingFailedError, (self.failures,))
