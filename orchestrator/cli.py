"""Command line: the ``ray job submit`` entry point.

    orchestrator run TARGET [--storage URL] [--run-name NAME] [--epochs N] [--num-workers N]
                            [--use-gpu] [--set KEY=VALUE ...]
    orchestrator status RUN_URL [--option KEY=VALUE ...]
    orchestrator plot RUN_URL [-o run.png] [--size WxH] [--option KEY=VALUE ...]
    orchestrator export RUN_URL [--step N] [-o model.pt] [--backup-dir backup] [--option KEY=VALUE ...]

``TARGET`` is a Python file defining ``make_trainer(**config)`` (or a ``trainer``), or
``package.module:function`` returning an :class:`orchestrator.Trainer`; ``--set`` values are passed
to that function as keyword arguments (parsed as JSON when they parse, else kept as strings).

Exit codes: 0 finished (early stopping included, or already finished before); 75 preempted with an
emergency backup: run the same command again; 1 training failed (``status``: the storage could not
be read); 2 bad arguments or no run there (``plot``: or no epoch ended yet, or matplotlib missing);
3 (``status``, ``plot``) a run file is damaged: what could be read is printed (drawn), and each damaged
file and line is named on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from orchestrator.core.events import EventType, event_type
from orchestrator.core.goodput import goodput
from orchestrator.errors import Preempted
from orchestrator.core.redaction import redact
from orchestrator.storage.fs import RunStorage, StorageSpec
from orchestrator.storage.run_files import RUN_JSON, EventRecord, read_event_log, run_status

if TYPE_CHECKING:
    from orchestrator.api import Trainer

EXIT_FINISHED, EXIT_FAILED, EXIT_USAGE, EXIT_DAMAGED, EXIT_PREEMPTED = 0, 1, 2, 3, Preempted.exit_code
_MAX_PROBLEM_LINES = 10  # `status` names at most this many damaged lines, then counts the rest

# The events `orchestrator status` lists one a line: decisions, failures and recoveries.
STATUS_EVENTS = frozenset({
    EventType.LR_CHANGED, EventType.EARLY_STOPPING, EventType.TERMINATED_ON_NAN, EventType.STOPPED,
    EventType.ROLLED_BACK, EventType.NODE_DRAINING, EventType.PREEMPTED, EventType.WORKER_FAILED,
    EventType.RESTORED, EventType.RECOVERED, EventType.BACKUP_INTERVAL,
})


class UsageError(Exception):
    """A bad command-line argument: printed as one line, exit code 2."""


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_pairs(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {pair!r}")
        out[key] = _parse_value(value)
    return out


def load_target(target: str) -> Callable[..., Any]:
    """The factory named by TARGET: a file's ``make_trainer``/``trainer``, or ``module:function``."""
    if target.endswith(".py") or Path(target).is_file():
        file = Path(target)
        if not file.is_file():
            raise UsageError(f"{target} is not a file")
        spec = importlib.util.spec_from_file_location("orchestrator_user_entry", file)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        import ray  # here, not at the top: `status`, `plot` and --help load neither ray nor torch

        ray.cloudpickle.register_pickle_by_value(module)  # workers need not import the file
        spec.loader.exec_module(module)
        if hasattr(module, "make_trainer"):
            return module.make_trainer
        if hasattr(module, "trainer"):
            return lambda: module.trainer
        raise UsageError(f"{target} defines neither `trainer` nor `make_trainer()`")
    module_name, sep, attr = target.partition(":")
    if not sep or not attr:
        raise UsageError(f"TARGET must be a .py file or module:function, got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    if not hasattr(module, attr):
        raise UsageError(f"{module_name} has no attribute {attr!r}")
    return getattr(module, attr)


def build_trainer(args: argparse.Namespace) -> Trainer:
    from orchestrator.api import Trainer  # torch and ray: only the commands that train load them

    factory = load_target(args.target)
    config = parse_pairs(args.set or [], "--set")
    try:
        trainer = factory(**config)
    except TypeError as exc:
        if config:
            raise UsageError(f"{args.target} does not accept {sorted(config)}: {exc}") from exc
        raise
    if not isinstance(trainer, Trainer):
        raise UsageError(f"{args.target}: expected an orchestrator.Trainer, got {type(trainer).__name__}")
    changes = {k: v for k, v in (("storage", args.storage), ("run_name", args.run_name),
                                 ("num_workers", args.num_workers)) if v is not None}
    if args.use_gpu:
        changes["use_gpu"] = True
    return trainer.replace(**changes) if changes else trainer


def cmd_run(args: argparse.Namespace) -> int:
    trainer = build_trainer(args)
    args.storage_options = trainer.storage.options  # the one-line error is redacted with them
    storage = trainer.storage.open()
    if run_status(storage) == "finished":  # safe for RayJob retries and resubmissions
        print(f"run {storage.url()} already finished; nothing to do")
        return EXIT_FINISHED
    try:
        history = trainer.fit(epochs=args.epochs, takeover=args.takeover)
    except Preempted as exc:
        print(f"preempted: {exc}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    last = {k: v[-1] for k, v in history.history.items() if v}
    print("finished:", ", ".join(f"{k}={v:.4g}" for k, v in last.items()), flush=True)
    return EXIT_FINISHED


def _read_run_json(storage: RunStorage, problems: list[str]) -> dict:
    """run.json as a dict; a damaged one adds a line to ``problems`` and gives ``{}``."""
    url = storage.url(RUN_JSON)
    try:
        data = json.loads(storage.read_bytes(RUN_JSON).decode("utf-8"))
    except UnicodeDecodeError as exc:
        problems.append(f"{url}: not UTF-8 text (byte {exc.start}); its fields are unknown")
        return {}
    except json.JSONDecodeError as exc:
        problems.append(f"{url} line {exc.lineno}: not JSON ({exc.msg} at column {exc.colno}); its fields are unknown")
        return {}
    if not isinstance(data, dict):
        problems.append(f"{url} line 1: not a JSON object (a {type(data).__name__}); its fields are unknown")
        return {}
    return data


def _number(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:>14.6g}"
    return f"{str(value):>14}"


def _open_run(args: argparse.Namespace) -> RunStorage:
    """The run at ``args.run_url`` opened with the ``--option`` storage options.

    Raises:
        UsageError: RUN_URL is not ``<storage>/<run_name>``, or no run.json is there.
    """
    url = args.run_url.rstrip("/")
    root, _, run_name = url.rpartition("/")
    if not root or not run_name:
        raise UsageError(f"RUN_URL must be <storage>/<run_name>, got {args.run_url!r}")
    options = parse_pairs(args.option or [], "--option")
    args.storage_options = options  # for the final one-line error
    storage = StorageSpec(root, run_name, options).open()
    if not storage.exists(RUN_JSON):
        raise UsageError(f"no run at {storage.url()} (run.json is missing)")
    return storage


def _print_problems(command: str, problems: list[str]) -> int:
    """Name each damaged place on stderr (at most ``_MAX_PROBLEM_LINES``); the exit code."""
    if not problems:
        return EXIT_FINISHED
    for problem in problems[:_MAX_PROBLEM_LINES]:
        print(f"orchestrator {command}: damaged run file: {problem}", file=sys.stderr)
    if len(problems) > _MAX_PROBLEM_LINES:
        print(f"orchestrator {command}: ... and {len(problems) - _MAX_PROBLEM_LINES} more damaged lines",
              file=sys.stderr)
    return EXIT_DAMAGED


def cmd_status(args: argparse.Namespace) -> int:
    """Print what can be read of a run; a damaged file is named (file and line) on stderr, exit 3."""
    storage = _open_run(args)
    problems: list[str] = []
    run = _read_run_json(storage, problems)
    unknown = "?" if problems else 0  # a damaged run.json: its counter is unknown, not 0
    found = read_event_log(storage)
    problems += found.problems
    print(f"run {storage.url()}: status {run.get('status', '?')}, attempts {run.get('attempts', unknown)}, "
          f"world size {run.get('world_size', '?')}")
    events: list[tuple[EventType, EventRecord]] = []
    for record in found.records:
        kind = record.event.get("type")
        member = event_type(kind) if isinstance(kind, str) else None
        if member is None and not isinstance(kind, str):
            problems.append(f"{record.source} line {record.line}: no string 'type'; skipped")
        elif member is not None:
            events.append((member, record))  # an unknown type string: from a newer version, ignored
    latest: dict[int, dict[str, Any]] = {}
    for kind, record in events:  # a restarted attempt re-runs epochs: keep the newest record of each
        if kind is EventType.EPOCH_END:
            epoch, logs = record.event.get("epoch"), record.event.get("logs")
            if isinstance(epoch, int) and not isinstance(epoch, bool) and isinstance(logs, dict):
                latest[epoch] = logs
            else:
                problems.append(f"{record.source} line {record.line}: epoch_end without an integer 'epoch' "
                                "and a 'logs' object; skipped")
    if latest:
        keys = list(dict.fromkeys(k for logs in latest.values() for k in logs))
        print("epoch  " + "  ".join(f"{k:>14}" for k in keys))
        for epoch in sorted(latest):
            print(f"{epoch + 1:>5}  " + "  ".join(_number(latest[epoch].get(k, float("nan"))) for k in keys))
    commits = [r.event for kind, r in events if kind is EventType.BACKUP_COMMITTED]
    if commits:
        c = commits[-1]
        print(f"newest committed backup: {c.get('folder', '?')} "
              f"(epoch {c.get('epoch', '?')}, step {c.get('step', '?')})")
    for kind, record in events:
        if kind in STATUS_EVENTS:
            e = record.event
            detail = {k: v for k, v in e.items() if k not in ("time", "type", "attempt")}
            print(f"attempt {e.get('attempt', '?')}: {kind.value} {json.dumps(detail, default=str)}")
    if any(kind is EventType.STARTED for kind, _ in events):  # where the time went (a run's workers came up)
        for line in goodput(record.event for _, record in events).lines():
            print(line)
    return _print_problems("status", problems)


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise UsageError(f"--size expects WIDTHxHEIGHT in pixels such as 1200x800, got {text!r}")
    return int(width), int(height)


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a run's curves and markers into a PNG; a damaged event line is named on stderr, exit 3."""
    from orchestrator.plot import MissingExtra, plot_events

    size = _size(args.size)
    storage = _open_run(args)
    found = read_event_log(storage)
    try:
        width, height = plot_events(found.events, args.output, title=storage.spec.run_name, size=size)
    except MissingExtra as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {args.output} ({width}x{height} pixels) from {storage.url()}")
    return _print_problems("plot", found.problems)


def cmd_export(args: argparse.Namespace) -> int:
    """Write a committed backup's model (sharded by ``strategy="fsdp"`` or not) as a plain state dict file."""
    from orchestrator.loop.export import export_model

    storage = _open_run(args)
    try:
        step = export_model(storage, args.output, step=args.step, backup_dir=args.backup_dir)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {args.output} (the model of backup step {step} of {storage.url()})")
    return EXIT_FINISHED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator", description=__doc__.split("\n\n")[0],
        epilog="exit codes: 0 finished, 75 preempted (run again), 1 failed (status, plot: storage unreadable), "
               "2 usage or no run, 3 status, plot: a run file is damaged (the rest is printed, the damaged file "
               "and line named)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build the trainer from TARGET and fit it")
    run.add_argument("target", help="a .py file with make_trainer()/trainer, or module:function")
    run.add_argument("--storage", help="fsspec URL of the run storage (overrides the target's)")
    run.add_argument("--run-name", help="run directory name; the same storage + run name resumes")
    run.add_argument("--epochs", type=int, default=1, help="epochs to train (default 1)")
    run.add_argument("--num-workers", type=int, help="data-parallel workers (overrides the target's)")
    run.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="keyword argument for the target")
    run.add_argument("--takeover", action="store_true",
                     help="take the run over from a driver that still holds its lease (only when you know it is gone)")
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="print a run's epochs, metrics, backups, attempts, decisions and goodput")
    status.add_argument("run_url", help="<storage>/<run_name>")
    status.add_argument("--option", action="append", metavar="KEY=VALUE", help="fsspec storage option")
    status.set_defaults(func=cmd_status)
    plot = sub.add_parser("plot", help="draw a run's train/validation curves, learning rate, restarts, restores, "
                                       "rollbacks, preemptions, LR changes and early stop into a PNG "
                                       '(needs pip install "orchestrator[plot]")')
    plot.add_argument("run_url", help="<storage>/<run_name>")
    plot.add_argument("-o", "--output", default="run.png", help="the PNG file to write (default run.png)")
    plot.add_argument("--size", metavar="WxH", help="size in pixels (default 1200 wide, 260 a panel + 80 high)")
    plot.add_argument("--option", action="append", metavar="KEY=VALUE", help="fsspec storage option")
    plot.set_defaults(func=cmd_plot)
    export = sub.add_parser("export", help="write the model of a committed backup (sharded or not) as a plain "
                                           "state dict file, loadable with torch.load(weights_only=True)")
    export.add_argument("run_url", help="<storage>/<run_name>")
    export.add_argument("--step", type=int, help="the backup's global step (default: the newest committed one)")
    export.add_argument("-o", "--output", default="model.pt", help="the file to write (default model.pt)")
    export.add_argument("--backup-dir", default="backup", help="BackupAndRestore's folder (default backup)")
    export.add_argument("--option", action="append", metavar="KEY=VALUE", help="fsspec storage option")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError) as exc:
        print(_one_line(args, f"orchestrator {args.command}: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # a failed run: one line, the traceback is in the logs above
        what = "training failed: " if args.command == "run" else ""
        print(_one_line(args, f"orchestrator {args.command}: {what}{type(exc).__name__}: {exc}"), file=sys.stderr)
        return EXIT_FAILED


def _one_line(args: argparse.Namespace, text: str) -> str:
    """The first line of ``text``, without values of the run's ``storage_options`` or URL userinfo.

    The options are ``args.storage_options`` when the command set it (``status`` from ``--option``;
    ``run`` from its Trainer), else only the userinfo of URLs is removed.
    """
    first = text.strip().splitlines()[0] if text.strip() else text
    return redact(first, getattr(args, "storage_options", None))
