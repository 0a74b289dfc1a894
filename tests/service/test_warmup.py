from __future__ import annotations

import pytest

from service.warmup import choose_batch_size, measure_throughput, warmup_sizes


def test_choose_smallest_within_tolerance():
    assert choose_batch_size({1: 10.0, 2: 10.2, 4: 10.4}) == 1  # CPU-like: flat
    assert choose_batch_size({1: 100.0, 2: 180.0, 4: 300.0, 8: 390.0, 16: 400.0}) == 8  # GPU-like
    assert choose_batch_size({1: 5.0, 2: 9.0, 4: 8.0}) == 2
    with pytest.raises(ValueError):
        choose_batch_size({})


def test_warmup_sizes():
    assert warmup_sizes(1) == [1]
    assert warmup_sizes(12) == [1, 2, 4, 8, 12]


def test_measure_throughput_on_a_real_model(tiny_segmenter):
    results = measure_throughput(tiny_segmenter, limit=4, runs=1)
    assert set(results) <= {1, 2, 4} and 1 in results
    assert all(v > 0 for v in results.values())
