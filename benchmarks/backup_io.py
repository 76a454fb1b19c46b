"""Backup I/O benchmark: how close the two-phase save comes to raw memcpy and raw fsspec writes.

Run (CPU only, one process; starts its own moto S3 server on 127.0.0.1)::

    python benchmarks/backup_io.py [--params-millions 60] [--repeats 5] [--persist-repeats 3]

For a stack of ``nn.Linear`` layers with about ``--params-millions`` parameters and
``torch.optim.Adam`` (one step taken, so ``exp_avg`` / ``exp_avg_sq`` exist) it measures:

(a) stall ratio = phase 1 (``StagingArea.stage`` of the tree ``RankSaver.backup`` stages on
    rank 0, timed on the 2nd and later saves so the buffers are reused; median) divided by
    ``state bytes / memcpy rate``, the memcpy rate being ``dst.copy_(src)`` of the same tensors
    into preallocated buffers (median). Target <= 1.5. Stage and memcpy timings alternate; the
    "paired ratio" (median of stage_i / memcpy_i over adjacent pairs) is printed as well, since
    memory bandwidth on a shared VM swings by several times from one second to the next.
(b) persist ratio = ``AsyncPersister`` submit -> ``wait()`` (torch.save streamed into storage with
    the manifest's CRC-32 computed on the way; median)
    divided by ``RunStorage.write_bytes`` of the same files pre-serialized (median), on
    ``file://`` (a temporary directory) and on ``s3://`` (moto). Target <= 1.3. Local disk
    timings on a shared VM swing by 2-3x from one write to the next (page-cache writeback), so the
    ratio of the best persist to the best raw write is printed too.

It also prints a breakdown of the persist CPU time (torch.save into BytesIO with and without torch's
zip CRC-32, CRC-32 and SHA-256 of the result) and a plain ``fs.pipe_file`` for reference. Everything goes to stdout.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import logging
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from orchestrator.loop.rank_state import MetricSums, Position, Snapshots, rank_components  # noqa: E402
from orchestrator.loop.saver import RankSaver  # noqa: E402
from orchestrator.loop.specs import LoopResult  # noqa: E402
from orchestrator.storage.checkpoint import SHARED_FILE  # noqa: E402
from orchestrator.loop.state_io import AsyncPersister, StagingArea, save_to  # noqa: E402
from orchestrator.storage.fs import RunStorage, StorageSpec  # noqa: E402

STALL_TARGET = 1.5
PERSIST_TARGET = 1.3
WIDTH = 2048
S3_KEY = S3_SECRET = "testing"
S3_REGION = "us-east-1"


# -- helpers ---------------------------------------------------------------------------------
def to_bytes(obj: Any) -> bytes:
    """What the persister writes for ``obj``, in memory (the raw writes' payload)."""
    buf = io.BytesIO()
    save_to(obj, buf, zip_crc=False)
    return buf.getvalue()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def rss_gb() -> float:
    """Current resident set size of this process, GB (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except OSError:
        return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def free_memory() -> None:
    gc.collect()


def leaves(node: Any) -> list[torch.Tensor]:
    if isinstance(node, torch.Tensor):
        return [node]
    if isinstance(node, dict):
        return [t for v in node.values() for t in leaves(v)]
    if isinstance(node, (list, tuple)):
        return [t for v in node for t in leaves(v)]
    return []


def fmt_s(x: float) -> str:
    return f"{x:.3f}"


# -- the workload ----------------------------------------------------------------------------
def build(params_millions: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    per_layer = WIDTH * WIDTH + WIDTH
    layers = max(1, round(params_millions * 1e6 / per_layer))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(8, WIDTH)
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # grads are not part of the state; free them
    return model, optimizer


def backup_tree(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What RankSaver.backup stages on rank 0: the files of a training rank's components."""
    components = rank_components(model, optimizer, snapshots=Snapshots(), position=Position(),
                                 metric_sums=MetricSums(torch.device("cpu")), result=LoopResult(rank=0))
    saver = RankSaver(components, rank=0, world_size=1, storage=None, on_persisted=lambda *_: None)
    return saver.files(coordinator_state={})


# -- (a) stall -------------------------------------------------------------------------------
def measure_stall(model: nn.Module, optimizer: torch.optim.Optimizer, repeats: int) -> dict[str, Any]:
    """Stage timings and memcpy timings, interleaved so that machine drift hits both alike."""
    area = StagingArea()
    staged = area.stage(backup_tree(model, optimizer))  # save 0 allocates the buffers; not timed
    state_bytes = area.staged_bytes
    # memcpy reference: the same source tensors into preallocated buffers, pages faulted in once.
    srcs = leaves(backup_tree(model, optimizer))
    dsts = [torch.empty_like(s) for s in srcs]
    memcpy_bytes = sum(s.numel() * s.element_size() for s in srcs)

    def memcpy() -> None:
        for d, s in zip(dsts, srcs):
            d.copy_(s)

    memcpy()
    stage_s, full_s, copy_s = [], [], []
    for i in range(repeats):
        if i % 2:
            t0 = time.perf_counter()
            memcpy()
            copy_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tree = backup_tree(model, optimizer)  # RankSaver's stall also includes building the tree
        t1 = time.perf_counter()
        staged = area.stage(tree)
        t2 = time.perf_counter()
        stage_s.append(t2 - t1)
        full_s.append(t2 - t0)
        del tree
        if not i % 2:
            t0 = time.perf_counter()
            memcpy()
            copy_s.append(time.perf_counter() - t0)
    del srcs, dsts
    free_memory()
    rate = memcpy_bytes / median(copy_s)
    ideal = state_bytes / rate
    return {"area": area, "staged": staged, "state_bytes": state_bytes, "tensors": len(leaves(staged)),
            "memcpy_gbs": rate / 1e9, "memcpy_s": median(copy_s), "stage_s": median(stage_s),
            "full_s": median(full_s), "stall_ratio": median(stage_s) / ideal,
            "full_ratio": median(full_s) / ideal, "stage_all": stage_s, "copy_all": copy_s,
            # stage_i / memcpy_i of the adjacent pair, scaled to bytes: robust to slow drift of the machine
            "paired_ratio": median([(st / state_bytes) / (cp / memcpy_bytes) for st, cp in zip(stage_s, copy_s)])}


# -- (b) persist -----------------------------------------------------------------------------
def settle(storage: RunStorage) -> None:
    """Between timings: free memory and (locally) flush other dirty pages, so each timing pays only for its own."""
    free_memory()
    if storage.is_local:
        os.sync()


def measure_persist(storage: RunStorage, staged: dict[str, Any], repeats: int, warmup: bool) -> dict[str, Any]:
    done: list[Any] = []
    persister = AsyncPersister(storage.write_stream, lambda folder, entries, meta: done.append(entries))
    blobs = {name: to_bytes(obj) for name, obj in staged.items()}  # the raw writes' payload
    total = sum(len(b) for b in blobs.values())
    storage.makedirs("bench")
    storage.write_bytes("bench/warmup", b"x")  # connection / directory setup outside the timings

    def raw_write(folder: str) -> None:
        for name, data in blobs.items():
            storage.write_bytes(f"{folder}/{name}", data)

    if warmup:  # the first big write into a fresh directory / disk region is often much slower
        raw_write("bench/warmup-raw")
        persister.submit("bench/warmup-persist", staged, {"step": -1})
        persister.wait()
        storage.rm("bench/warmup-raw", recursive=True)
        storage.rm("bench/warmup-persist", recursive=True)

    persist_s, raw_s = [], []
    for i in range(repeats):  # interleaved, so drift (page cache, server memory) hits both alike
        folder = f"bench/raw-{uuid.uuid4().hex[:8]}"
        settle(storage)
        t0 = time.perf_counter()
        raw_write(folder)
        raw_s.append(time.perf_counter() - t0)
        storage.rm(folder, recursive=True)

        folder = f"bench/persist-{uuid.uuid4().hex[:8]}"
        settle(storage)
        t0 = time.perf_counter()
        persister.submit(folder, staged, {"step": i})
        persister.wait()
        persist_s.append(time.perf_counter() - t0)
        assert done and done[-1] is not None and sum(e.size for e in done[-1]) == persister.timing.bytes_written
        storage.rm(folder, recursive=True)

    # Plain fs.pipe_file of the same bytes (no temp file, no fsync locally; no retry wrapper).
    pipe_s = []
    for _ in range(repeats):
        folder = storage.path(f"bench/pipe-{uuid.uuid4().hex[:8]}")
        if not storage.is_object_store:
            storage.fs.makedirs(folder, exist_ok=True)
        settle(storage)
        t0 = time.perf_counter()
        for name, data in blobs.items():
            storage.fs.pipe_file(f"{folder}/{name}", data)
        pipe_s.append(time.perf_counter() - t0)
        storage.fs.rm(folder, recursive=True)
    storage.rm("bench", recursive=True)
    del blobs
    free_memory()
    return {"bytes": total, "persist_s": median(persist_s), "raw_s": median(raw_s),
            "pipe_s": median(pipe_s),
            "ratio": median(persist_s) / median(raw_s), "best_ratio": min(persist_s) / min(raw_s),
            "persist_all": persist_s, "raw_all": raw_s}


def breakdown(staged: dict[str, Any]) -> dict[str, float]:
    """Where the persister's CPU time goes, for the big file: torch.save into BytesIO (with and
    without torch's per-record zip CRC-32, which backups leave off), and CRC-32 (the manifest's
    checksum, computed while streaming) and SHA-256 (for comparison) of the result."""
    obj = staged[SHARED_FILE]
    out: dict[str, float] = {}
    buf = io.BytesIO()
    t0 = time.perf_counter()
    torch.save(obj, buf)
    out["torch_save_s"] = time.perf_counter() - t0
    view = buf.getbuffer()
    out["bytes"] = view.nbytes
    t0 = time.perf_counter()
    hashlib.sha256(view).hexdigest()
    out["sha256_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    zlib.crc32(view)
    out["crc32_s"] = time.perf_counter() - t0
    view.release()
    del buf
    free_memory()
    crc_setter = getattr(torch.serialization, "set_crc32_options", None)
    if crc_setter is not None:
        crc_setter(False)
        try:
            buf = io.BytesIO()
            t0 = time.perf_counter()
            torch.save(obj, buf)
            out["torch_save_nocrc_s"] = time.perf_counter() - t0
            del buf
        finally:
            crc_setter(True)
    free_memory()
    return out


# -- moto ------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for name, value in {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                        "AWS_DEFAULT_REGION": S3_REGION}.items():
        os.environ.setdefault(name, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                 region_name=S3_REGION).create_bucket(Bucket=name)


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-millions", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=7, help="timed saves for the stall and memcpy medians")
    parser.add_argument("--persist-repeats", type=int, default=3, help="timed persists / raw writes on S3")
    parser.add_argument("--file-repeats", type=int, default=5,
                        help="timed persists / raw writes on file:// (cheap, and local disk timings are noisy)")
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()

    start = time.perf_counter()
    model, optimizer = build(args.params_millions)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {len(model)} x Linear({WIDTH}, {WIDTH}) = {n_params / 1e6:.1f}M params, Adam (1 step); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs", flush=True)

    stall = measure_stall(model, optimizer, args.repeats)
    print(f"phase 1: state {stall['state_bytes'] / 1e6:.1f} MB in {stall['tensors']} tensors; "
          f"stage s {[round(x, 3) for x in stall['stage_all']]}, memcpy s {[round(x, 3) for x in stall['copy_all']]}"
          f"; rss {rss_gb():.2f} GB", flush=True)
    staged = stall.pop("staged")
    area = stall.pop("area")
    del model, optimizer  # phase 2 only needs the staged copy
    free_memory()

    bd = breakdown(staged)
    nocrc = f"{bd['torch_save_nocrc_s']:.3f}s" if "torch_save_nocrc_s" in bd else "n/a"
    print(f"persist CPU breakdown ({SHARED_FILE}, {bd['bytes'] / 1e6:.1f} MB, one run each): torch.save->BytesIO "
          f"{bd['torch_save_s']:.3f}s (zip CRC-32 off: {nocrc}), crc32 {bd['crc32_s']:.3f}s, "
          f"sha256 {bd['sha256_s']:.3f}s", flush=True)

    results: dict[str, dict[str, Any]] = {}
    tmp = tempfile.mkdtemp(prefix="backup_io-")
    server = None
    try:
        storage = StorageSpec(f"file://{tmp}", "bench-run").open()
        results["file"] = measure_persist(storage, staged, args.file_repeats, warmup=True)
        print(f"file: persist s {[round(x, 3) for x in results['file']['persist_all']]}, raw s "
              f"{[round(x, 3) for x in results['file']['raw_all']]}; rss {rss_gb():.2f} GB", flush=True)
        if not args.skip_s3:
            server, endpoint = start_moto()
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            make_bucket(endpoint, bucket)
            options = {"key": S3_KEY, "secret": S3_SECRET,
                       "client_kwargs": {"endpoint_url": endpoint, "region_name": S3_REGION}}
            storage = StorageSpec(f"s3://{bucket}/runs", "bench-run", options).open()
            results["s3 (moto)"] = measure_persist(storage, staged, args.persist_repeats, warmup=False)
            r = results["s3 (moto)"]
            print(f"s3: persist s {[round(x, 3) for x in r['persist_all']]}, raw s "
                  f"{[round(x, 3) for x in r['raw_all']]}; rss {rss_gb():.2f} GB", flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    del staged, area
    free_memory()

    # -- report ----------------------------------------------------------------------------
    ok = lambda x, t: "OK" if x <= t else "MISS"  # noqa: E731
    print()
    print("== (a) training stall per backup (phase 1, StagingArea.stage, buffers reused) ==")
    print(f"{'state bytes':>14} {'memcpy GB/s':>12} {'memcpy s':>9} {'stall s':>9} {'stall ratio':>12} "
          f"{'target':>7} {'':>5}  {'paired ratio':>12} {'':>5}  {'stall+state_dict() s':>20} {'ratio':>6}")
    print(f"{stall['state_bytes']:>14,d} {stall['memcpy_gbs']:>12.2f} {fmt_s(stall['memcpy_s']):>9} "
          f"{fmt_s(stall['stage_s']):>9} {stall['stall_ratio']:>12.2f} {'<=' + str(STALL_TARGET):>7} "
          f"{ok(stall['stall_ratio'], STALL_TARGET):>5}  {stall['paired_ratio']:>12.2f} "
          f"{ok(stall['paired_ratio'], STALL_TARGET):>5}  {fmt_s(stall['full_s']):>20} {stall['full_ratio']:>6.2f}")
    print("   stall ratio = median(stage s) / (state bytes / memcpy rate); paired ratio = median over the "
          "interleaved (stage, memcpy) pairs of stage_i / memcpy_i,\n   which cancels this VM's slow swings "
          "in memory bandwidth; stall+state_dict() also counts building the tree as RankSaver.backup does.")
    print()
    print("== (b) persist (AsyncPersister submit -> wait) vs raw RunStorage.write_bytes of the same bytes ==")
    print(f"{'target':<10} {'bytes':>13} {'persist s':>10} {'raw write s':>12} "
          f"{'persist ratio':>14} {'target':>7} {'':>5}  {'best-of ratio':>13}  {'fs.pipe_file s':>14}")
    for name, r in results.items():
        print(f"{name:<10} {r['bytes']:>13,d} {fmt_s(r['persist_s']):>10} "
              f"{fmt_s(r['raw_s']):>12} {r['ratio']:>14.2f} "
              f"{'<=' + str(PERSIST_TARGET):>7} {ok(r['ratio'], PERSIST_TARGET):>5}  {r['best_ratio']:>13.2f}  "
              f"{fmt_s(r['pipe_s']):>14}")
    print()
    print(f"medians of {args.repeats} (stall, memcpy), {args.file_repeats} (file persist, writes; after one "
          f"untimed warm-up) and {args.persist_repeats} (s3 persist, writes); "
          f"peak RSS {peak_rss_gb():.2f} GB; total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
