"""What a backup's position means, and the check that a resume does not change it.

A backup's position (epoch, batch, sampler offsets) only means the same samples when the run is
resumed with the same world size, batch size, seed, steps_per_epoch, training-set length and model. The
coordinator records these (the *layout*) in its state; the driver checks the config fields before
any worker starts and the coordinator checks the rest when every rank has reported them.

The layout also records the options that decide which components a backup holds: a precision with a
GradScaler (``"16-mixed"``: the ``scaler`` component) or not, and an ``lr_scheduler`` or none (the
``lr_scheduler`` component). A resume cannot switch them (``"32-true"`` <-> ``"bf16-mixed"`` is fine).
"""

from __future__ import annotations

from typing import Any

from orchestrator.errors import OrchestratorError


class ResumeMismatch(OrchestratorError):
    """The run is resumed with a configuration that changes what its backup's position means."""


#: What a backup's position means, in the order they are checked; see :func:`check_layout`.
LAYOUT_FIELDS = ("strategy", "world_size", "batch_size", "seed", "steps_per_epoch", "accumulate_grad_batches", "precision",
                 "lr_scheduler", "samples", "parameters")

#: The precision whose backups hold a GradScaler's state (the ``scaler`` component).
SCALED_PRECISION = "16-mixed"

_LAYOUT_HINTS = {
    "world_size": "Resume with num_workers={old} (or train with strategy='fsdp', whose backups reshard)",
    "strategy": "Resume with strategy={old!r}",
    "batch_size": "Resume with batch_size={old}",
    "seed": "Resume with seed={old}",
    "steps_per_epoch": "Resume with steps_per_epoch={old}",
    "accumulate_grad_batches": "Resume with accumulate_grad_batches={old}",
    "samples": "Resume with the same training data (data() returned {old} samples per rank)",
    "parameters": "Resume with the same model",
}


def option_layout(loop: Any) -> dict[str, Any]:
    """The layout fields a loop configuration decides: which optional components its backups hold.

    Example:
        >>> from types import SimpleNamespace
        >>> option_layout(SimpleNamespace(precision="bf16-mixed", lr_scheduler=None, strategy="ddp"))
        {'precision': 'bf16-mixed', 'lr_scheduler': False, 'strategy': 'ddp'}
    """
    return {"precision": loop.precision, "lr_scheduler": loop.lr_scheduler is not None,
            "strategy": getattr(loop, "strategy", "ddp")}


def config_layout(loop: Any, world_size: int) -> dict[str, Any]:
    """The layout fields a fit's configuration decides, computed alike by the driver (to check a backup
    before any worker starts) and by every rank (which adds its ``samples`` and ``parameters``).

    ``world_size``: the number of workers (an elastic run's largest: a step means the same samples on
    any of its world sizes).

    Example:
        >>> from types import SimpleNamespace
        >>> config_layout(SimpleNamespace(batch_size=8, seed=0, accumulate_grad_batches=1, steps_per_epoch=None,
        ...                               precision="32-true", lr_scheduler=None, strategy="ddp"), 2)["world_size"]
        2
    """
    return {"world_size": world_size, "batch_size": loop.batch_size, "seed": loop.seed,
            "accumulate_grad_batches": loop.accumulate_grad_batches, "steps_per_epoch": loop.steps_per_epoch,
            **option_layout(loop)}


def option_mismatch(name: str, old: Any, new: Any, where: str) -> ResumeMismatch:
    """The error for a resume that switches ``precision`` to or from ``"16-mixed"``, or adds or removes
    an ``lr_scheduler`` (``old``/``new``: the precision names, or whether a scheduler is set)."""
    if name == "precision":
        scaled = old == SCALED_PRECISION
        resume_with = repr(SCALED_PRECISION) if scaled else "'32-true' or 'bf16-mixed'"
        return ResumeMismatch(
            f"cannot resume from {where}: precision was {old!r} when it was written and is {new!r} now; only "
            f"{SCALED_PRECISION!r} keeps a GradScaler, whose state {'is' if scaled else 'is not'} in the backup. "
            f"Resume with precision={resume_with}, or start a new run (another run_name)")
    state = "set" if old else "None"
    return ResumeMismatch(
        f"cannot resume from {where}: lr_scheduler was {state} when it was written and is "
        f"{'set' if new else 'None'} now; the schedule's state (its step count and base rates) "
        f"{'is' if old else 'is not'} in the backup. Resume with "
        f"{'the same lr_scheduler=' if old else 'lr_scheduler=None'}, or start a new run (another run_name)")


#: The optional components of a backup and the option that adds them.
OPTION_COMPONENTS = {"scaler": "precision", "lr_scheduler": "lr_scheduler"}


def component_mismatch(component: str, in_backup: bool, where: str) -> ResumeMismatch:
    """The error for a backup that holds (``in_backup``) or lacks an optional component the run lacks or
    has: what a backup whose layout predates the ``precision``/``lr_scheduler`` fields can only say so."""
    if component == "scaler":
        then, now, resume_with = ((f"precision={SCALED_PRECISION!r}", f"precision is not {SCALED_PRECISION!r}",
                                   f"precision={SCALED_PRECISION!r}") if in_backup else
                                  (f"a precision other than {SCALED_PRECISION!r}", f"precision is {SCALED_PRECISION!r}",
                                   "precision='32-true' or 'bf16-mixed'"))
        held = "a GradScaler's state" if in_backup else "no GradScaler state"
    else:
        then, now, resume_with = (("an lr_scheduler", "lr_scheduler is None", "the same lr_scheduler=") if in_backup
                                  else ("no lr_scheduler", "lr_scheduler is set", "lr_scheduler=None"))
        held = "a schedule's state" if in_backup else "no schedule state"
    return ResumeMismatch(f"cannot resume from {where}: it was written with {then} (it holds {held}) and {now} now. "
                          f"Resume with {resume_with}, or start a new run (another run_name)")


def check_layout(recorded: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Raise :class:`ResumeMismatch` naming the first field of ``current`` that differs from ``recorded``.

    Only fields present in both are compared (a backup written before a field was recorded
    resumes as before). A ``world_size`` change is allowed when both layouts say ``strategy="fsdp"``
    (:func:`reshardable`): the sharded state reshards and the data position restarts the epoch.

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
        if name == "world_size" and reshardable(recorded, current):
            continue
        if name == "parameters":
            old, new = _shape_change(old, new)
            if old is None:
                continue
        elif name == "precision":
            if (old == SCALED_PRECISION) == (new == SCALED_PRECISION):
                continue
            raise option_mismatch(name, old, new, where)
        elif old == new:
            continue
        elif name == "lr_scheduler":
            raise option_mismatch(name, old, new, where)
        raise ResumeMismatch(
            f"cannot resume from {where}: {name} was {old} when it was written and is {new} now; the position "
            f"it holds would mean other samples. {_LAYOUT_HINTS[name].format(old=old)}, or start a new run "
            "(another run_name)")


def reshardable(recorded: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether a backup of layout ``recorded`` may resume on another world size under ``current``:
    both were trained with ``strategy="fsdp"`` (their model and optimizer are saved by DCP, which
    reshards on load; see docs/fsdp.md for the data position).

    Example:
        >>> reshardable({"strategy": "fsdp", "world_size": 2}, {"strategy": "fsdp", "world_size": 1})
        True
    """
    return bool(recorded) and recorded.get("strategy") == "fsdp" and current.get("strategy") == "fsdp"


def _shape_change(old: dict[str, Any], new: dict[str, Any]) -> tuple[Any, Any]:
    """(what the backup had, what the model has) for the first parameter that differs, else (None, None)."""
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is not None and b is not None and list(a) == list(b):
            continue
        return (f"{name} {list(a) if a is not None else 'absent'}", f"{list(b) if b is not None else 'absent'}")
    return None, None
