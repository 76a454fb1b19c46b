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
