"""What the process may use, read as a container sees it: memory limit, RSS, and the
threads sized from its CPUs (which ``tests/model/test_hardware.py`` reads)."""

from __future__ import annotations

import pytest
import torch

from model import hardware
from service import resources
from service.threads import inference_streams


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "_CGROUP", tmp_path)
    monkeypatch.setattr(hardware, "_CGROUP", tmp_path)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(16)))
    return tmp_path


def test_memory_limit(cgroup):
    assert resources.memory_limit_bytes() is None
    (cgroup / "memory.max").write_text("max\n")
    assert resources.memory_limit_bytes() is None
    (cgroup / "memory.max").write_text(f"{2 * 2**30}\n")
    assert resources.memory_limit_bytes() == 2 * 2**30


def test_rss_and_allocator_are_read():
    assert resources.rss_bytes() > 10 * 2**20
    assert resources.allocator() in ("tcmalloc", "glibc", "unknown")
    resources.release_free_memory()  # returns memory; must not raise


def test_io_pool_sized_from_affinity_and_quota(cgroup):
    from service.app import io_threads

    (cgroup / "cpu.max").write_text("max 100000\n")
    assert io_threads("auto") == 18  # a 16-core GPU host, no quota: 16 + 2 (no longer capped at 8)
    (cgroup / "cpu.max").write_text("400000 100000\n")
    assert io_threads("auto") == 6  # a 4-CPU quota on the same node
    assert io_threads(3) == 3  # IO_THREADS


@pytest.mark.anyio
async def test_server_uses_the_io_threads_setting(tiny_artifact):
    from tests.service.conftest import make_settings, serve

    async with serve(make_settings(tiny_artifact, io_threads=5)) as client:
        assert client.app.state.chanseg.pool.workers == 5


def test_inference_streams_follow_the_device_and_threads():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [inference_streams("auto", cpu, t) for t in (1, 2, 4, 16)] == [1, 2, 1, 1]  # 2: measured on 2
    assert inference_streams(3, cpu, 16) == 3
    assert inference_streams("auto", cuda, 16) == inference_streams(1, cuda, 16) == 1
    with pytest.raises(ValueError, match="INFERENCE_STREAMS=2 is for CPU inference"):
        inference_streams(2, cuda, 16)
