"""TorchScript export: scripted, self-describing, atomic; corrupt files fail clearly."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

import model
from model import ModelConfig, ModelLoadError, export_torchscript, read_artifact
from model.export import forget_freed_builtins, script
from model.loading import read_metadata
from tests.conftest import TINY, make_net


@pytest.mark.parametrize("config", [TINY, ModelConfig()], ids=["tiny", "default"])
def test_export_load_matches_eager(tmp_path, config):
    net = make_net(config)
    path = export_torchscript(net, tmp_path / "m.pt", version="3")
    x = torch.randn(2, 3, *config.input_size)
    with torch.no_grad():
        expected = net(x)
    artifact = read_artifact(path)
    assert isinstance(artifact.module, torch.jit.ScriptModule)
    with torch.no_grad():
        torch.testing.assert_close(artifact.module(x), expected, atol=1e-4, rtol=0)
    seg = model.load(path, device="cpu")  # frozen, the served variant
    with torch.no_grad():
        torch.testing.assert_close(seg.module(x), expected, atol=1e-4, rtol=0)


def test_metadata_round_trips(tmp_path, tiny_net):
    path = export_torchscript(tiny_net, tmp_path / "m.pt", version="2024.1", extra_meta={"note": "x"})
    artifact = read_artifact(path)
    assert artifact.config == TINY
    assert artifact.name == "tiny" and artifact.version == "2024.1"
    assert artifact.meta["chanseg_version"] == model.__version__
    assert artifact.meta["torch_version"] == torch.__version__
    assert artifact.meta["note"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temp file left behind


def test_export_is_atomic_on_failure(tmp_path, monkeypatch, tiny_net):
    target = tmp_path / "m.pt"
    export_torchscript(tiny_net, target)
    before = target.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", broken_save)
    with pytest.raises(OSError):
        export_torchscript(tiny_net, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def _corrupt_files(tmp_path, tiny_artifact):
    good = Path(tiny_artifact).read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.pt").write_text("this is not a model")
    (tmp_path / "empty.pt").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:
        z.writestr("hello.txt", "a zip, but not TorchScript")
    torch.jit.save(script(torch.nn.Linear(2, 2)), str(tmp_path / "plain.pt"))
    return ["truncated.pt", "text.pt", "empty.pt", "zip.pt", "plain.pt", "missing.pt"]


def test_corrupt_files_raise_model_load_error(tmp_path, tiny_artifact):
    for name in _corrupt_files(tmp_path, tiny_artifact):
        with pytest.raises(ModelLoadError, match=name):
            model.load(tmp_path / name, device="cpu")


def test_load_rejects_unknown_device_and_precision(tiny_artifact):
    with pytest.raises(ModelLoadError, match="precision"):
        model.load(tiny_artifact, precision="fp8")
    with pytest.raises(ModelLoadError, match="device"):
        model.load(tiny_artifact, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            model.load(tiny_artifact, device="cuda")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_on_cpu_runs_or_fails_clearly(tiny_artifact, precision):
    try:
        seg = model.load(tiny_artifact, device="cpu", precision=precision)
    except ModelLoadError as exc:
        assert precision in str(exc)
        return
    assert seg.dtype == model.PRECISIONS[precision]
    masks = seg.predict([torch.zeros(40, 30, 3, dtype=torch.uint8)])
    assert masks[0].shape == (40, 30)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_matches_cpu(tiny_artifact, precision):
    cpu = model.load(tiny_artifact, device="cpu")
    gpu = model.load(tiny_artifact, device="cuda", precision=precision)
    images = [torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8) for _ in range(3)]
    with torch.no_grad():
        a = cpu.logits([cpu.prepare(i) for i in images]).float()
        b = gpu.logits([gpu.prepare(i) for i in images]).float().cpu()
    tol = 1e-3 if precision == "fp32" else 0.1
    assert (a - b).abs().max() < tol * max(1.0, a.abs().max().item())


def test_scripting_ignores_builtins_whose_objects_are_gone():
    """TorchScript finds builtins by id(). An entry whose function was freed made any
    later object at that address a "builtin" (seen: a Conv2d's padding list, after
    Inductor's quantization passes refreshed quantized_decomposed's ops). Simulated
    here with an entry for a live conv's padding list: torch.jit.script fails on it,
    ``script`` does not."""
    from torch.jit import _builtins

    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    padding = conv._reversed_padding_repeated_twice
    _builtins._register_builtin(padding, "quantized_decomposed::quantize_per_tensor")
    try:
        with pytest.raises(RuntimeError, match="builtin cannot be used as a value"):
            torch.jit.script(conv)
        x = torch.randn(1, 3, 8, 8)
        torch.testing.assert_close(script(conv)(x), conv(x))
        assert id(padding) not in _builtins._builtin_table
    finally:
        _builtins._builtin_table.pop(id(padding), None)


def test_a_refreshed_op_leaves_no_freed_builtin_behind():
    """The mechanism itself: an overload added to an op already looked up replaces
    the packet's op object; the old one's id is forgotten, the new one's and every
    other builtin kept."""
    from torch.jit import _builtins

    forget_freed_builtins()  # what earlier tests in this process left
    lib = torch.library.Library("chanseg_refresh_test", "DEF")
    lib.define("op(Tensor x) -> Tensor")
    old = torch.ops.chanseg_refresh_test.op._op
    lib.define("op.scaled(Tensor x, float k) -> Tensor")
    new = torch.ops.chanseg_refresh_test.op._op
    assert new is not old and id(old) in _builtins._builtin_table  # what torch leaves
    before = dict(_builtins._builtin_table)
    forget_freed_builtins()
    table = _builtins._builtin_table
    assert id(old) not in table and table[id(new)] == "chanseg_refresh_test::op"
    assert set(before) - set(table) == {id(old)}  # nothing else was dropped
    assert table[id(torch.jit._async.wait)] == "aten::wait" and table[id(torch.relu)] == "aten::relu"


def _with_meta(src: str, dst: Path, **changes) -> Path:
    """A copy of the artifact ``src`` whose meta.json says ``changes`` (a hand-made or foreign file)."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for item in z.infolist():
            data = z.read(item)
            if item.filename.endswith("/extra/meta.json"):
                data = json.dumps({**json.loads(data), **changes}).encode()
            out.writestr(item, data)
    return dst


@pytest.mark.parametrize("bad", ["1.0\u2013rc1", "v 2", "a" * 65, "x\nforged: 1", "", "-rc"])
def test_names_and_versions_a_server_cannot_send_are_refused_where_they_enter(
    tmp_path, tiny_net, tiny_artifact, bad
):
    """Issue 31: version '1.0–rc1' loaded and reported ready, then every inference was a 500
    (X-Model-Version cannot be encoded). Refused at export, in a config, and at load."""
    with pytest.raises(ValueError, match="letters, digits"):
        model.export_torchscript(tiny_net, tmp_path / "a.pt", version=bad)
    with pytest.raises(ValueError, match="letters, digits"):
        ModelConfig(name=bad)
    for field in ("version", "name"):
        foreign = _with_meta(tiny_artifact, tmp_path / f"{field}.pt", **{field: bad})
        with pytest.raises(model.ModelLoadError, match="letters, digits"):
            model.load(foreign, device="cpu")
        with pytest.raises(model.ModelLoadError, match="letters, digits"):
            read_metadata(foreign)


def test_names_and_versions_that_are_fine(tmp_path, tiny_net):
    for version in ("1", "2.0.1-rc1+build.7", "a" * 64, "20261205_1"):
        path = model.export_torchscript(tiny_net, tmp_path / "a.pt", version=version)
        assert model.load(path, device="cpu").version == version
