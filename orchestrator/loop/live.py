"""A rank's state as of its last completed step, copied out of memory for a live recovery (torch only, no Ray).

When a rank dies without notice, its peers hold the model and optimizer of the last step that
completed everywhere. :class:`LiveState` lets another thread of a surviving rank copy that state
while the loop's thread is blocked in the next step's collective with the dead peer:

- the loop calls :meth:`LiveState.mark` right before it fetches a step's batch: the state is then at
  a step boundary (every sync point before it handled, its decisions applied); ``mark`` reseeds the
  rank's random streams from ``(seed, rank, global step)`` (:func:`step_seed`) and keeps the
  ``state_dict()`` of the rank's own small components (position, metric sums, result counters),
  copying nothing: each returns a snapshot (fresh containers of plain values, and tensors that the
  component replaces rather than changes in place), so it still holds the boundary's state when the
  next step, the epoch's end or a sync point change the component; only :meth:`LiveState.copy`
  copies it;
- the loop calls :meth:`LiveState.unmark` before it changes any state again (the optimizer update
  after the step's all-reduce, a skipped batch, the end of an epoch, a sync point's decisions);
- a sync point with the coordinator is a step boundary too while the rank waits there (a peer that
  dies keeps every survivor waiting for it): the epoch's begin (a recovery runs it again), a
  periodic batch-end sync (a recovery goes on with the next step: the callbacks do not see that
  batch's end, so a backup or a checkpoint due there is taken at the next one), and the epoch's end
  with its validation (the mark of the epoch's last step holds through them when the epoch's end
  changes no shared state, i.e. without an ``lr_scheduler_interval="epoch"`` schedule; a recovery
  validates the epoch and reports its end again). A non-finite loss's sync point is not: its
  decision (stop, roll back) is never skipped;
- :meth:`LiveState.copy` (another thread) waits for a marked boundary, copies the shared components
  (model, optimizer, ...) to CPU and *freezes* the rank: its loop never changes the state again
  (it is being replaced).

A dead rank's own state is rebuilt from a survivor's (:func:`rebuilt_own`): the position and the
result counters are the same on every rank, the random streams follow from the step, and the data
shard position from the step and the rank (:class:`~orchestrator.loop.data.ShardSampler`). Only the
dead rank's metric sums of the epoch so far are gone: they restart empty.

Example:
    >>> live = LiveState({}, rank=0, seed=0)
    >>> live.copy(shared=False, timeout_s=0.0)[0]["ok"]
    False
"""

from __future__ import annotations

import copy
import random
import threading
from typing import Any, Mapping

import numpy as np
import torch

from orchestrator.loop.data import sample_seed
from orchestrator.loop.rank_state import Component

#: The rank's own components a live recovery carries over (or rebuilds for a dead rank).
CARRIED = ("position", "metric_sums", "result")
#: The rank's own components it derives from the step instead of copying.
DERIVED = ("rng",)
_RNG_SALT = 0x5EED


def step_seed(seed: int, rank: int, global_step: int) -> int:
    """The seed of ``rank``'s random streams for the step after ``global_step`` completed steps.

    Example:
        >>> step_seed(0, 1, 5) == step_seed(0, 1, 5) != step_seed(0, 1, 6)
        True
    """
    return sample_seed(seed, _RNG_SALT, rank, global_step)


def reseed(seed: int, rank: int, global_step: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) streams from :func:`step_seed`."""
    s = step_seed(seed, rank, global_step)
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    # torch.manual_seed(s) would do the same, but costs about 0.26 ms (it seeds every accelerator
    # type), once a step: the CPU generator, and CUDA's once CUDA is in use
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(s)


def cpu_copy(node: Any) -> Any:
    """A deep copy of a state with every tensor copied to CPU."""
    if isinstance(node, torch.Tensor):
        return node.detach().to("cpu", copy=True)
    if isinstance(node, dict):
        return {k: cpu_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [cpu_copy(v) for v in node]
    if isinstance(node, tuple):
        return tuple(cpu_copy(v) for v in node)
    return copy.deepcopy(node)


def unsupported(components: Mapping[str, Component]) -> str | None:
    """Why these components cannot be recovered from a survivor's memory (per-rank data state), or None."""
    sharded = sorted(name for name, c in components.items() if c.sharded)
    if sharded:
        return f"sharded state {sharded} (strategy='fsdp'): each rank holds only its own shards"
    own = sorted(name for name, c in components.items() if not c.shared and name not in CARRIED + DERIVED)
    if own:
        return f"per-rank state {own} lives only on its rank"
    return None


def rebuilt_own(donor_own: Mapping[str, Any]) -> dict[str, Any]:
    """A dead rank's own state from a survivor's: the same position and counters, empty metric sums
    for the epoch so far (its share of them died with it), the running loss the all-reduce shared."""
    own = copy.deepcopy(dict(donor_own))
    sums = own.get("metric_sums")
    if sums is not None:
        own["metric_sums"] = {"train": {"names": [], "totals": None, "count": 0}, "seen": list(sums["seen"])}
    return own


class LiveState:
    """The consistent copy of one rank's state that a survivor hands out (see the module).

    Args:
        components: The rank's components (the same mapping backups save).
        rank: This rank.
        seed: The run's seed (:func:`step_seed`).

    Example:
        >>> live = LiveState(components, rank=1, seed=0)  # doctest: +SKIP
        >>> live.mark(position)  # loop thread, before each step  # doctest: +SKIP
        >>> header, payload = live.copy(shared=True, timeout_s=5.0)  # another thread  # doctest: +SKIP
    """

    def __init__(self, components: Mapping[str, Component], rank: int, seed: int) -> None:
        self.components = components
        self.rank = rank
        self.seed = seed
        self.reason = unsupported(components)
        self._cond = threading.Condition()
        self._step: int | None = None  # the global step of the marked boundary; None while state changes
        self._own: dict[str, Any] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._modules: list[tuple[str, torch.nn.Module]] | None = None  # (key prefix, module) of the model
        self._started = False  # the step after the boundary has begun (it is redone after a recovery)
        self._frozen = False

    def mark(self, position: Any) -> None:
        """Loop thread, at a step boundary: reseed this rank's streams and allow copies of this state."""
        reseed(self.seed, self.rank, position.global_step)
        if self.reason is not None:
            return
        own = {name: self.components[name].stateful.state_dict()  # snapshots: nothing to copy (see the module)
               for name in CARRIED if name in self.components}
        buffers = self._buffers_now(position)
        with self._cond:
            self._wait_unfrozen()
            self._own, self._buffers, self._step, self._started = own, buffers, position.global_step, False
            self._cond.notify_all()

    def _buffers_now(self, position: Any) -> dict[str, torch.Tensor]:
        """Copies of the model's persistent buffers (batch norm statistics change in the forward pass).

        The modules are listed again at every boundary that is not a step's (an epoch's begin, a
        sync point): walking them with ``named_buffers()`` each step cost more than the copies of a
        model without buffers. Each module's buffers are read at every boundary (a lazy module's
        buffers are materialised in place, into the same module)."""
        model = self.components.get("model")
        if model is None or not isinstance(model.stateful, torch.nn.Module):
            return {}
        if self._modules is None or position.phase != "batch":
            self._modules = [(f"{prefix}." if prefix else "", module) for prefix, module in model.stateful.named_modules()]
        return {prefix + name: b.detach().clone() for prefix, module in self._modules
                for name, b in module._buffers.items()
                if b is not None and name not in module._non_persistent_buffers_set}

    @property
    def marked(self) -> bool:
        """Whether the state is at a marked step boundary (a copy may be taken now)."""
        return self._step is not None

    def started(self) -> None:
        """Loop thread: the step after the boundary began (its batch is fetched and trained)."""
        self._started = True

    def unmark(self) -> None:
        """Loop thread, before the state changes: no copy until the next mark (blocks for good once frozen)."""
        with self._cond:
            self._wait_unfrozen()
            self._step = None

    def _wait_unfrozen(self) -> None:
        while self._frozen:  # a copy of this state was handed out: this rank is being replaced
            self._cond.wait()

    def copy(self, shared: bool, timeout_s: float) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Another thread: ``(header, payload)`` of the marked state, waiting up to ``timeout_s`` for a mark.

        The header says ``ok``, ``step`` (global step of the state), ``rank``, ``in_flight`` (a step had
        begun after it) or ``reason``; the payload holds ``own`` (this rank's carried components) and,
        with ``shared``, ``shared`` (every shared component, on CPU). Once a copy is handed out the
        rank is frozen: its loop blocks before it would change the state.
        """
        if self.reason is not None:
            return {"ok": False, "rank": self.rank, "reason": self.reason}, None
        with self._cond:
            if not self._cond.wait_for(lambda: self._step is not None, timeout=timeout_s):
                return {"ok": False, "rank": self.rank,
                        "reason": f"no step boundary within {timeout_s:g}s (busy outside a training step)"}, None
            self._frozen = True
            payload = {"own": cpu_copy(self._own), "shared": None}
            if shared:
                states = {name: c.stateful.state_dict() for name, c in self.components.items() if c.shared}
                if "model" in states:  # the buffers as of the boundary, not of the forward pass in flight
                    states["model"] = {k: self._buffers.get(k, v) for k, v in states["model"].items()}
                payload["shared"] = cpu_copy(states)
            header = {"ok": True, "rank": self.rank, "step": self._step, "in_flight": self._started,
                      "position": dict(self._own.get("position", {}))}
            return header, payload
