"""The machine, read as a container sees it: /proc/cpuinfo, affinity and the cgroup CPU
quota, and the descriptions built from them."""

from __future__ import annotations

import pytest
import torch

from model import hardware

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx2 avx512f avx512_bf16 amx_tile amx_bf16
vmx flags\t: vnmi

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx2 avx512f avx512_bf16 amx_tile amx_bf16
"""


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "_CGROUP", tmp_path)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(16)))
    return tmp_path


@pytest.fixture
def cpuinfo(monkeypatch):
    """This machine's /proc/cpuinfo replaced by ``CPUINFO`` (or a text the test writes)."""

    def use(text: str) -> None:
        monkeypatch.setattr(hardware, "cpu_info", lambda: hardware.parse_cpuinfo(text))

    use(CPUINFO)
    return use


def test_cpus_capped_by_the_cgroup_quota(cgroup):
    (cgroup / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs of a 16-CPU node
    assert hardware.available_cpus() == 2


def test_cpus_without_a_quota_are_the_affinity(cgroup):
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert hardware.available_cpus() == 16


def test_cgroup_v1_quota(cgroup):
    (cgroup / "cpu").mkdir()
    (cgroup / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (cgroup / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert hardware.available_cpus() == 2


def test_cpuinfo_gives_the_model_and_the_flags(cpuinfo):
    assert hardware.cpu_model() == "Intel(R) Xeon(R) Platinum 8480+"
    assert hardware.cpu_flags() == {"fpu", "sse4_2", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    cpuinfo("")  # not Linux
    assert hardware.cpu_model() == "unknown CPU" and hardware.cpu_flags() == set()


def test_this_machine_is_read():
    assert hardware.cpu_model()
    assert isinstance(hardware.cpu_flags(), set)
    assert hardware.host_description().count(",") >= 2


def test_descriptions_of_a_cpu(cpuinfo, cgroup):
    (cgroup / "cpu.max").write_text("200000 100000\n")
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    assert hardware.device_description(cpu) == f"Intel(R) Xeon(R) Platinum 8480+, 2 CPUs, {threads} threads"
    key = hardware.machine_key(cpu)
    assert key == "cpu-c4b36289"  # in the bundled model's cached package names: the same as ever
    cpuinfo(CPUINFO.replace(" fpu", " fpu sse3"))  # instructions Inductor does not use: the same key
    assert hardware.machine_key(cpu) == key
    cpuinfo(CPUINFO.replace(" amx_tile amx_bf16", ""))  # another instruction set: another key
    assert hardware.machine_key(cpu) != key


def test_descriptions_of_a_gpu(monkeypatch):
    """The CUDA branches, with torch's answers for an H100 (no GPU needed)."""
    asked = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: asked.append(i) or "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or (9, 0))
    assert hardware.device_description(torch.device("cuda")) == "NVIDIA H100 80GB HBM3 (compute 9.0)"
    assert hardware.gpu_name(torch.device("cuda", 0)) == "NVIDIA H100 80GB HBM3"
    assert asked == [1, 1, 0]  # cuda alone is the current device
    assert hardware.machine_key(torch.device("cuda", 0)) == "cuda-ceadc855"  # the cache names as ever
