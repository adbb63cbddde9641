"""Batch-size buckets: batches are padded up to the nearest of a few fixed sizes.

A session that sees only a handful of shapes tunes and allocates once per shape (on CUDA:
cuDNN algorithm search and arena growth) instead of once per distinct batch size.
"""

from __future__ import annotations

import bisect

import numpy as np


def bucket_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to ``max_batch_size``, which is always the last bucket."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    sizes.append(max_batch_size)
    return sizes


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket holding ``n`` rows."""
    if n < 1:
        raise ValueError(f"a batch needs at least one row, got {n}")
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"batch of {n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def pad_rows(batch: np.ndarray, buckets: list[int]) -> np.ndarray:
    """Zero-pad the batch dimension up to its bucket; callers slice the padding off results."""
    n = batch.shape[0]
    size = bucket_for(n, buckets)
    if size == n:
        return batch
    padded = np.zeros((size, *batch.shape[1:]), dtype=batch.dtype)
    padded[:n] = batch
    return padded
