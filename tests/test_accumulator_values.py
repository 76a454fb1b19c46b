"""Accumulator.add_values (a CPU step's numbers as Python floats) sums exactly what Accumulator.add sums."""

from __future__ import annotations

import math

import torch

from orchestrator.loop.rank_state import Accumulator


def test_the_float_path_and_the_tensor_path_give_bit_identical_sums_and_weighted_losses():
    g = torch.Generator().manual_seed(0)
    by_tensor, by_float = Accumulator(), Accumulator()
    for _ in range(200):
        loss, acc = (torch.rand(2, generator=g) * torch.tensor([1e3, 1.0])).unbind()
        n = int(torch.randint(1, 300, (1,), generator=g))
        weighted = by_tensor.add(loss, {"acc": acc}, n)
        floats = by_float.add_values(torch.stack([loss, acc]).tolist(), ["acc"], n)
        assert weighted.item() == floats[0]
    assert by_float.names == by_tensor.names == ["loss", "acc"] and by_float.count == by_tensor.count
    assert by_float.totals.dtype == torch.float64 and torch.equal(by_float.totals, by_tensor.totals)


def test_a_non_finite_loss_stays_non_finite_in_the_float_path():
    sums = Accumulator()
    assert math.isnan(sums.add_values([float("nan"), 0.5], ["acc"], 4)[0]) and math.isnan(sums.totals[0].item())
    assert sums.add_values([float("inf"), 0.5], ["acc"], 4)[0] == float("inf")
    assert sums.totals[1].item() == 4.0


def test_a_state_dict_of_the_float_path_is_a_snapshot_and_a_loaded_one_goes_on_adding_exactly():
    sums, reference = Accumulator(), Accumulator()
    for values, n in (([0.25, 1.0], 4), ([0.5, 0.0], 2)):
        sums.add_values(values, ["acc"], n)
        reference.add(torch.tensor(values[0], dtype=torch.float64), {"acc": torch.tensor(values[1])}, n)
    snapshot = sums.state_dict()
    kept = snapshot["totals"].clone()
    sums.add_values([3.0, 1.0], ["acc"], 1)
    assert torch.equal(snapshot["totals"], kept) and snapshot["count"] == 6  # later batches do not change it
    assert sums.phase_sums().totals == {"loss": 5.0, "acc": 5.0} and sums.phase_sums().count == 7
    resumed = Accumulator()
    resumed.load_state_dict(snapshot)
    resumed.add_values([3.0, 1.0], ["acc"], 1)
    reference.add(torch.tensor(3.0, dtype=torch.float64), {"acc": torch.tensor(1.0)}, 1)
    assert torch.equal(resumed.totals, reference.totals) and torch.equal(resumed.totals, sums.totals)
    resumed.clear()
    assert resumed.totals is None and resumed.phase_sums().totals == {} and resumed.count == 0
