"""Where the CPU goes during a steady Trainer.fit: CPU seconds of every process of the session, by role.

    python benchmarks/overhead.py [--epochs 6] [--repeats 2] [--max-failures 0] [--threads 8] [--realistic]
                                  [--source DIR ...] [--hand]

Each repeat runs ``Trainer.fit`` as a fresh process that starts its own local Ray (no Ray running,
``RAY_ADDRESS=local``, as a user's script does; README), with benchmarks/workload.py's model and
data and the callbacks of benchmarks/fit_vs_ddp.py's fit side (EarlyStopping, ReduceLROnPlateau,
TerminateOnNaN, BackupAndRestore): 2 workers x 1 thread, ``max_failures=0`` unless ``--max-failures``
says otherwise (then the fit also keeps a warm standby per rank and a spare coordinator). A display callback on the driver prints a
mark when the second epoch begins and when the second-to-last one ends (the last one still trains
then, so no process of the fit, loader workers included, has ended yet); at each mark this script reads the
CPU seconds (user + system, ``/proc/<pid>/stat``) of that process and of every descendant (Ray's
gcs_server, raylet, agents, workers and the coordinator are all started below the driver). The
difference over the window is each process's CPU during steady training; each is grouped by its
role, from its command line:

- training ranks: ``ray::TrainWorker.run``;
- loader workers: the ranks' child processes (DataLoader workers, with ``--realistic``);
- coordinator: ``ray::Coordinator``;
- driver: the process that called ``fit`` (its poll loop, and Ray's core worker threads in it);
- gcs_server, raylet, log monitor;
- dashboard / agents: the dashboard agent, the runtime env agent and the dashboard head;
- other Ray workers: idle pool workers (``ray::IDLE``), warm standbys (an idle ``ray::TrainWorker``);
- everything else below the driver.

Printed per group: CPU seconds per second of wall (cores used) and CPU seconds per 1,000 training
steps. CPU seconds do not depend much on what else runs on the machine, unlike wall-clock rates,
so these figures compare across runs on a shared machine; the steps/s printed beside them do not.
A process that exits inside the window is not counted (the count of those is printed).

``--source`` names checkouts whose ``orchestrator`` package the fit imports (default: this one);
with several, the repeats interleave them (A B A B), to compare before and after a change.
``--realistic``: the fit runs workload.REALISTIC (``loader_workers=2``, ``"bf16-mixed"``,
``accumulate_grad_batches=2``, the warm-up + cosine schedule per optimizer step), as
benchmarks/fit_vs_ddp.py --realistic does; steps are then optimizer steps.
``--hand``: each repeat also runs benchmarks/fit_vs_ddp.py's hand-written loop in two plain Ray actors
(``--ray-actors``: the loop on each actor's main thread, on a Ray started as fit starts its own, with
the first ``--source``'s settings; with ``--realistic`` its loader workers share batches by file name,
as fit's do), with the same window (rank 0 notes each epoch's end in a file this script's child
follows), and prints, per pair of interleaved repeats, each fit's CPU per step against it by group:
CPU time moves much less with this VM's load than steps/s do. Each side's steps in its window are
its wall time at the side's own pace between the window's epochs (a fit's marks reach its driver
with its events, up to a second late).
``--threads N`` also lists every process and the N threads that used the most CPU outside the ranks' training threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from overhead_sides import MARK, child, child_hand

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GROUPS = ("training ranks", "loader workers", "coordinator", "driver", "gcs_server", "raylet", "dashboard / agents",
          "log monitor", "other Ray workers", "everything else")
COLLECTIVE_THREADS = ("gloo", "pt_gloo", "pt_nccl", "nccl")
HAND = "hand-written loop in Ray actors"
RANK_TITLES = ("ray::TrainWorker", "ray::HandWrittenRank")  # a fit's ranks, the hand-written loop's (--hand)
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# -- /proc ------------------------------------------------------------------------------------
@dataclass
class Proc:
    """One process (or thread) as /proc shows it at one moment."""

    pid: int
    ppid: int
    cpu_s: float
    name: str  # comm
    cmdline: str
    collective: bool = False  # a process with a gloo or NCCL thread: in a process group


def _read(path: str) -> Proc | None:
    try:
        stat = Path(path, "stat").read_text()
        cmdline = Path(path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None  # gone meanwhile
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
    return Proc(int(Path(path).name), int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS, name, cmdline)


def snapshot(root: int, threads: bool) -> tuple[dict[int, Proc], dict[tuple[int, int], Proc]]:
    """Every descendant of ``root`` (and ``root``) by pid; with ``threads``, their threads by (pid, tid)."""
    procs = {p.pid: p for p in (_read(f"/proc/{d}") for d in os.listdir("/proc") if d.isdigit()) if p is not None}
    children: dict[int, list[int]] = defaultdict(list)
    for p in procs.values():
        children[p.ppid].append(p.pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            tree[pid] = procs[pid]
            todo.extend(children[pid])
    for p in tree.values():
        if p.cmdline.startswith(RANK_TITLES):
            p.collective = any(name.startswith(COLLECTIVE_THREADS) for name in _thread_names(p.pid))
    tasks: dict[tuple[int, int], Proc] = {}
    if threads:
        for pid in tree:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                t = _read(f"/proc/{pid}/task/{tid}")
                if t is not None:
                    tasks[(pid, t.pid)] = t
    return tree, tasks


def _thread_names(pid: int) -> list[str]:
    try:
        return [Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def role(proc: Proc, driver: int) -> str | None:
    """The group of a process from its command line, or None when it has none of its own."""
    cmd = proc.cmdline
    if proc.pid == driver:
        return "driver"
    if cmd.startswith("ray::TrainWorker.run") or proc.collective:  # a hand-written rank: its gloo threads
        return "training ranks"
    if cmd.startswith("ray::Coordinator"):
        return "coordinator"
    if "gcs_server" in cmd.split(" ", 1)[0]:
        return "gcs_server"
    if cmd.split(" ", 1)[0].endswith("/raylet"):
        return "raylet"
    if "log_monitor.py" in cmd:
        return "log monitor"
    if any(k in cmd for k in ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard/agent.py",
                              "runtime_env/agent/main.py", "dashboard/dashboard.py")):
        return "dashboard / agents"
    if cmd.startswith("ray::"):
        return "other Ray workers"
    return None


def groups_of(start: dict[int, Proc], end: dict[int, Proc], driver: int) -> dict[int, str]:
    """Each process's group: "loader workers" when its parent is a rank (or a loader worker), else its own
    role, else everything else.

    A ``TrainWorker`` process counts as a rank when it runs ``TrainWorker.run`` at either mark (its
    title names the method it ran last) or has a gloo or NCCL thread (it joined a process group);
    an idle one is a warm standby.
    """
    both = {**start, **end}
    own = {pid: role(p, driver) for pid, p in both.items()}
    for pid in both:
        if pid in start and pid in end and "training ranks" in (role(start[pid], driver), role(end[pid], driver)):
            own[pid] = "training ranks"

    def group(pid: int, depth: int = 0) -> str:
        parent = both[pid].ppid if pid in both else None
        if parent in both and depth < 32 and group(parent, depth + 1) in ("training ranks", "loader workers"):
            return "loader workers"  # forked by a rank: it may still carry the rank's title
        return own.get(pid) or "everything else"

    return {pid: group(pid) for pid in both}


@dataclass
class Window:
    """One repeat's measurement: CPU seconds by group over ``wall_s`` seconds and ``steps`` steps."""

    source: str
    wall_s: float
    steps: float  # steps in the window: its wall time at the side's own pace between its epochs
    cpu: dict[str, float]
    count: dict[str, int]
    vanished: int
    threads: list[tuple[float, str, int, str]]  # (cpu s, group, pid, thread name)
    members: list[tuple[float, str, int, str]]  # (cpu s, group, pid, command line)


def measure(source: Path, epochs: int, max_failures: int, threads: bool, timeout_s: float,
            realistic: bool = False, hand: bool = False) -> Window:
    """Run one fit (``hand``: the hand-written loop in Ray actors) as a fresh process and measure its steady window."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_ADDRESS="local",
               PYTHONPATH=os.pathsep.join([str(source), str(HERE)]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-hand" if hand else "--child", "--epochs",
           str(epochs), "--max-failures", str(max_failures)] + (["--realistic"] if realistic else [])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=source)
    marks: dict[str, tuple[float, dict[int, Proc], dict[tuple[int, int], Proc], int]] = {}
    rate = None  # the side's steps/s between its window's epochs, from its own epoch times
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(f"{MARK} rate"):
            rate = float(line.split()[2])
        elif line.startswith(MARK):
            _, what, steps = line.split()
            now = time.monotonic()
            tree, tasks = snapshot(proc.pid, threads)
            marks[what] = (now, tree, tasks, int(steps))
        if time.monotonic() > deadline:
            break
    try:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if proc.returncode != 0 or set(marks) != {"begin", "end"} or rate is None:
        raise RuntimeError(f"the {'hand-written loop' if hand else 'fit'} exited {proc.returncode} with marks "
                           f"{sorted(marks)}{'' if rate is not None else ' and no rate'}:\n"
                           + "\n".join(err.splitlines()[-20:]))
    (t0, start, start_tasks, _), (t1, end, end_tasks, _) = marks["begin"], marks["end"]
    group = groups_of(start, end, proc.pid)
    cpu: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    members = []
    for pid, p in end.items():
        used = p.cpu_s - (start[pid].cpu_s if pid in start else 0.0)
        cpu[group[pid]] += used
        count[group[pid]] += 1
        members.append((used, group[pid], pid, p.cmdline))
    top = []
    for key, t in end_tasks.items():
        used = t.cpu_s - (start_tasks[key].cpu_s if key in start_tasks else 0.0)
        top.append((used, group[key[0]], key[0], t.name))
    return Window(str(source), t1 - t0, rate * (t1 - t0), dict(cpu), dict(count),
                  sum(pid not in end for pid in start), sorted(top, reverse=True), sorted(members, reverse=True))


def describe(source: Path) -> str:
    """The checkout's commit (and whether it has changes), or its path alone."""
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "orchestrator"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return str(source)
    return f"{source} at {head or '?'}{' with uncommitted changes' if dirty else ''}"


def report(source: str, windows: list[Window], threads: int) -> None:
    """Per group: median cores (CPU-s/s) and CPU-s per 1,000 steps over the repeats, and the spread."""
    print(f"\n{source}: {len(windows)} repeat(s); window {statistics.median(w.wall_s for w in windows):.1f} s, "
          f"{statistics.median(w.steps for w in windows):.0f} steps; steady {statistics.median(w.steps / w.wall_s for w in windows):.1f} steps/s "
          f"(wall clock: depends on the machine's load); processes gone inside the window: "
          f"{max(w.vanished for w in windows)}")
    print(f"  {'group':<20} {'procs':>5} {'cores (CPU-s/s)':>22} {'CPU-s / 1000 steps':>24}")

    def row(name: str, values: list[tuple[float, float]], procs: str) -> None:
        rate, per = [v[0] for v in values], [v[1] for v in values]
        print(f"  {name:<20} {procs:>5} {statistics.median(rate):8.3f} ({min(rate):.3f}-{max(rate):.3f})"
              f" {statistics.median(per):10.3f} ({min(per):.3f}-{max(per):.3f})")

    for name in GROUPS:
        values = [(w.cpu.get(name, 0.0) / w.wall_s, w.cpu.get(name, 0.0) / w.steps * 1000) for w in windows]
        row(name, values, str(max(w.count.get(name, 0) for w in windows)))
    others = [sum(v for k, v in w.cpu.items() if k != "training ranks") for w in windows]
    row("all but the ranks", [(o / w.wall_s, o / w.steps * 1000) for o, w in zip(others, windows)], "")
    if threads:
        w = windows[-1]
        print("  every process (last repeat), CPU-s/s:")
        for used, group, pid, cmd in w.members:
            print(f"    {used / w.wall_s:7.4f}  {group:<20} pid {pid:<7} {cmd[:90]}")
        busy = [t for t in w.threads if not (t[1] == "training ranks" and t == _busiest(w.threads, t[2]))]
        print(f"  the {threads} busiest threads outside the ranks' training threads (last repeat), CPU-s/s:")
        for used, group, pid, name in busy[:threads]:
            print(f"    {used / w.wall_s:7.4f}  {group:<20} pid {pid:<7} {name}")


def _busiest(threads: list[tuple[float, str, int, str]], pid: int) -> tuple[float, str, int, str]:
    return max(t for t in threads if t[2] == pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each fit; the window is epochs 2 to the "
                        "second-to-last (default 6)")
    parser.add_argument("--repeats", type=int, default=2, help="fits per source (default 2)")
    parser.add_argument("--max-failures", type=int, default=0, help="the fit's max_failures: above 0, it keeps a warm "
                        "standby per rank and a spare coordinator (default 0, as benchmarks/fit_vs_ddp.py)")
    parser.add_argument("--threads", type=int, default=0, help="list this many busiest threads (default 0)")
    parser.add_argument("--source", nargs="+", type=Path, default=[ROOT],
                        help="checkouts whose orchestrator package the fit imports (default: this one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one fit may take (default 600)")
    parser.add_argument("--realistic", action="store_true", help="workload.REALISTIC: loader workers, bf16, "
                        "accumulation, warm-up + cosine")
    parser.add_argument("--hand", action="store_true", help="also measure the hand-written loop in two plain Ray "
                        "actors (benchmarks/fit_vs_ddp.py --ray-actors), interleaved, and compare CPU per step")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-hand", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.child_hand:
        child_hand(args.epochs, args.realistic) if args.child_hand else child(args.epochs, args.max_failures,
                                                                               args.realistic)
        return
    for name, value, least in (("--epochs", args.epochs, 3), ("--repeats", args.repeats, 1), ("--threads", args.threads, 0),
                               ("--max-failures", args.max_failures, 0)):
        if value < least:
            parser.error(f"{name} must be at least {least}, got {value}")
    sources = [s.resolve() for s in args.source]
    for s in sources:
        if not (s / "orchestrator" / "__init__.py").is_file():
            parser.error(f"--source {s}: no orchestrator package there")
    print(f"python {platform.python_version()}, torch {version('torch')}, ray {version('ray')}, {os.cpu_count()} CPUs; "
          f"epochs {args.epochs} (window: start of epoch 2 to end of epoch {args.epochs - 1}), repeats {args.repeats} "
          f"per source{' interleaved' if len(sources) > 1 or args.hand else ''}, max_failures {args.max_failures}, "
          f"threads listed {args.threads}; workload MLP "
          f"256-512-512-10, batch 64 per worker, 2 workers x 1 thread (OMP_NUM_THREADS=1); fit starts its own Ray "
          f"(RAY_ADDRESS=local); callbacks EarlyStopping, ReduceLROnPlateau, TerminateOnNaN, BackupAndRestore; "
          f"config {workload_config(args.realistic)}; CPU = utime + stime from /proc"
          + ("; hand: the hand-written loop in 2 plain Ray actors on a Ray started as fit's" if args.hand else ""),
          flush=True)
    for s in sources:
        print(f"source: {describe(s)}", flush=True)
    sides = [(str(s), s, False) for s in sources] + ([(HAND, sources[0], True)] if args.hand else [])
    windows: dict[str, list[Window]] = {label: [] for label, _, _ in sides}
    for i in range(args.repeats):
        for label, s, hand in sides:
            w = measure(s, args.epochs, args.max_failures, args.threads > 0, args.timeout, args.realistic, hand)
            windows[label].append(w)
            others = sum(v for k, v in w.cpu.items() if k != "training ranks")
            print(f"repeat {i + 1} {label}: {w.steps:.0f} steps in {w.wall_s:.1f} s; ranks "
                  f"{w.cpu.get('training ranks', 0) / w.wall_s:.3f} cores, all but the ranks {others / w.wall_s:.3f} "
                  f"cores", flush=True)
    for label, _, _ in sides:
        report(label, windows[label], args.threads)
    if args.hand:
        for s in sources:
            compare(str(s), windows[str(s)], windows[HAND])


def workload_config(realistic: bool) -> str:
    return "realistic (loader workers 2, bf16-mixed, accumulation 2, warm-up + cosine per step)" if realistic \
        else "plain fp32"


def compare(label: str, fits: list[Window], hands: list[Window]) -> None:
    """CPU seconds per 1,000 steps of the fit against the hand-written loop, by group and in all, from the
    interleaved repeats' pairs (a ratio above 1: the fit's processes use more CPU for the same steps)."""
    print(f"\nCPU per step, {label} / {HAND} (median of the {len(fits)} interleaved pairs' ratios, range):")
    for name in ("training ranks", "loader workers", "all but the ranks", "all processes"):
        def per_step(w: Window) -> float:
            if name == "all processes":
                return sum(w.cpu.values()) / w.steps
            if name == "all but the ranks":
                return sum(v for k, v in w.cpu.items() if k != "training ranks") / w.steps
            return w.cpu.get(name, 0.0) / w.steps

        ratios = [per_step(f) / per_step(h) for f, h in zip(fits, hands) if per_step(h) > 0]
        if ratios:
            print(f"  {name:<20} fit {statistics.median(per_step(f) for f in fits) * 1e3:7.2f} ms, hand "
                  f"{statistics.median(per_step(h) for h in hands) * 1e3:7.2f} ms; ratio "
                  f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
