"""nonfinite_flag: the gradient check every optimizer step makes, on every dtype a gradient may have, and the
contiguous spans that read DDP's bucket views as few tensors."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.loop.steps import contiguous_spans, nonfinite_flag, nonfinite_sums

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


# -- contiguous spans: the gradients of DDP's buckets read as few tensors ------------------------------------
def _flat(n: int = 12) -> torch.Tensor:
    return torch.arange(float(n))


@pytest.mark.parametrize("pieces, expected", [
    (lambda f: [f[4:8], f[0:4], f[8:12]], [(0, 12)]),  # end to end, in any order: one span
    (lambda f: [f[0:4], f[5:8]], [(0, 4), (5, 8)]),  # a gap: the element between is not read
    (lambda f: [f[0:6], f[3:9]], [(0, 6), (3, 9)]),  # an overlap: each read as it is
    (lambda f: [f[0:8], f[2:4], f[4:6]], [(0, 8), (2, 6)]),  # contained, then adjacent to what contains it
    (lambda f: [f[0:6].view(2, 3), f[6:12].view(3, 2)], [(0, 12)]),  # shapes do not matter, only the elements
    (lambda f: [f[0:4], torch.ones(3)], [(0, 4), "ones"]),  # other storages stay as they are
])
def test_contiguous_spans_cover_every_element_and_nothing_else(pieces, expected):
    flat = _flat()
    tensors = pieces(flat)
    spans = contiguous_spans(tensors)
    got = ["ones" if s.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
           else (s.storage_offset(), s.storage_offset() + s.numel()) for s in spans]
    assert sorted(got, key=str) == sorted(expected, key=str)
    covered = sorted(float(v) for s in spans if s.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
                     for v in s.reshape(-1))
    assert set(covered) == {float(v) for t in tensors if t.untyped_storage().data_ptr() ==
                            flat.untyped_storage().data_ptr() for v in t.reshape(-1)}


def test_non_contiguous_tensors_and_views_of_another_dtype_are_not_merged():
    flat = _flat()
    strided = flat[0:8].view(4, 2).t()  # not contiguous
    as_int = flat[8:12].view(torch.int32)  # the same storage, another dtype
    spans = contiguous_spans([strided, flat[8:10], as_int])
    assert any(s is strided for s in spans) and any(s is as_int for s in spans) and len(spans) == 3


def test_a_nan_in_one_of_the_gradients_that_share_a_bucket_is_found():
    flat = torch.randn(1000)
    grads = [flat[600:], flat[:100], flat[100:600].view(10, 50)]
    parts = contiguous_spans(grads)
    assert len(parts) == 1 and not nonfinite_sums([t.sum().item() for t in parts], parts)
    flat[350] = NAN
    assert nonfinite_sums([t.sum().item() for t in parts], parts)
    assert bool(nonfinite_flag(grads, CPU))
