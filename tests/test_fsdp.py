"""strategy="fsdp" without Ray: the keywords' checks, the wrap policy, sharded backup files and resharding."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from rank_processes import start_ranks
from torch.distributed.fsdp import FSDPModule

from orchestrator import Trainer
from orchestrator.loop.fsdp import full_model_state, shard_model
from orchestrator.loop.rank_state import Component
from orchestrator.loop.saver import _all_finite
from orchestrator.loop.sharded_state import (
    DcpPart, ShardedModel, ShardedOptimizer, ShardedSnapshots, load_sharded, sharded_components)
from orchestrator.loop.state_io import StagingArea
from orchestrator.storage.checkpoint import Manifest, verify
from orchestrator.storage.fs import StorageSpec

pytestmark = pytest.mark.timeout(300)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _trainer(**kw):
    return Trainer(model=_model, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), loss=torch.nn.functional.mse_loss,
                   data=lambda: (None, None), **kw)


@pytest.mark.parametrize("kwargs,message", [
    ({"strategy": "zero3"}, "strategy must be one of ('ddp', 'fsdp'), got 'zero3'"),
    ({"fsdp_wrap": (torch.nn.Linear,)}, "fsdp_wrap is only used with strategy='fsdp'"),
    ({"strategy": "fsdp", "fsdp_wrap": "Linear"}, "fsdp_wrap must be a callable (module) -> bool or a tuple"),
    ({"strategy": "fsdp", "fsdp_wrap": ()}, "fsdp_wrap must be a callable (module) -> bool or a non-empty tuple"),
    ({"strategy": "fsdp", "precision": "16-mixed"}, "precision='16-mixed' is not supported with strategy='fsdp'"),
    ({"strategy": "fsdp", "compile": {"backend": "eager"}}, "is not supported with strategy='fsdp'"),
])
def test_strategy_keywords_are_refused_before_any_worker_starts_naming_the_field(kwargs, message):
    with pytest.raises(ValueError) as info:
        _trainer(**kwargs)
    assert message in str(info.value)


def test_fsdp_keywords_are_accepted_and_a_list_of_classes_becomes_a_tuple():
    trainer = _trainer(strategy="fsdp", fsdp_wrap=[torch.nn.Linear], precision="bf16-mixed",
                       accumulate_grad_batches=2)
    assert trainer.loop.strategy == "fsdp" and trainer.loop.fsdp_wrap == (torch.nn.Linear,)
    assert _trainer().loop.strategy == "ddp"


def _transformer() -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.TransformerEncoder(layer, num_layers=2),
                               torch.nn.Linear(8, 2))


def test_the_default_wrap_shards_transformer_layers_on_their_own_then_the_root(group):
    model = shard_model(_transformer(), None, torch.device("cpu"))
    units = sorted(name for name, m in model.named_modules() if isinstance(m, FSDPModule))
    assert units == ["", "1.layers.0", "1.layers.1"]
    assert list(model.state_dict()) == list(_transformer().state_dict())  # the plain names


def test_a_tuple_of_classes_or_a_callable_chooses_the_units(group):
    by_class = shard_model(_model(), (torch.nn.Linear,), torch.device("cpu"))
    assert sorted(n for n, m in by_class.named_modules() if isinstance(m, FSDPModule)) == ["", "0", "2"]
    by_fn = shard_model(_model(), lambda m: isinstance(m, torch.nn.Linear) and m.out_features == 3,
                        torch.device("cpu"))
    assert sorted(n for n, m in by_fn.named_modules() if isinstance(m, FSDPModule)) == ["", "2"]


def _sharded(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = shard_model(_model(), None, torch.device("cpu"))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _save(storage, folder: str, model, optimizer, group) -> list:
    snapshots = ShardedSnapshots()
    snapshots.keep("best", model)
    components = sharded_components(model, optimizer, snapshots)
    staged = StagingArea().stage({name: c.stateful.state_dict() for name, c in components.items()})
    return DcpPart(staged, storage, group).persist_into(folder)


def test_a_sharded_backup_lists_every_file_it_wrote_with_size_and_checksum_and_a_truncated_one_fails(group, tmp_path):
    storage = StorageSpec(f"file://{tmp_path}", "r").open()
    model, optimizer = _sharded()
    entries = _save(storage, "backup/step-1", model, optimizer, dist.group.WORLD)
    assert [e.name for e in entries] == ["sharded/.metadata", "sharded/__0_0.distcp"]
    for e in entries:
        assert storage.size(f"backup/step-1/{e.name}") == e.size
    manifest = Manifest(step=1, epoch=0, batch=0, phase="batch", world_size=1, files=entries)
    assert verify(storage, "backup/step-1", manifest) is None
    shard = "backup/step-1/sharded/__0_0.distcp"
    storage.write_bytes(shard, storage.read_bytes(shard)[:-10])
    assert "has" in verify(storage, "backup/step-1", manifest)


def test_a_staged_dtensor_stays_a_dtensor_over_a_cpu_copy_of_this_ranks_shard(group):
    model, _ = _sharded()
    weight = model.state_dict()["0.weight"]
    staged = StagingArea().stage({"w": weight})["w"]
    assert type(staged) is type(weight) and staged.shape == weight.shape
    assert torch.equal(staged.to_local(), weight.to_local()) and staged.to_local().data_ptr() != \
        weight.to_local().data_ptr()
    assert _all_finite({"w": staged})


def _two_ranks(rank: int, store: str, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        storage = StorageSpec(f"file://{root}", "r").open()
        model, optimizer = _sharded()
        entries = _save(storage, "backup/step-1", model, optimizer, dist.new_group(backend="gloo"))
        full = full_model_state(model)
        optim = ShardedOptimizer(model, optimizer).state_dict()
        exp_avg = {k: v["exp_avg"].full_tensor() for k, v in optim["state"].items()}
        if rank == 0:
            torch.save({"model": full, "exp_avg": exp_avg}, f"{root}/expected.pt")
        torch.save([e.name for e in entries], f"{root}/entries-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_sharded_backup_of_two_ranks_loads_resharded_on_one_rank_exactly(group, tmp_path):
    start_ranks(_two_ranks, (str(tmp_path / "two-rank-store"), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "entries-1.pt") == ["sharded/__1_0.distcp"]  # only its own shards
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    storage = StorageSpec(f"file://{tmp_path}", "r").open()
    model, optimizer = _sharded(seed=1)  # other weights and moments until loaded
    snapshots = ShardedSnapshots()
    components: dict[str, Component] = sharded_components(model, optimizer, snapshots)
    load_sharded(components, storage, "backup/step-1", dist.group.WORLD, model)
    loaded = ShardedModel(model).state_dict()
    for name, value in expected["model"].items():
        assert torch.equal(loaded[name].full_tensor(), value), name
    moments = ShardedOptimizer(model, optimizer).state_dict()["state"]
    for name, value in expected["exp_avg"].items():
        assert torch.equal(moments[name]["exp_avg"].full_tensor(), value), name
    assert sorted(snapshots.kept) == ["best"]
    assert torch.equal(snapshots.kept["best"]["2.weight"].full_tensor(), expected["model"]["2.weight"])
