"""Triton's repository layout (service/triton_layout.py, service/triton_config.py): config.pbtxt read, checked and
refused where chanseg cannot serve it as it says; plain TorchScript wrapped once; nothing
read outside the repository or the model's folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import model
from service.triton_config import MAX_CONFIG_BYTES
from service.triton_layout import (
    TritonLayoutError,
    TritonVersion,
    model_folders,
    prepared,
    read_model,
    triton_file,
)
from tests.conftest import TINY, make_net
from tests.service.conftest import random_image

pytest.importorskip("tritonclient.grpc.model_config_pb2")

TENSORS = """
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3, 64, 64 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 4, 64, 64 ] } ]
"""
CONFIG = f"""
name: "tiny"
platform: "pytorch_libtorch"
max_batch_size: 8
{TENSORS}
parameters {{ key: "mean" value {{ string_value: "0.5,0.5,0.5" }} }}
parameters {{ key: "std" value {{ string_value: "0.25, 0.25, 0.25" }} }}
instance_group [ {{ kind: KIND_GPU count: 2 }} ]
dynamic_batching {{ max_queue_delay_microseconds: 100 }}
optimization {{ execution_accelerators {{ gpu_execution_accelerator : [ {{ name : "tensorrt" }} ] }} }}
"""


class _ChannelsLast(torch.nn.Module):
    """A model that takes (N, H, W, 3), as a Triton model with dims [H, W, 3] does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """The tiny network as Triton's PyTorch backend takes it: torch.jit.save, no chanseg metadata."""
    path = tmp_path_factory.mktemp("plain") / "model.pt"
    torch.jit.save(torch.jit.script(make_net()), str(path))
    return path


def _repository(
    tmp_path: Path, plain: Path, config: str | None = CONFIG, versions=(1,), **files: str
) -> Path:
    root = tmp_path / "repo"
    folder = root / "tiny"
    for v in versions:
        (folder / str(v)).mkdir(parents=True)
        os.link(plain, folder / str(v) / "model.pt")
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.pbtxt").write_text(config)
    for name, text in files.items():
        (folder / name).write_text(text)
    return root.resolve()


def _prepared(root: Path, version: int = 1, cache: Path | None = None):
    return prepared(TritonVersion(read_model(root, "tiny"), version), cache or root.parent / "cache")


def test_a_plain_torchscript_model_is_wrapped_once_with_what_its_config_says(tmp_path, plain):
    root = _repository(tmp_path, plain, versions=(1, 2, 10), **{"labels.txt": "bg\na\nb\nc\n"})
    (root / "tiny" / "01").mkdir()  # not a version: written with a leading zero
    (root / "tiny" / "01" / "model.pt").write_bytes(plain.read_bytes())
    found = read_model(root, "tiny")
    assert model_folders(root) == ["tiny"] and found.versions == (1, 2, 10)
    assert found.chosen().version == 10  # latest, numerically
    path, meta = _prepared(root, 2)
    assert meta == {"name": "tiny", "version": "2", "max_batch": 8}
    mtime = path.stat().st_mtime_ns
    assert _prepared(root, 2)[0] == path and path.stat().st_mtime_ns == mtime  # made once
    seg = model.load(path, "cpu", meta=meta)
    assert (seg.name, seg.version, seg.max_batch) == ("tiny", "2", 8)
    assert seg.config.class_names == ("class_0", "class_1", "class_2", "class_3")  # no label file named
    assert seg.config.mean == TINY.mean and seg.config.std == TINY.std and seg.config.input_size == (64, 64)
    image = random_image(3, 64, 64)
    reference = model.load(model.export_torchscript(make_net(), tmp_path / "ref.pt"), "cpu")
    np.testing.assert_array_equal(seg.predict(image), reference.predict(image))


def test_labels_defaults_and_a_batch_dim_in_the_dims(tmp_path, plain):
    config = """
    max_batch_size: 0
    input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, 3, 64, 64 ] } ]
    output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, -1, 64, 64 ] label_filename: "labels.txt" } ]
    version_policy: { specific: { versions: [ 1 ] } }
    """
    root = _repository(
        tmp_path, plain, config, versions=(1, 2), **{"labels.txt": "bg\r\ncircle\nrect\ntri\n\n"}
    )
    assert read_model(root, "tiny").chosen().version == 1
    path, meta = _prepared(root)
    assert meta == {"name": "tiny", "version": "1"}  # no batch bound
    loaded = model.load(path, "cpu", meta=meta)
    assert loaded.config.class_names == ("bg", "circle", "rect", "tri")
    assert loaded.config.mean == (0.485, 0.456, 0.406)  # ImageNet's by default


def test_any_spatial_size_with_an_input_size_and_a_channels_last_model(tmp_path):
    plain = tmp_path / "nhwc.pt"
    torch.jit.save(torch.jit.script(_ChannelsLast().eval()), str(plain))
    config = """
    max_batch_size: 4
    input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, -1, 3 ] } ]
    output [ { name: "y" data_type: TYPE_FP32 dims: [ 4, -1, -1 ] } ]
    parameters { key: "input_size" value { string_value: "32,64" } }
    """
    root = _repository(tmp_path, plain, config)
    path, meta = _prepared(root)
    seg = model.load(path, "cpu", meta=meta)
    assert seg.config.input_size == (32, 64) and seg.max_batch == 4
    assert seg.predict(random_image(1, 50, 70)).shape == (50, 70)


def test_a_chanseg_artifact_is_served_as_it_is_under_the_folders_name_and_number(tmp_path, tiny_artifact):
    root = tmp_path / "repo"
    (root / "seg" / "3").mkdir(parents=True)
    os.link(tiny_artifact, root / "seg" / "3" / "model.pt")  # named "tiny", version "7" inside
    root = root.resolve()
    found = read_model(root, "seg")
    assert found.config is None and found.versions == (3,)
    path, meta = prepared(found.chosen(), tmp_path / "cache")
    assert path == root / "seg" / "3" / "model.pt" and meta == {"name": "seg", "version": "3"}
    assert not (tmp_path / "cache").exists()  # nothing wrapped
    seg = model.load(path, "cpu", meta=meta)
    assert (seg.name, seg.version) == ("seg", "3")
    assert triton_file(root, path).version == 3 and triton_file(root, root / "seg" / "3") is None


REFUSED_CONFIGS = {
    "bad syntax": ('name: "tiny" input [ { name: ', "not a Triton model config"),
    "unknown field": ('name: "tiny" colour: "blue"', "not a Triton model config"),
    "name mismatch": ('name: "other"', "name 'other' is not the folder's, 'tiny'"),
    "policy all": (
        "version_policy: { all: {} }",
        "version_policy all is not supported: chanseg serves one version",
    ),
    "latest 2": ("version_policy: { latest: { num_versions: 2 } }", "so num_versions must be 1"),
    "two specific": ("version_policy: { specific: { versions: [1, 2] } }", "so name exactly one"),
    "onnx": ('platform: "onnxruntime_onnx"', "chanseg serves TorchScript (pytorch_libtorch) models only"),
    "python backend": ('backend: "python"', "chanseg serves TorchScript"),
    "ensemble": ('platform: "" ensemble_scheduling { step [] }', "ensemble_scheduling is not supported"),
    "sequence": ("sequence_batching { }", "sequence_batching is not supported"),
    "decoupled": ("model_transaction_policy { decoupled: true }", "a decoupled model is not supported"),
    "file outside": ('default_model_filename: "../../x.pt"', "default_model_filename must be a file name"),
    "negative batch": ("max_batch_size: -2", "max_batch_size must be 0 or more"),
}


@pytest.mark.parametrize("case", list(REFUSED_CONFIGS), ids=list(REFUSED_CONFIGS))
def test_configs_chanseg_cannot_serve_are_refused_saying_why(tmp_path, plain, case):
    text, words = REFUSED_CONFIGS[case]
    root = _repository(tmp_path, plain, text)
    with pytest.raises(TritonLayoutError) as err:
        read_model(root, "tiny")
    assert words in str(err.value)
    assert len(str(err.value)) < 600


def test_a_huge_or_binary_config_is_not_parsed(tmp_path, plain):
    root = _repository(tmp_path, plain, "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(TritonLayoutError, match="over 1 MiB"):
        read_model(root, "tiny")
    (root / "tiny" / "config.pbtxt").write_bytes(b'name: "\xff\xfe"')
    with pytest.raises(TritonLayoutError, match="not UTF-8"):
        read_model(root, "tiny")
    (root / "tiny" / "config.pbtxt").write_text("input { " * 100_000)  # nested past any stack
    with pytest.raises(TritonLayoutError, match="not a Triton model config"):
        read_model(root, "tiny")


def _with_tensors(inp: str, out: str, extra: str = "max_batch_size: 8") -> str:
    return f'{extra}\ninput [ {{ name: "x" {inp} }} ]\noutput [ {{ name: "y" {out} }} ]'


FP32 = "data_type: TYPE_FP32"
REFUSED_TENSORS = {
    "any size, no input_size": (
        _with_tensors(f"{FP32} dims: [3, -1, -1]", f"{FP32} dims: [4, -1, -1]"), "give it as parameters",
    ),
    "not an image": (_with_tensors(f"{FP32} dims: [3, 64]", f"{FP32} dims: [4, 64, 64]"), "chanseg needs an image"),
    "not RGB": (_with_tensors(f"{FP32} dims: [1, 64, 64]", f"{FP32} dims: [4, 64, 64]"), "neither [3, H, W]"),
    "uint8 input": (
        _with_tensors("data_type: TYPE_UINT8 dims: [3, 64, 64]", f"{FP32} dims: [4, 64, 64]"), "feeds TYPE_FP32",
    ),
    "int output": (
        _with_tensors(f"{FP32} dims: [3, 64, 64]", "data_type: TYPE_INT64 dims: [64, 64]"), "needs float logits",
    ),
    "batch dim of 4": (
        _with_tensors(f"{FP32} dims: [4, 3, 64, 64]", f"{FP32} dims: [4, 4, 64, 64]", "max_batch_size: 0"),
        "the first dim is the batch, so -1 or 1",
    ),
    "huge input": (
        _with_tensors(f"{FP32} dims: [3, 100000, 100000]", f"{FP32} dims: [4, -1, -1]"), "within 1..4096",
    ),
    "logits at another size": (
        _with_tensors(f"{FP32} dims: [3, 64, 64]", f"{FP32} dims: [4, 32, 32]"), "logits at the input's size",
    ),
    "one class": (_with_tensors(f"{FP32} dims: [3, 64, 64]", f"{FP32} dims: [1, 64, 64]"), "2 or more"),
    "classes unknown": (_with_tensors(f"{FP32} dims: [3, 64, 64]", f"{FP32} dims: [-1, 64, 64]"), "2 or more"),
    "too many classes": (_with_tensors(f"{FP32} dims: [3, 64, 64]", f"{FP32} dims: [300, 64, 64]"), "at most 256"),
    "two outputs": (
        _with_tensors(f"{FP32} dims: [3, 64, 64]", f"{FP32} dims: [4, 64, 64] }}, {{ name: \"z\" {FP32} dims: [1]"),
        "one image input and one logits output",
    ),
    "reshape": (
        _with_tensors(f"{FP32} dims: [3, 64, 64] reshape {{ shape: [1, 3, 64, 64] }}", f"{FP32} dims: [4, 64, 64]"),
        "has a reshape",
    ),
    "bad mean": (
        CONFIG.replace('"0.5,0.5,0.5"', '"0.5,nan,0.5"'), "parameters mean '0.5,nan,0.5': give 3 comma-separated",
    ),
    "bad std": (CONFIG.replace('"0.25, 0.25, 0.25"', '"0,1,1"'), "std must be positive"),
    "label file outside the folder": (
        _with_tensors(f"{FP32} dims: [3, 64, 64]", f'{FP32} dims: [4, 64, 64] label_filename: "../secret.txt"'),
        "label_filename must be a file name in the model's folder",
    ),
    "label count": (
        _with_tensors(f"{FP32} dims: [3, 64, 64]", f'{FP32} dims: [4, 64, 64] label_filename: "labels.txt"'),
        "names 2 classes, the output dims give 4",
    ),
    "no config": (None, "a plain TorchScript model needs config.pbtxt"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED_TENSORS), ids=list(REFUSED_TENSORS))
def test_a_plain_models_tensors_are_checked_before_it_is_wrapped(tmp_path, plain, case):
    text, words = REFUSED_TENSORS[case]
    root = _repository(tmp_path, plain, text, **{"labels.txt": "a\nb\n"})
    (root.parent / "secret.txt").write_text("a\nb\nc\nd\n")
    with pytest.raises(TritonLayoutError) as err:
        _prepared(root)
    assert words in str(err.value)
    assert not (root.parent / "cache").exists()


def test_links_out_of_the_repository_or_the_model_folder_are_not_followed(tmp_path, plain):
    root = _repository(tmp_path, plain, _with_tensors(
        f"{FP32} dims: [3, 64, 64]", f'{FP32} dims: [4, 64, 64] label_filename: "labels.txt"'
    ))  # fmt: skip
    outside = tmp_path / "outside"
    (outside / "5").mkdir(parents=True)
    os.link(plain, outside / "5" / "model.pt")
    (outside / "labels.txt").write_text("a\nb\nc\nd\n")
    (root / "tiny" / "5").symlink_to(outside / "5")  # a version folder leading out
    (root / "tiny" / "6").mkdir()
    (root / "tiny" / "6" / "model.pt").symlink_to(outside / "5" / "model.pt")  # a file leading out
    (root / "tiny" / "labels.txt").symlink_to(outside / "labels.txt")
    (root / "elsewhere").symlink_to(outside)  # a model folder leading out
    assert model_folders(root) == ["tiny"]
    assert read_model(root, "tiny").versions == (1,)
    with pytest.raises(
        TritonLayoutError, match="label_filename labels.txt: not a file in the model's folder"
    ):
        _prepared(root)
    with pytest.raises(TritonLayoutError, match="a link out of the model repository"):
        read_model(root, "elsewhere")
    with pytest.raises(TritonLayoutError, match="model name"):
        read_model(root, "..")
