"""What a backup's position means, and the check that a resume does not change it.

A backup's position (epoch, batch, sampler offsets) only means the same samples when the run is
resumed with the same world size, batch size, seed, steps_per_epoch, training-set length and model. The
coordinator records these (the *layout*) in its state; the driver checks the config fields before
any worker starts and the coordinator checks the rest when every rank has reported them.
"""

from __future__ import annotations

from typing import Any

from orchestrator.errors import OrchestratorError


class ResumeMismatch(OrchestratorError):
    """The run is resumed with a configuration that changes what its backup's position means."""


#: What a backup's position means, in the order they are checked; see :func:`check_layout`.
LAYOUT_FIELDS = ("world_size", "batch_size", "seed", "steps_per_epoch", "accumulate_grad_batches", "samples",
                 "parameters")

_LAYOUT_HINTS = {
    "world_size": "Resume with num_workers={old}",
    "batch_size": "Resume with batch_size={old}",
    "seed": "Resume with seed={old}",
    "steps_per_epoch": "Resume with steps_per_epoch={old}",
    "accumulate_grad_batches": "Resume with accumulate_grad_batches={old}",
    "samples": "Resume with the same training data (data() returned {old} samples per rank)",
    "parameters": "Resume with the same model",
}


def check_layout(recorded: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Raise :class:`ResumeMismatch` naming the first field of ``current`` that differs from ``recorded``.

    Only fields present in both are compared (a backup written before a field was recorded
    resumes as before).

    Args:
        recorded: The layout stored with the backup (None: nothing to compare).
        current: This attempt's layout.
        where: The backup, for the message.

    Example:
        >>> try:
        ...     check_layout({"batch_size": 16}, {"batch_size": 32}, "backup/step-8")
        ... except ResumeMismatch as exc:
        ...     print(str(exc).split(";")[0])
        cannot resume from backup/step-8: batch_size was 16 when it was written and is 32 now
    """
    for name in LAYOUT_FIELDS:
        if not recorded or name not in recorded or name not in current:
            continue
        old, new = recorded[name], current[name]
        if name == "parameters":
            old, new = _shape_change(old, new)
            if old is None:
                continue
        elif old == new:
            continue
        raise ResumeMismatch(
            f"cannot resume from {where}: {name} was {old} when it was written and is {new} now; the position "
            f"it holds would mean other samples. {_LAYOUT_HINTS[name].format(old=old)}, or start a new run "
            "(another run_name)")


def _shape_change(old: dict[str, Any], new: dict[str, Any]) -> tuple[Any, Any]:
    """(what the backup had, what the model has) for the first parameter that differs, else (None, None)."""
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is not None and b is not None and list(a) == list(b):
            continue
        return (f"{name} {list(a) if a is not None else 'absent'}", f"{list(b) if b is not None else 'absent'}")
    return None, None
