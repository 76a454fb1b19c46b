"""Trains one epoch of a model with ``compile=True`` (torch's default backend, inductor, building C++
kernels) on a one-rank gloo group, in a process of its own (tests only).

Usage: ``python inductor_build.py FOLDER``, with ``tests/`` on PYTHONPATH. Inductor's cache is
``FOLDER/inductor`` (empty at the start: every kernel is built here, as on a fresh machine). Writes
``FOLDER/outcome.json``: ``{"ok": true, "keys": [...], "finite": ..., "kernels": N}`` (the final
weights' keys, whether they are all finite, the C++ kernels built), ``{"skipped": reason}`` when this
machine cannot compile, or ``{"ok": false, "error": ...}``. Exits 0 unless it failed.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def main(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")  # before torch reads it
    import torch.distributed as dist

    from orchestrator.loop.compiled import missing_for_compile
    from test_train_loop import StandInCoordinator, _all_finite, _run
    from test_train_loop_compile import _config

    missing = missing_for_compile({}, "cpu")
    if missing is not None:
        (folder / "outcome.json").write_text(json.dumps({"skipped": f"this machine lacks {missing}"}))
        return 0
    dist.init_process_group("gloo", init_method=f"file://{folder / 'group-store'}", rank=0, world_size=1)
    try:
        result = _run(StandInCoordinator(), _config(compile=True), epochs=1)
        outcome = {"ok": True, "keys": sorted(result.state_dict), "finite": _all_finite(result.state_dict),
                   "kernels": len(list((folder / "inductor").rglob("*.so")))}
    except Exception:  # noqa: BLE001 - reported to the test
        outcome = {"ok": False, "error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    (folder / "outcome.json").write_text(json.dumps(outcome))
    print(json.dumps(outcome)[:2000], flush=True)
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
