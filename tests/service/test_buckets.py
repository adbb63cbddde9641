from __future__ import annotations

import numpy as np
import pytest

from service.buckets import bucket_for, bucket_sizes, pad_rows


def test_bucket_sizes() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


@pytest.mark.parametrize(("n", "expected"), [(1, 1), (3, 4), (8, 8), (9, 16), (33, 48), (48, 48)])
def test_bucket_for(n: int, expected: int) -> None:
    assert bucket_for(n, bucket_sizes(48)) == expected


def test_bucket_for_refuses_out_of_range() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(49, bucket_sizes(48))
    with pytest.raises(ValueError, match="at least one"):
        bucket_for(0, bucket_sizes(48))


def test_padding_keeps_rows_and_zero_fills() -> None:
    x = np.arange(3 * 2, dtype=np.float32).reshape(3, 2) + 1
    padded = pad_rows(x, [1, 2, 4])
    assert padded.shape == (4, 2)
    assert np.array_equal(padded[:3], x) and not padded[3].any()
    assert pad_rows(x[:2], [1, 2, 4]) is not None and pad_rows(x[:2], [1, 2, 4]).shape == (2, 2)
