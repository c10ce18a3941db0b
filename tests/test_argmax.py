"""The native row-wise argmax (kernels/argmax.c) against torch.argmax(dim=-1), which it replaces for greedy
sampling on the CPU: the same index, ties, NaN and infinities included, and bad inputs refused."""

from __future__ import annotations

import pytest
import torch

from shoal.kernels import argmax as argmax_kernel

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not argmax_kernel.supported(torch.zeros(1, 1)), reason="no C compiler: native kernels off"
    ),
]


def _same_as_torch(logits: torch.Tensor) -> None:
    got = argmax_kernel.argmax(logits)
    assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1))


@pytest.mark.parametrize(("rows", "n"), [(1, 1), (1, 7), (3, 8), (5, 49152), (64, 4099)])
def test_random_rows(rows, n) -> None:
    _same_as_torch(torch.randn(rows, n, generator=torch.Generator().manual_seed(n)))


def test_ties_take_the_first_index_in_the_vector_body_and_in_the_tail() -> None:
    logits = torch.zeros(4, 21)
    logits[0, [3, 5]] = 2.0  # two maxima in one vector
    logits[1, [2, 17]] = 2.0  # one in the body, one in the tail
    logits[2, [18, 20]] = 2.0  # both in the tail
    logits[3, 9] = -0.0  # -0.0 == 0.0: the first of the zeros
    _same_as_torch(logits)
    assert argmax_kernel.argmax(logits).tolist() == [3, 2, 18, 0]


def test_nan_wins_and_infinities() -> None:
    logits = torch.randn(6, 19)
    logits[0, 11] = float("nan")
    logits[0, 13] = float("inf")
    logits[1, 17] = float("nan")  # in the tail
    logits[1, 2] = float("inf")
    logits[2] = float("-inf")  # all -inf: index 0
    logits[3, 4] = float("inf")
    logits[4, :] = float("nan")
    logits[5, 0] = float("-inf")
    _same_as_torch(logits)
    assert argmax_kernel.argmax(logits)[:5].tolist() == [11, 17, 0, 4, 0]


def test_strided_rows_as_the_sampler_slices_a_padded_vocabulary() -> None:
    padded = torch.randn(9, 520)
    padded[:, 500:] = 100.0  # padding columns past the vocabulary: never chosen once sliced away
    _same_as_torch(padded[:, :500])
    assert (argmax_kernel.argmax(padded[:, :500]) < 500).all()
    _same_as_torch(padded[::2, :500])  # every other row


def test_no_rows() -> None:
    assert argmax_kernel.argmax(torch.zeros(0, 5)).shape == (0,)


@pytest.mark.parametrize(
    ("logits", "error"),
    [
        (torch.zeros(2, 5, dtype=torch.bfloat16), TypeError),
        (torch.zeros(2, 5, dtype=torch.float64), TypeError),
        (torch.zeros(5), ValueError),
        (torch.zeros(2, 3, 5), ValueError),
        (torch.zeros(2, 0), ValueError),
        (torch.zeros(5, 2).t(), ValueError),  # columns not contiguous
        (torch.zeros(1, 8).expand(3, 8), ValueError),  # rows overlap (stride 0)
    ],
)
def test_bad_inputs_are_refused(logits, error) -> None:
    assert not argmax_kernel.supported(logits)
    with pytest.raises(error, match="argmax"):
        argmax_kernel.argmax(logits)
