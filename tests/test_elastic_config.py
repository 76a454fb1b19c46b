"""Elastic ``num_workers=(min, max)``: validated naming the field, the world sizes that keep the global
batch, and a controller that resumes a backup of another world size only when elastic (no Ray)."""

from __future__ import annotations

import dataclasses

import pytest

import workloads_elastic
from orchestrator import errors
from orchestrator.control.elastic import GrowWatch, resize_event
from orchestrator.control.states import Failed, Running
from orchestrator.core.config import ScalingConfig, elastic_accumulation
from test_controller import WORLD, commit_backup, finished, make  # noqa: F401


@pytest.mark.parametrize("value, says", [
    ((0, 2), "min must be >= 1"),
    ((3, 2), "min must be <= max"),
    ((5, 7), "no world size from 5 to 6 divides max=7"),
    ((1, 2, 3), "num_workers must be an integer >= 1 or (min, max)"),
    ((1.0, 2), "num_workers must be an integer >= 1 or (min, max)"),
])
def test_a_bad_elastic_num_workers_is_refused_naming_the_field(value, says):
    with pytest.raises(ValueError, match="num_workers") as caught:
        workloads_elastic.trainer("/tmp/unused", "r", num_workers=value)
    assert says in str(caught.value)


@pytest.mark.parametrize("value, sizes, elastic", [
    ((1, 4), [4, 2, 1], True),
    ((3, 8), [8, 4], True),
    ((2, 2), [2], True),
    (3, [3], False),
])
def test_the_world_sizes_are_max_and_every_divisor_of_it_down_to_min(value, sizes, elastic):
    scaling = ScalingConfig(num_workers=value)
    assert scaling.world_sizes() == sizes and scaling.elastic is elastic
    assert scaling.num_workers == sizes[0]


@pytest.mark.parametrize("k, max_workers, world, accumulate", [(1, 2, 1, 2), (2, 4, 2, 4), (3, 4, 4, 3)])
def test_fewer_workers_accumulate_more_micro_batches_to_keep_the_global_batch(k, max_workers, world, accumulate):
    assert elastic_accumulation(k, max_workers, world) == accumulate
    assert accumulate * world == k * max_workers


def test_a_world_size_that_does_not_divide_max_cannot_keep_the_global_batch():
    with pytest.raises(ValueError, match="does not divide"):
        elastic_accumulation(1, 4, 3)


def test_a_resize_event_says_why_and_how_many_micro_batches_each_worker_now_runs():
    assert resize_event(before=4, after=2, accumulate=1, max_workers=4) == {
        "from_workers": 4, "to_workers": 2, "reason": "placement_timeout", "accumulate_grad_batches": 2}
    assert resize_event(before=2, after=4, accumulate=1, max_workers=4)["reason"] == "capacity_returned"


class RoomyGroup:
    world_size = 1

    def __init__(self, room: int | None) -> None:
        self.room, self.looks = room, 0

    def can_grow(self) -> int | None:
        self.looks += 1
        return self.room


@pytest.mark.parametrize("room, asks", [(None, False), (2, True)])
def test_the_grow_watch_looks_for_room_once_per_epoch_end_and_asks_once(room, asks):
    group = RoomyGroup(room)
    watch = GrowWatch(group, enabled=True)
    assert watch.check(epoch_ends=0) is False and group.looks == 0  # no epoch end yet: no look
    assert watch.check(epoch_ends=1) is asks
    assert watch.check(epoch_ends=1) is False  # the same epoch end: no second look
    assert group.looks == 1 and watch.target == room


def test_an_elastic_controller_resumes_a_backup_of_fewer_workers_and_a_fixed_one_refuses_it(tmp_path):
    fixed, _, _ = make(tmp_path / "fixed", finished())
    commit_backup(fixed.storage, 6, world_size=1)
    state = fixed.step()
    assert isinstance(state, Failed) and isinstance(state.error, errors.OrchestratorError)
    assert "resume with num_workers=1" in str(state.error)

    elastic, _, _ = make(tmp_path / "elastic", finished())
    elastic.fit = dataclasses.replace(elastic.fit, scaling=ScalingConfig(num_workers=(1, WORLD)))
    commit_backup(elastic.storage, 6, world_size=1)
    state = elastic.step()
    assert isinstance(state, Running) and state.resume.folder == "backup/step-6" and state.resume.world_size == 1


def test_an_elastic_num_workers_with_fsdp_is_refused_before_any_worker_starts():
    import torch

    from orchestrator import Trainer

    with pytest.raises(ValueError, match=r"num_workers=\(1, 2\) \(elastic\) is not supported with strategy='fsdp'"):
        Trainer(model=lambda: torch.nn.Linear(2, 2), optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
                loss=torch.nn.functional.mse_loss, data=lambda: (None, None), num_workers=(1, 2), strategy="fsdp")
