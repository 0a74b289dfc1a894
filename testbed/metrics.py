"""``/metrics`` read back: a Prometheus exposition as a dict of samples (prometheus_client's
own parser), and the sum of a metric's samples over labels. The tests and the benchmarks
read the server's metrics through these."""

from __future__ import annotations

__all__ = ["metric_samples", "metric_total"]


def metric_samples(text: str) -> dict:
    """A ``/metrics`` page as ``{(sample name, ((label, value), ...)): value}``, labels
    sorted (prometheus_client's own parser). The benchmarks and the tests read it so."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric_total(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, have), value in samples.items()
        if sample == name and set(labels.items()) <= set(have)
    )
