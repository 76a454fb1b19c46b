"""nonfinite_flag: the gradient check every optimizer step makes, on every dtype a gradient may have."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.loop.steps import nonfinite_flag

CPU = torch.device("cpu")
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("values, bad", [
    ([1.0, -2.0, 3.0], False),
    ([0.0], False),
    ([NAN, 1.0, 2.0], True),
    ([1.0, 2.0, NAN], True),
    ([1.0, INF], True),
    ([-INF, 0.0], True),
    ([NAN, INF, -INF], True),
    ([6e4, -6e4], False),  # large but finite in every dtype here (float16's max is 65504)
])
def test_a_tensor_is_flagged_exactly_when_one_of_its_elements_is_nan_or_infinite(dtype, values, bad):
    assert bool(nonfinite_flag([torch.tensor(values, dtype=dtype)], CPU)) is bad


@pytest.mark.parametrize("where", [0, 1234, 4095])
def test_one_bad_element_anywhere_in_a_large_gradient_is_found(where):
    grads = [torch.randn(64, 64), torch.randn(4096)]
    grads[1][where] = NAN
    assert bool(nonfinite_flag(grads, CPU))
    grads[1][where] = -INF
    assert bool(nonfinite_flag(grads, CPU))
    grads[1][where] = 1e30  # float32's largest values are finite: no false alarm (a sum or square would overflow)
    grads[0][0, 0] = -3e38
    assert not bool(nonfinite_flag(grads, CPU))


def test_missing_and_empty_gradients_are_ignored_and_mixed_dtypes_are_each_checked():
    assert not bool(nonfinite_flag([None, torch.empty(0), torch.ones(2)], CPU))
    assert not bool(nonfinite_flag([], CPU))
    assert bool(nonfinite_flag([torch.ones(3), torch.tensor([1.0, INF], dtype=torch.bfloat16)], CPU))
    assert not bool(nonfinite_flag([torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float16)], CPU))


def test_a_sparse_gradient_is_checked_on_its_values():
    sparse = torch.sparse_coo_tensor([[0, 3]], [1.0, math.inf], (5,))
    assert bool(nonfinite_flag([sparse], CPU))
    assert not bool(nonfinite_flag([torch.sparse_coo_tensor([[1]], [2.0], (5,))], CPU))


def test_the_flag_is_a_boolean_scalar_on_the_requested_device():
    flag = nonfinite_flag([torch.ones(2)], CPU)
    assert flag.shape == () and flag.dtype == torch.bool and flag.device == CPU
