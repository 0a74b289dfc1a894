"""Compiled packages (torch.export + AOTInductor): made from the tiny network once per
run, loaded by ``model.load`` from the file's contents, the same masks as the
TorchScript artifact, and refused clearly where they cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import model
from model.artifact import ModelLoadError
from model.autoprecision import TOLERANCE, choose
from model.compiled import is_package, missing_instructions, read_meta, read_package
from model.precision import hardware_precisions, require
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # a real server, a real part or a compile: make test-all

ROOT = Path(__file__).resolve().parents[2]


def test_package_is_told_apart_from_torchscript(tiny_package, tiny_artifact):
    assert is_package(tiny_package) and not is_package(tiny_artifact)
    config, meta = read_meta(tiny_package)
    assert config == TINY
    assert meta["format"] == "package" and meta["device"] == "cpu" and meta["precision"] == "fp32"
    assert meta["version"] == "7" and meta["torch_version"] == torch.__version__
    assert meta["cpu_isa"] and meta["channels_last"]


def test_a_package_written_as_aoti_by_earlier_versions_still_loads(tiny_package, tmp_path):
    """Packages were once marked "aoti" in their metadata; the one name now is "package"."""
    old = tmp_path / "old.pt2"
    with zipfile.ZipFile(tiny_package) as z, zipfile.ZipFile(old, "w") as dst:
        for item in z.infolist():
            data = z.read(item)
            if item.filename.endswith("/extra/chanseg_meta.json"):
                data = json.dumps({**json.loads(data), "format": "aoti"}).encode()
            dst.writestr(item, data)
    assert is_package(old) and read_meta(old)[1]["format"] == "package"
    seg = model.load(old, device="cpu")
    assert seg.format == "package" and seg.max_batch == 16
    assert seg.predict(np.zeros((40, 30, 3), np.uint8)).shape == (40, 30)


def test_package_gives_the_artifacts_masks(tiny_package, tiny_segmenter):
    seg = model.load(tiny_package, device="cpu")
    assert (seg.name, seg.version, seg.precision) == ("tiny", "7", "fp32")
    images = [np.random.default_rng(i).integers(0, 256, (50 + i, 70, 3), dtype=np.uint8) for i in range(5)]
    with torch.inference_mode():
        a = seg.logits([seg.prepare(im) for im in images]).float()
        b = tiny_segmenter.logits([tiny_segmenter.prepare(im) for im in images]).float()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    agree = np.mean([(x == y).mean() for x, y in zip(seg.predict(images), tiny_segmenter.predict(images))])
    assert agree > 0.999
    assert [m.shape for m in seg.predict(images)] == [im.shape[:2] for im in images]


def test_package_runs_every_batch_size_up_to_its_limit(tiny_package):
    seg = model.load(tiny_package, device="cpu")
    for n in (1, 3, 16):
        assert seg.infer([torch.zeros(64, 64, 3, dtype=torch.uint8)] * n).shape == (n, 64, 64)


def test_package_runs_through_the_c_interface_without_the_gil(tiny_package):
    """On CPU the compiled model is called through AOTInductor's C interface with
    ctypes (which releases the GIL; torch's binding holds it for the whole forward
    pass): the same outputs as torch's loader, for every call."""
    from torch.export.pt2_archive._package import load_pt2

    from model.compiled import NativeRunner

    native = read_package(tiny_package, torch.device("cpu")).module
    assert isinstance(native, NativeRunner)
    reference = load_pt2(tiny_package, device_index=-1).aoti_runners["model"]
    h, w = TINY.input_size
    for batch in (1, 3, 16):
        x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(batch))
        x = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(native(x), reference(x))


def test_a_killed_process_leaves_no_copy_of_the_compiled_library(tiny_package, tmp_path):
    """The library is extracted to the temporary directory only to be loaded and is
    deleted at once, so a process killed while serving (SIGKILL, OOM) leaves nothing
    there: a pod's /tmp outlives its container and has a size limit."""
    script = (
        "import sys, numpy as np, model\n"
        "seg = model.load(sys.argv[1], device='cpu')\n"
        "seg.predict([np.zeros((40, 40, 3), np.uint8)])\n"
        "ours = [m for m in open('/proc/self/maps') if 'chanseg-aoti-' in m]\n"
        "print('mapped, deleted' if ours and all(m.rstrip().endswith('(deleted)') for m in ours) else ours, flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tiny_package)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "mapped, deleted"
        assert not list(tmp_path.glob("chanseg-aoti-*"))  # while it serves
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not list(tmp_path.glob("chanseg-aoti-*"))


def test_package_refusals(tiny_package, tiny_artifact, monkeypatch):
    with pytest.raises(ModelLoadError, match="compiled for fp32, not bf16"):
        model.load(tiny_package, device="cpu", precision="bf16")
    with pytest.raises(ModelLoadError, match="not a TorchScript artifact"):
        model.load(tiny_package, device="cpu", format="torchscript")
    with pytest.raises(ModelLoadError, match="python -m model compile"):
        model.load(tiny_artifact, device="cpu", format="package")
    # compiled where AMX exists, loaded where it does not: refused, never a crash
    isa = read_meta(tiny_package)[1]["cpu_isa"].split()
    monkeypatch.setattr("model.hardware.cpu_flags", lambda: {"sse4_2"})
    with pytest.raises(ModelLoadError, match="this CPU lacks"):
        read_package(tiny_package, torch.device("cpu"))
    assert missing_instructions(" ".join(isa), {"sse4_2"}) == set(isa)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    with pytest.raises(ModelLoadError, match="compile it again"):
        read_package(tiny_package, torch.device("cpu"))


def test_instruction_sets_map_to_cpu_flags():
    flags = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
    assert missing_instructions("AVX512 AVX512_VNNI", flags) == set()
    assert missing_instructions("AVX512 AVX512_VNNI AMX_TILE", flags) == {"AMX_TILE"}
    assert missing_instructions("AVX512", set()) == set()  # unknown flags (not Linux): not refused


def test_precision_choice_is_the_fastest_within_the_bar():
    results = {
        "fp32": {"miou": 0.918, "batch1_ms": 100.0},
        "bf16": {"miou": 0.915, "batch1_ms": 40.0},
        "fp16": {"miou": 0.900, "batch1_ms": 30.0},  # faster, but loses 0.018 mIoU
    }
    assert choose(results) == "bf16"
    assert choose({**results, "bf16": {"miou": 0.918 - TOLERANCE - 0.001, "batch1_ms": 40.0}}) == "fp32"
    with pytest.raises(ValueError):
        choose({"bf16": results["bf16"]})


def test_reduced_precision_needs_the_hardware(monkeypatch):
    monkeypatch.setattr("model.hardware.cpu_flags", lambda: {"avx2", "avx512f"})
    assert hardware_precisions(torch.device("cpu")) == ["fp32"]
    with pytest.raises(ModelLoadError, match="bf16 is not supported on this CPU"):
        require("bf16", torch.device("cpu"))
    monkeypatch.setattr("model.hardware.cpu_flags", lambda: {"avx512f", "amx_bf16", "amx_tile"})
    assert hardware_precisions(torch.device("cpu")) == ["fp32", "bf16"]
    require("bf16", torch.device("cpu"))


def test_compile_command_chooses_and_records(tiny_artifact, tmp_path):
    """`python -m model compile --model ... --precision auto`: each precision the CPU
    has, scored on held-out synthetic images and timed; the choice is the package."""
    out = tmp_path / "tiny.pt2"
    done = subprocess.run(
        [sys.executable, "-m", "model", "compile", "--model", tiny_artifact, "--out", str(out),
         "--device", "cpu", "--precision", "auto", "--count", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report["results"]) == set(hardware_precisions(torch.device("cpu")))
    assert report["chosen"] == choose(report["results"])
    meta = read_meta(out)[1]
    assert meta["precision"] == report["chosen"] and meta["evaluation"]["images"] == 4
    assert meta["name"] == "tiny" and meta["version"] == "7"
    info = subprocess.run(
        [sys.executable, "-m", "model", "info", "--model", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    assert json.loads(info.stdout)["format"] == "package"
    with zipfile.ZipFile(out) as z:
        assert any(n.endswith("/extra/chanseg_config.json") for n in z.namelist())


def _with_library(package: str, out: Path, library: bytes) -> Path:
    """A copy of ``package`` whose compiled library is ``library`` (deflated)."""
    with zipfile.ZipFile(package) as z, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in z.infolist():
            is_library = "/data/aotinductor/model/" in item.filename and item.filename.endswith(".so")
            dst.writestr(item.filename, library if is_library else z.read(item), zipfile.ZIP_DEFLATED)
    return out


def test_a_package_that_would_fill_the_temporary_directory_is_refused(tiny_package, tmp_path, monkeypatch):
    """Issue 31: the .so was extracted with no size cap; a bomb filled a pod's 256 MiB /tmp."""
    bomb = _with_library(
        tiny_package, tmp_path / "bomb.pt2", bytes(300 << 20)
    )  # 300 MiB of zeros: ~300 KiB packed
    assert bomb.stat().st_size < 2 << 20
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(ModelLoadError, match="compression bomb"):
        model.load(bomb, device="cpu")
    assert not list(tmp_path.glob("chanseg-aoti-*"))  # nothing was unpacked
    usage = type("usage", (), {"free": 200 << 20})()  # a pod's small /tmp, mostly used
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage)
    with pytest.raises(ModelLoadError, match="more than the temporary directory"):
        model.load(_with_library(tiny_package, tmp_path / "large.pt2", os.urandom(150 << 20)), device="cpu")
    assert model.load(tiny_package, device="cpu").format == "package"  # a real one fits
