"""One command for every benchmark: runs the scripts of benchmarks/ and writes docs/BENCHMARKS.md.

    python -m benchmarks [--quick] [--only NAME ...] [--update] [--out docs/BENCHMARKS.md]

Each script runs in its own process (one after another, so they do not compete for the CPUs), with
the arguments of the mode (``--quick``: fewer repeats and smaller sizes, under 5 minutes on a
2-core machine; the default: the scripts' own defaults). Every script prints its own medians and
spread; the report keeps each script's command, its wall time, its exit status and its output as
printed, under the machine, the versions and the command that produced the report. A script that
fails or runs out of time is reported as such and the others still run. ``--only NAME ... --update``
re-runs those scripts and replaces their sections in the existing report, keeping the others (the
header then names the sections re-run, with the command and the date).

Scripts that need what this machine may lack (``recovery.py`` needs ``ray[train]``;
``gpu_smoke.py`` a GPU) say so in their output.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Bench:
    """One script of the suite.

    Args:
        name: Its name (``--only``) and section title.
        script: The file in benchmarks/.
        measures: What it measures, one line.
        quick: Its arguments with ``--quick``.
        full: Its arguments otherwise.
        timeout_s: Seconds before it is stopped (full mode; quick mode allows a third of it).
        in_quick: Whether ``--quick`` runs it (a script that cannot fit the 5 minutes runs in full mode only).

    Example:
        >>> Bench("goodput", "goodput.py", "goodput at 1k-16k GPUs", quick=["--runs", "3"]).full
        []
    """

    name: str
    script: str
    measures: str
    quick: list[str] = field(default_factory=list)
    full: list[str] = field(default_factory=list)
    timeout_s: float = 1800.0
    in_quick: bool = True


SUITE = [
    Bench("steady steps/s", "fit_vs_ddp.py",
          "steps/s from the second epoch on of Trainer.fit (EarlyStopping, ReduceLROnPlateau, TerminateOnNaN, "
          "BackupAndRestore) against a hand-written torchrun DDP loop and the same loop under Ray Train v2's "
          "TorchTrainer, same workload, interleaved repeats",
          # pairs of one run spread over +-20% on a 2-core VM: 9 of them for a median that means something
          # quick: fit and torchrun only (Ray Train's side takes 40 s a repeat here, its start-up alone 30 s)
          quick=["--epochs", "2", "--repeats", "2", "--no-ray-train"], full=["--epochs", "3", "--repeats", "9"]),
    Bench("realistic steps/s", "fit_vs_ddp.py",
          "steps/s from the second epoch on of the realistic configuration (loader workers 2, bf16-mixed, "
          "accumulation 2, warm-up + cosine per step) on all three sides: Trainer.fit, the hand-written loop "
          "under torchrun and under Ray Train v2, interleaved repeats; Ray Train / torchrun compares the same "
          "hand-written loop under Ray Train and under torchrun",
          # 10 epochs: with bf16 in hardware (avx512_bf16) an epoch takes 1.5 s here, 7 s without
          full=["--realistic", "--epochs", "10", "--repeats", "5"], in_quick=False),
    Bench("Ray's own cost", "fit_vs_ddp.py",
          "steps/s from the second epoch on of the realistic configuration: Trainer.fit, the hand-written loop "
          "under torchrun, and the same hand-written loop in two plain Ray actors on a Ray started as fit "
          "starts its own (no library around them): Ray actors / torchrun is what running inside Ray costs by "
          "itself, fit / Ray actors what fit costs inside Ray",
          full=["--realistic", "--epochs", "10", "--repeats", "5", "--no-ray-train", "--ray-actors"],
          in_quick=False),
    Bench("realistic like for like", "fit_vs_ddp.py",
          "steps/s from the second epoch on of the realistic configuration, Trainer.fit against the hand-written "
          "loop under torchrun whose loader workers use fit's sharing strategy (named shared-memory files): "
          "what fit's own work costs, with no setting of fit's own on its side only; beside them the same loop "
          "in plain Ray actors (what Ray costs); 18 repeats: each of the sides' six orders three times, and a "
          "90% interval for the median ratio narrower than 12 repeats give (benchmarks/spread.py)",
          full=["--realistic", "--epochs", "8", "--repeats", "18", "--no-ray-train", "--hand-sharing", "file_system",
                "--ray-actors"],
          in_quick=False),
    Bench("feature overhead", "features.py",
          "samples/s of Trainer.fit with each feature on (bf16-mixed, accumulation, loader workers, a per-step "
          "schedule, fsdp, all of the realistic configuration) against plain fit, beside the hand-written DDP "
          "loop with and without the same feature, interleaved repeats",
          full=["--epochs", "3", "--repeats", "3"], in_quick=False),  # about 3 minutes a repeat here
    Bench("epoch phases", "epoch_phases.py",
          "where a fit's epoch goes, from its events (the epoch, the gap between epochs, a backup's commit), "
          "with a backup every epoch and without, alternating, in the realistic configuration",
          full=["--realistic", "--epochs", "10", "--repeats", "5"], in_quick=False),  # about 4 minutes here
    Bench("CPU beside the ranks", "overhead.py",
          "CPU seconds per second (and per 1,000 steps) of every process of a steady Trainer.fit that starts its "
          "own Ray, by role: training ranks, coordinator, driver, gcs_server, raylet, agents, log monitor, "
          "other Ray workers",
          quick=["--epochs", "4", "--repeats", "1"], full=["--epochs", "20", "--repeats", "3"]),
    Bench("CPU per step beside the hand-written loop", "overhead.py",
          "CPU seconds per optimizer step of every process, by role, of the realistic configuration: Trainer.fit "
          "against the hand-written loop in two plain Ray actors on a Ray started as fit's, interleaved repeats",
          full=["--realistic", "--hand", "--epochs", "12", "--repeats", "3"], in_quick=False),  # about 4.5 minutes
    Bench("rank step overhead", "rank_overhead.py",
          "per-step CPU time of one rank's TrainLoop beside a hand-written DDP loop in one process (no Ray), "
          "blocks interleaved, with a timed breakdown of where the extra time goes",
          quick=["--blocks", "6", "--steps", "32"], timeout_s=900),
    Bench("realistic rank step overhead", "rank_overhead.py",
          "the same in the realistic configuration, like for like: the hand-written loop's loader workers send "
          "batches as fit's do (named shared-memory files)",
          full=["--realistic", "--hand-sharing", "file_system"], timeout_s=900, in_quick=False),  # about 1 minute
    Bench("two ranks without Ray", "two_ranks.py",
          "wall time per optimizer step of TrainLoop beside the hand-written DDP loop on two gloo ranks (two "
          "processes, no Ray), blocks interleaved, plain and realistic (like for like: the hand-written loop's "
          "loader workers send batches as fit's do): the loop's own share of fit's gap",
          quick=["--blocks", "3", "--configs", "plain"], full=["--hand-sharing", "file_system"], timeout_s=900),
    Bench("validation notices", "validation_notices.py",
          "time of a validation pass that watches for preemption notices (2 gloo ranks, no Ray): the notices "
          "checked every round against the default pace (rounds 0 and 1, then about every 0.5 s), alternating",
          quick=["--repeats", "10"]),
    Bench("start-up", "startup.py",
          "from the command's start to the first completed step, each tool a fresh process as a user starts it: "
          "a script calling Trainer.fit (which starts its own local Ray), torchrun, a script calling Ray Train "
          "v2's TorchTrainer.fit; interleaved repeats",
          quick=["--repeats", "1", "--steps", "4"], full=["--repeats", "6"]),  # a quick repeat: about 65 s
    Bench("recovery", "recovery.py",
          "SIGKILL of a worker to the next completed step, and lost steps: Trainer.fit (live recovery, and "
          "warm_standbys=False) against Ray Train v2 TorchTrainer",
          full=["--repeats", "3"], in_quick=False),  # over 3 minutes for one repeat here
    Bench("backup stall and persist", "backup_io.py",
          "training stall per backup against memcpy, persist time against a raw fsspec write",
          quick=["--params-millions", "10", "--repeats", "3", "--persist-repeats", "1", "--file-repeats", "2",
                 "--skip-s3"]),
    Bench("fsdp backup", "fsdp_backup.py", "per-rank backup stall, persist and bytes, fsdp against ddp",
          quick=["--params-millions", "2", "--repeats", "1"]),
    Bench("warm workers", "reuse_workers.py", "repeated short fits: workers reused across fits against cold starts",
          quick=["--fits", "2", "--rounds", "1"]),
    Bench("coordinator fan-in", "coordinator_fanin.py",
          "time per sync point: the per-rank fan-in of N concurrent callers into one coordinator actor "
          "against the aggregated path (one combined report from rank 0)",
          quick=["--ranks", "128", "1024", "--repeats", "1"], full=["--ranks", "1024", "8192", "--repeats", "3"]),
    Bench("goodput", "goodput.py", "simulated goodput at 1k-16k GPUs from the measured costs",
          quick=["--runs", "3"]),
]


@dataclass
class Section:
    """One script's part of the report: its command as run, wall seconds, exit status, output."""

    bench: Bench
    command: str
    seconds: float
    status: int | str
    output: str


_SECTION = re.compile(r"^## (?P<name>[^\n]+)\n\n[^\n]*\n\n`(?P<command>[^`]+)` \((?P<seconds>\d+) s, (?P<status>[^)]*)\)"
                      r"\n\n```\n(?P<output>.*?)\n```$", re.S | re.M)


def parse(report: str) -> tuple[list[str], dict[str, Section]]:
    """The header lines above the table, in order, and the sections, by name, of a report this module
    wrote (sections of scripts no longer in the suite are dropped)."""
    header = report.split("\n| figure |", 1)[0].rstrip("\n").splitlines()
    by_name = {bench.name: bench for bench in SUITE}
    sections = {}
    for match in _SECTION.finditer(report):
        if match["name"] in by_name:
            status = match["status"]
            sections[match["name"]] = Section(by_name[match["name"]], match["command"], float(match["seconds"]),
                                              0 if status == "ok" else status.removeprefix("exit "), match["output"])
    return header, sections


def versions() -> str:
    """Python, torch and ray versions, without importing torch or ray into this process."""
    code = "import torch, ray; print(torch.__version__, ray.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split()
    torch_v, ray_v = (out + ["?", "?"])[:2]
    return f"python {platform.python_version()}, torch {torch_v}, ray {ray_v}"


def machine() -> str:
    """CPU model, cores and memory of this machine (Linux), or what platform knows."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))
        memory = f", {mem_kb / 2**20:.0f} GiB memory"
    except (OSError, StopIteration, ValueError):
        memory = ""
    return f"{platform.system()} {platform.release()}, {model}, {os.cpu_count()} CPUs{memory}"


def run(bench: Bench, quick: bool) -> tuple[list[str], float, int | str, str]:
    """Run one script: (its command, wall seconds, exit status or "timed out", its output)."""
    args = bench.quick if quick else bench.full
    cmd = [sys.executable, str(HERE / bench.script), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.setdefault("RAY_ADDRESS", "local")  # each script starts its own Ray, never joins one running here
    timeout = bench.timeout_s / 3 if quick else bench.timeout_s
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        status: int | str = done.returncode
        output = done.stdout + (f"\n[stderr, last lines]\n{_tail(done.stderr)}" if done.returncode else "")
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {timeout:.0f} s"
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    return ["python", f"benchmarks/{bench.script}", *args], time.monotonic() - start, status, output.rstrip()


def _tail(text: str, lines: int = 15) -> str:
    kept = [line for line in text.splitlines() if "WARNING" not in line and "token" not in line.lower()]
    return "\n".join(kept[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller sizes (under 5 minutes)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (script names without .py)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"), help="the report to write")
    parser.add_argument("--note", default="", help="a line added to the report (e.g. that the machine was shared)")
    parser.add_argument("--update", action="store_true",
                        help="with --only: replace those scripts' sections in the report at --out, keep the others")
    args = parser.parse_args(argv)
    if args.update and not args.only:
        parser.error("--update re-runs the scripts named by --only: give --only NAME ...")
    if args.update and not Path(args.out).exists():
        parser.error(f"--update needs an existing report at --out ({args.out}); run without --update first")
    chosen = [b for b in SUITE if (Path(b.script).stem in args.only or b.name in args.only) if args.only] \
        if args.only else [b for b in SUITE if b.in_quick or not args.quick]
    skipped = [b for b in SUITE if b not in chosen]
    command = "python -m benchmarks" + "".join(f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    began = time.monotonic()
    sections = []
    for bench in chosen:
        print(f"== {bench.name} (benchmarks/{bench.script})", flush=True)
        cmd, seconds, status, output = run(bench, args.quick)
        print(output, flush=True)
        print(f"-- {seconds:.0f} s, exit {status}", flush=True)
        sections.append(Section(bench, " ".join(cmd), seconds, status, output))
    total = time.monotonic() - began
    if args.update:
        report = update(Path(args.out).read_text(), command, sections, total)
    else:
        report = render(command, sections, total, args.quick, args.note, skipped)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(f"wrote {args.out} ({total:.0f} s)")
    return 0 if all(s.status == 0 for s in sections) else 1


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def render(command: str, sections: list[Section], total: float, quick: bool, note: str, skipped: list[Bench]) -> str:
    """docs/BENCHMARKS.md: the header, then one section per script with its output as printed."""
    header = ["# Benchmarks", "",
              f"Written by `{command}` on {_now()} in {total:.0f} s ({'quick mode' if quick else 'full mode'}).",
              "Each section is one script's output as it printed it, with its medians and spread; re-run the "
              "command to refresh this page.", "",
              f"- machine: {machine()}", f"- versions: {versions()}"]
    if note:
        header.append(f"- note: {note}")
    rows = [f"| {bench.name} | `{bench.script}` | - | not run ({'full mode only' if quick else 'not chosen'}) |"
            for bench in skipped]
    return _page(header, sections, rows)


def update(report: str, command: str, sections: list[Section], total: float) -> str:
    """``report`` with the sections of ``sections`` replaced (or added, in the suite's order), and a header
    line that says which were re-run, by what command, when."""
    header, kept = parse(report)
    kept.update({section.bench.name: section for section in sections})
    rerun = {section.bench.name for section in sections}
    header = [line for line in (_without(line, rerun) for line in header) if line is not None]
    names = ", ".join(section.bench.name for section in sections)
    header.append(f"- re-run: {names}, by `{command}` on {_now()} in {total:.0f} s (the other sections as above)")
    rows = [f"| {bench.name} | `{bench.script}` | - | not run |" for bench in SUITE if bench.name not in kept]
    return _page(header, [kept[bench.name] for bench in SUITE if bench.name in kept], rows)


def _without(line: str, names: set[str]) -> str | None:
    """A header line, less the names of sections re-run since (a ``re-run`` line left with none: None)."""
    match = re.match(r"- re-run: (?P<names>.*?), by (?P<rest>`.*)$", line)
    if match is None:
        return line
    left = [name for name in match["names"].split(", ") if name not in names]
    return f"- re-run: {', '.join(left)}, by {match['rest']}" if left else None


def _page(header: list[str], sections: list[Section], not_run: list[str]) -> str:
    lines = header + ["", "| figure | script | wall time | status |", "| --- | --- | --- | --- |"]
    for section in sections:
        lines.append(f"| {section.bench.name} | `{section.bench.script}` | {section.seconds:.0f} s | "
                     f"{_status(section.status)} |")
    lines += not_run
    for section in sections:
        lines += ["", f"## {section.bench.name}", "", section.bench.measures + ".", "",
                  f"`{section.command}` ({section.seconds:.0f} s, {'ok' if section.status == 0 else f'exit {section.status}'})",
                  "", "```", section.output or "(no output)", "```"]
    return "\n".join(lines) + "\n"


def _status(status: int | str) -> str:
    return "ok" if status == 0 else str(status)


if __name__ == "__main__":
    sys.exit(main())
