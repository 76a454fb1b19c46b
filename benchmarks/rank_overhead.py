"""What one training rank does per step beyond a hand-written DDP loop, in one process (no Ray).

    python benchmarks/rank_overhead.py [--steps 64] [--blocks 20] [--warmup 2] [--threads 1] [--realistic]
                                       [--hand-sharing file_system]

A one-rank gloo group (file:// store in a temporary folder) and the benchmark workload
(benchmarks/workload.py: MLP 256-512-512-10, batch 64, SGD with momentum, cross-entropy and
accuracy). Two loops take turns, block by block (hand fit fit hand hand fit ...), each block ``--steps`` optimizer steps:

- **hand**: the loop benchmarks/ddp_baseline.py writes: DDP forward, loss, backward, optimizer step,
  ``zero_grad``, the step's loss / accuracy / count summed on the device;
- **fit**: :class:`~orchestrator.loop.train_loop.TrainLoop.run`, the loop every rank of ``fit``
  runs, with an in-process link that answers every sync point with no decision; an epoch is one
  block (``steps_per_epoch=--steps``, no validation data), timed from the epoch-begin sync point's
  answer to the epoch-end report.

``--realistic``: both loops run workload.REALISTIC (as benchmarks/ddp_baseline.py --realistic does):
two persistent DataLoader worker processes, bf16 autocast, two micro-batches per optimizer step (DDP
``no_sync`` on the first) and the warm-up + cosine LambdaLR stepped every optimizer step. The loader
workers' CPU time (from /proc, user + system) is then printed per optimizer step for each loop too:
it is spent in other processes, which compete with the ranks for the cores. Fit's loader workers
send batches as named shared-memory files (orchestrator/loop/data.py); the hand-written loop's use
torch's default unless ``--hand-sharing file_system`` gives them fit's setting (like for like: the
receiving side's cost then counts the same on both).

A hand block runs inside the fit loop's epoch-begin or epoch-end sync call, so the two alternate in
the same process under the same load. Per block the main thread's CPU time (``time.thread_time``:
this thread's CPU, not the time other processes hold the cores) is divided by the block's steps; the medians over the
blocks (after ``--warmup`` blocks of each) and their ratio are printed, then a breakdown: a second
run with timers (thread CPU time, exclusive of nested timed parts) around the parts of each loop's
step, per step, side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ddp_baseline  # noqa: E402
import workload  # noqa: E402

from orchestrator.core.config import LoopConfig  # noqa: E402
from orchestrator.decisions import ReportKind  # noqa: E402
from orchestrator.loop import live as live_module  # noqa: E402
from orchestrator.loop import optim_step as optim_module  # noqa: E402
from orchestrator.loop import rank_state, signalled  # noqa: E402
from orchestrator.loop.specs import TrainSpec  # noqa: E402
from orchestrator.loop import train_loop as train_loop_module  # noqa: E402
from orchestrator.loop.train_loop import TrainLoop  # noqa: E402


class Parts:
    """Thread-CPU timers by label, exclusive of the timed parts nested inside, into the ``hand`` or the
    ``fit`` sums (whichever ``sink`` is; nothing while it is None). A timer's own cost (see
    :meth:`overhead`) lands in the part around it, or in "other"."""

    def __init__(self) -> None:
        self.sink: dict[str, float] | None = None  # where the parts timed now go (None: not timing)
        self.hand: dict[str, float] = {}
        self.fit: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open part: [start, time of its timed children]

    def begin(self) -> list[float] | None:
        if self.sink is None:
            return None
        frame = [time.thread_time(), 0.0]
        self._stack.append(frame)
        return frame

    def end(self, frame: list[float] | None, label: str) -> None:
        if frame is None:
            return
        spent = time.thread_time() - frame[0]
        self._stack.pop()
        self.sink[label] = self.sink.get(label, 0.0) + spent - frame[1]
        if self._stack:
            self._stack[-1][1] += spent

    def part(self, label: str) -> "_Part":
        """``with parts.part(label):`` times the block."""
        return _Part(self, label)

    def wrap(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = self.begin()
            try:
                return fn(*args, **kwargs)
            finally:
                self.end(frame, label)
        return timed

    def patch(self, owner: Any, name: str, label: str | None = None) -> None:
        """Time ``owner.name`` (a class's method, a module's function, an instance's attribute) if it exists."""
        if hasattr(owner, name):
            setattr(owner, name, self.wrap(getattr(owner, name), label or name))

    def overhead(self, calls: int = 20000) -> float:
        """Seconds of thread CPU one timed call of a no-op costs beyond the no-op itself."""
        noop = lambda: None  # noqa: E731
        timed, sink = self.wrap(noop, "calibration"), self.sink
        self.sink = {}
        start = time.thread_time()
        for _ in range(calls):
            timed()
        wrapped = time.thread_time() - start
        start = time.thread_time()
        for _ in range(calls):
            noop()
        self.sink = sink
        return (wrapped - (time.thread_time() - start)) / calls


class _Part:
    def __init__(self, parts: Parts, label: str) -> None:
        self.parts, self.label = parts, label

    def __enter__(self) -> None:
        self.frame = self.parts.begin()

    def __exit__(self, *exc: Any) -> None:
        self.parts.end(self.frame, self.label)


PARTS = Parts()


class HandLoop:
    """benchmarks/ddp_baseline.py's loop, run ``steps`` optimizer steps at a time (``realistic``: its
    ``--realistic`` variant; one data pass then spans blocks, as the fit loop's epochs do)."""

    def __init__(self, steps: int, realistic: bool = False, total_steps: int = 1, rank: int = 0,
                 world_size: int = 1, sharing: str | None = None) -> None:
        self.steps, self.realistic = steps, realistic
        real = workload.REALISTIC if realistic else {}
        self.accumulate = real.get("accumulate_grad_batches", 1)
        torch.manual_seed(0)
        self.model = workload.build_model()
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = workload.make_optimizer(self.model.parameters())
        self.schedule = workload.warmup_cosine(self.optimizer, total_steps) if realistic else None
        train_ds, _ = workload.load_data()
        self.sampler = DistributedSampler(train_ds, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
        workers = real.get("loader_workers", 0)
        self.loader = DataLoader(train_ds, batch_size=workload.BATCH, sampler=self.sampler, num_workers=workers,
                                 persistent_workers=workers > 0, worker_init_fn=ddp_baseline.share_as(sharing))
        self.block = 0
        self.data_pass = 0
        self._batches: Any = None

    def _next(self) -> Any:
        if self._batches is None or not self.realistic:  # plain: a fresh pass per block (as before)
            self.sampler.set_epoch(self.data_pass if self.realistic else self.block)
            self._batches = iter(self.loader)
        batch = next(self._batches, None)
        if batch is None:  # the pass ended: the next one
            self.data_pass += 1
            self._batches = None
            return self._next()
        return batch

    def run_block(self) -> None:
        if self.realistic:
            return self._run_realistic()
        part, loss_fn = PARTS.part, torch.nn.functional.cross_entropy
        self.block += 1
        self.ddp.train()
        total = torch.zeros(3, dtype=torch.float64)
        self.sampler.set_epoch(self.block - 1)
        batches = iter(self.loader)
        for _ in range(self.steps):
            with part("data"):
                x, y = next(batches)
            with part("train_step"):
                out = self.ddp(x)
                loss = loss_fn(out, y)
            with part("backward"):
                loss.backward()
            with part("optimizer.step"):
                self.optimizer.step()
            with part("zero_grad"):
                self.optimizer.zero_grad()
            with part("metric sums"):
                total += torch.stack([loss.detach().double() * len(y), (out.argmax(1) == y).double().sum(),
                                      torch.tensor(len(y), dtype=torch.float64)])
        float(total[0] / total[2])

    def _run_realistic(self) -> None:
        part, loss_fn, k = PARTS.part, torch.nn.functional.cross_entropy, self.accumulate
        self.block += 1
        self.ddp.train()
        total = torch.zeros(3, dtype=torch.float64)
        for _ in range(self.steps):
            for i in range(k):
                with part("data"):
                    x, y = self._next()
                with (contextlib.nullcontext() if i == k - 1 else self.ddp.no_sync()), \
                        torch.autocast("cpu", dtype=torch.bfloat16):
                    with part("train_step"):
                        out = self.ddp(x)
                        loss = loss_fn(out, y)
                    with part("backward"):
                        (loss / k).backward()
                with part("metric sums"):
                    total += torch.stack([loss.detach().double() * len(y), (out.argmax(1) == y).double().sum(),
                                          torch.tensor(len(y), dtype=torch.float64)])
            with part("optimizer.step"):
                self.optimizer.step()
            with part("zero_grad"):
                self.optimizer.zero_grad()
            with part("lrs.end_step"):
                self.schedule.step()
        float(total[0] / total[2])


def worker_cpu(loader: DataLoader | None) -> float:
    """CPU seconds (user + system, from /proc) of ``loader``'s live worker processes so far."""
    iterator = getattr(loader, "_iterator", None)
    total = 0.0
    for process in getattr(iterator, "_workers", None) or []:
        try:
            with open(f"/proc/{process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


class TimedLoop(TrainLoop):
    """TrainLoop with timers around the parts of its step (they count only in the breakdown run)."""

    def _build(self) -> None:
        super()._build()
        step = self.optim_step
        PARTS.patch(step, "train_step")
        PARTS.patch(self.optimizer, "step", "optimizer.step")
        PARTS.patch(self.optimizer, "zero_grad")


def patch_classes() -> None:
    """Timers around the parts of fit's step that live on classes and modules (breakdown run only)."""
    PARTS.patch(torch.Tensor, "backward")
    PARTS.patch(torch.autograd, "backward")
    PARTS.patch(optim_module.OptimStep, "run", "OptimStep.run (rest)")
    PARTS.patch(optim_module, "move_to")
    PARTS.patch(optim_module, "split_output")
    PARTS.patch(optim_module.LearningRates, "end_step", "lrs.end_step")
    PARTS.patch(signalled.DdpSignals, "term", "signals.term")
    PARTS.patch(signalled.DdpSignals, "collect", "signals.collect (+ gradient check)")
    PARTS.patch(rank_state.Accumulator, "add", "metric sums")
    PARTS.patch(rank_state.Accumulator, "add_values", "metric sums")
    PARTS.patch(rank_state.MetricSums, "see", "metric sums (see)")
    PARTS.patch(rank_state.Position, "advance", "position.advance")
    PARTS.patch(live_module.LiveState, "mark", "live.mark")
    PARTS.patch(live_module.LiveState, "unmark", "live.unmark")
    PARTS.patch(live_module.LiveState, "started", "live.started")
    PARTS.patch(TrainLoop, "_maybe_progress", "progress")
    groups = train_loop_module.micro_batch_groups

    def timed_groups(*args: Any, **kwargs: Any) -> Iterator[Any]:
        batches, done = groups(*args, **kwargs), object()
        while True:
            with PARTS.part("data"):
                item = next(batches, done)
            if item is done:
                return
            yield item

    train_loop_module.micro_batch_groups = timed_groups


class BenchLink:
    """The in-process coordinator link: no decisions; runs the hand blocks between the fit epochs and times both.

    The hand blocks run in the order hand, fit, fit, hand, hand, fit, ... (each loop goes first as often
    as second): before a fit epoch at its epoch-begin sync point, or after it at its epoch-end one.
    ``clock`` times the blocks: this thread's CPU time, or the wall clock (benchmarks/two_ranks.py,
    where a rank's waits for its peer are part of the cost); ``hand_cpu`` and ``fit_cpu`` hold this
    thread's CPU time per step of the same blocks whatever the clock.
    """

    def __init__(self, hand: HandLoop, warmup: int, breakdown: bool,
                 clock: Callable[[], float] = time.thread_time) -> None:
        self.hand, self.warmup, self.breakdown, self.clock = hand, warmup, breakdown, clock
        self.loop: TrainLoop | None = None  # the fit loop (its loader's workers are measured)
        self.fit_worker_cpu = 0.0  # loader workers' CPU seconds at the end of the fit run
        self.hand_times: list[float] = []
        self.fit_times: list[float] = []
        self.hand_cpu: list[float] = []
        self.fit_cpu: list[float] = []
        self._fit_start: float | None = None
        self._fit_cpu_start = 0.0
        self._fit_first_step = 0
        self.blocks = 0  # fit blocks done
        self.fit_steps = 0  # timed fit steps (an epoch at the data pass's end may be shorter)
        self.fit_seconds = 0.0

    def sync(self, report: Any) -> list[Any]:
        now, cpu = self.clock(), time.thread_time()
        PARTS.sink = None
        if report.kind == ReportKind.TRAIN_END and self.loop is not None:
            self.fit_worker_cpu = worker_cpu(getattr(self.loop, "train_loader", None))
        if report.kind == ReportKind.EPOCH_END and self._fit_start is not None:
            steps = report.global_step - self._fit_first_step
            if self.blocks >= self.warmup:
                self.fit_times.append((now - self._fit_start) / steps)
                self.fit_cpu.append((cpu - self._fit_cpu_start) / steps)
                self.fit_steps += steps
                self.fit_seconds += now - self._fit_start
            self.blocks += 1
            if self.blocks % 2 == 0:
                self._hand_block()
        if report.kind == ReportKind.EPOCH_BEGIN:
            if self.blocks % 2 == 0:
                self._hand_block()
            PARTS.sink = PARTS.fit if self.breakdown and self.blocks >= self.warmup else None
            self._fit_first_step = report.global_step
            self._fit_start, self._fit_cpu_start = self.clock(), time.thread_time()
        return []

    def _hand_block(self) -> None:
        timing = self.blocks >= self.warmup
        PARTS.sink = PARTS.hand if self.breakdown and timing else None
        start, cpu = self.clock(), time.thread_time()
        self.hand.run_block()
        if timing:
            self.hand_times.append((self.clock() - start) / self.hand.steps)
            self.hand_cpu.append((time.thread_time() - cpu) / self.hand.steps)
        PARTS.sink = None

    def progress(self, epoch: int, step: int, logs: dict[str, float]) -> None:
        pass

    def persisted(self, rank: int, folder: str, entries: Any, meta: dict[str, Any]) -> None:
        pass

    def heartbeat(self) -> None:
        pass


def run(steps: int, blocks: int, warmup: int, breakdown: bool = False, realistic: bool = False, rank: int = 0,
        world_size: int = 1, clock: Callable[[], float] = time.thread_time, hand_sharing: str | None = None) -> BenchLink:
    """Alternate ``warmup + blocks`` hand and fit blocks of ``steps`` steps on this ``rank`` of the formed
    group; the link holds the times by ``clock`` (and ``PARTS`` the timed parts, with ``breakdown``)."""
    total_steps = (warmup + blocks) * steps
    hand = HandLoop(steps, realistic, total_steps, rank, world_size, hand_sharing)
    link = BenchLink(hand, warmup, breakdown, clock)
    real: dict[str, Any] = {}
    if realistic:
        r = workload.REALISTIC
        real = dict(loader_workers=r["loader_workers"], precision=r["precision"],
                    accumulate_grad_batches=r["accumulate_grad_batches"], lr_scheduler_interval="step",
                    lr_scheduler=functools.partial(workload.warmup_cosine, total_steps=total_steps))
    config = LoopConfig(model=workload.build_model, optimizer=workload.make_optimizer,
                        data=lambda: (workload.load_data()[0], None), loss=torch.nn.functional.cross_entropy,
                        metrics={"accuracy": "accuracy"}, batch_size=workload.BATCH, seed=0, steps_per_epoch=steps,
                        **real)
    spec = TrainSpec(loop=config, epochs=warmup + blocks)
    loop = (TimedLoop if breakdown else TrainLoop)(spec, rank=rank, world_size=world_size, device=torch.device("cpu"),
                                                   link=link)
    link.loop = loop
    loop.run()
    link.hand_worker_cpu = worker_cpu(hand.loader)
    return link


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps per block")
    parser.add_argument("--blocks", type=int, default=20, help="timed blocks of each loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed blocks of each loop first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--realistic", action="store_true",
                        help="workload.REALISTIC: loader workers, bf16 autocast, accumulation, warm-up + cosine")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the second, timed-parts run")
    parser.add_argument("--hand-sharing", choices=["file_descriptor", "file_system"], default=None,
                        help="the hand-written loop's loader workers use this torch sharing strategy (default: torch's; "
                        "fit's use file_system): like for like with file_system")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} torch thread(s)")
    print(f"settings: steps per block {args.steps}, timed blocks {args.blocks} of each loop (after "
          f"{args.warmup} warm-up), world size 1 (gloo, file:// store), model MLP {workload.FEATURES}-512-512-"
          f"{workload.CLASSES}, batch {workload.BATCH}, SGD lr {workload.LR} momentum 0.9, metrics: accuracy; "
          f"{workload.REALISTIC if args.realistic else 'plain fp32, 1 micro-batch, constant lr'}"
          + (f"; loader workers' sharing strategy: fit file_system, hand-written loop "
             f"{args.hand_sharing or 'torch default (' + torch.multiprocessing.get_sharing_strategy() + ')'}"
             if args.realistic else ""))
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            link = run(args.steps, args.blocks, args.warmup, realistic=args.realistic,
                       hand_sharing=args.hand_sharing)
            hand, fit = statistics.median(link.hand_times), statistics.median(link.fit_times)
            print("\nper-step main-thread CPU time, median over blocks (ms):")
            print(f"  hand-written DDP loop  {_ms(hand)}  (blocks: min {_ms(min(link.hand_times))}, "
                  f"max {_ms(max(link.hand_times))})")
            print(f"  TrainLoop (fit)        {_ms(fit)}  (blocks: min {_ms(min(link.fit_times))}, "
                  f"max {_ms(max(link.fit_times))})")
            print(f"  fit / hand CPU per step {fit / hand:.3f}  (steps/s ratio fit/hand {hand / fit:.3f})")
            if args.realistic:
                steps = (args.warmup + args.blocks) * args.steps
                print("  loader worker processes' CPU per optimizer step, whole run (ms): "
                      f"hand {_ms(link.hand_worker_cpu / steps)}, fit {_ms(link.fit_worker_cpu / steps)}")
            if not args.no_breakdown:
                patch_classes()
                link = run(args.steps, args.blocks, args.warmup, breakdown=True, realistic=args.realistic,
                       hand_sharing=args.hand_sharing)
                _print_breakdown(link)
        finally:
            dist.destroy_process_group()


def _print_breakdown(link: BenchLink) -> None:
    """The timed parts per step; "other" is the block's time outside every timed part (loop code)."""
    hand_total, fit_total = sum(link.hand_times) / len(link.hand_times), link.fit_seconds / link.fit_steps
    hand_steps = len(link.hand_times) * link.hand.steps
    print("\nbreakdown (second run, with timers; ms per step, thread CPU, exclusive of nested parts):")
    print(f"  {'part':<26}{'hand':>9}{'fit':>9}{'fit-hand':>10}")
    hand_rows = {k: v / hand_steps for k, v in PARTS.hand.items()}
    fit_rows = {k: v / link.fit_steps for k, v in PARTS.fit.items()}
    hand_rows["other"] = hand_total - sum(hand_rows.values())
    fit_rows["other"] = fit_total - sum(v for k, v in fit_rows.items())
    labels = sorted(set(hand_rows) | set(fit_rows), key=lambda k: -(fit_rows.get(k, 0.0) - hand_rows.get(k, 0.0)))
    for label in labels:
        h, f = hand_rows.get(label, 0.0), fit_rows.get(label, 0.0)
        print(f"  {label:<26}{_ms(h):>9}{_ms(f):>9}{_ms(f - h):>10}")
    print(f"  (each timed part costs about {PARTS.overhead() * 1e6:.1f} us of timer, counted in the part around it)")
    print(f"  {'total (all blocks)':<26}{_ms(hand_total):>9}{_ms(fit_total):>9}{_ms(fit_total - hand_total):>10}")


if __name__ == "__main__":
    main()
