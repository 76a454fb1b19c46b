"""The CPU gradient check's fast screen (one sum per tensor) and its exact fallback when a sum is not finite."""

from __future__ import annotations

import pytest
import torch

from orchestrator.loop.steps import nonfinite_flag

CPU = torch.device("cpu")
NAN, INF = float("nan"), float("inf")
LARGEST = {torch.float32: 3e38, torch.float64: 1.7e308, torch.bfloat16: 3e38, torch.float16: 6e4}


@pytest.mark.parametrize("dtype", list(LARGEST))
def test_finite_gradients_whose_sum_overflows_are_not_flagged(dtype):
    big = LARGEST[dtype]
    grads = [torch.ones(3, dtype=dtype), torch.tensor([big, big, big], dtype=dtype)]
    assert not torch.isfinite(grads[1].sum())  # the screen's sum overflows: the exact check decides
    assert not bool(nonfinite_flag(grads, CPU))


@pytest.mark.parametrize("dtype", list(LARGEST))
@pytest.mark.parametrize("bad", [[INF, -INF], [NAN], [-INF], [INF, 1.0]])
def test_a_bad_element_beside_others_that_would_cancel_or_overflow_is_flagged(dtype, bad):
    big = LARGEST[dtype]
    grads = [torch.tensor([big, big], dtype=dtype), torch.tensor([*bad, -big, 0.0], dtype=dtype)]
    assert bool(nonfinite_flag(grads, CPU))


def test_only_the_tensor_holding_the_bad_element_decides_among_many():
    grads = [torch.randn(17, 5) for _ in range(12)]
    assert not bool(nonfinite_flag(grads, CPU))
    grads[7][16, 4] = NAN
    assert bool(nonfinite_flag(grads, CPU))
