"""A real chanseg process on the tiny model, for the load generator's tests."""

from __future__ import annotations

import pytest

from benchmarks.servers import SCENARIOS, running
from testbed.images import make_images


@pytest.fixture(scope="module")
def chanseg_url(tiny_artifact):
    sample = make_images(1, 64)[0]
    with running(SCENARIOS["chanseg-b1"], sample, model_path=tiny_artifact) as url:
        yield url
